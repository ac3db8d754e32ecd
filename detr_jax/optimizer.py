"""Optimizer: AdamW with per-group learning rates, global-norm clipping and an lr schedule.

The official recipe (paper Sec. 4, "Technical details"; the arguments and optimizer set-up of
the official `main.py`, facebookresearch/detr at commit 29901c5): AdamW, weight decay 1e-4 on
every trained parameter, lr 1e-4 for the transformer and heads, lr_backbone 1e-5 for the trained
backbone stages, gradients clipped to global norm 0.1 over all trained parameters (torch
`clip_grad_norm_`), lr x0.1 after `lr_drop` epochs (torch `StepLR`, stepped once per epoch).

Parameter groups come from `detr_jax.models.param_labels`: "frozen" leaves get no update (and no
weight decay), "backbone" leaves train at `lr_backbone`, "transformer" leaves at `lr`.
"""

from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax

from detr_jax import config_checks
from detr_jax.models import BACKBONE
from detr_jax.models import FROZEN
from detr_jax.models import TRANSFORMER

_SCHEDULES = config_checks.OPTIMIZER_SCHEDULES


def create_learning_rate_schedule(
    opt_config: ml_collections.ConfigDict,
    base_lr: float,
    steps_per_epoch: int,
    total_steps: int,
) -> optax.Schedule:
  """Returns the lr schedule of one parameter group, indexed by optimizer update.

  Args:
    opt_config: `config.optimizer` (schedule, warmup_steps, lr_drop_epochs, lr_drop_factor).
    base_lr: the group's peak learning rate.
    steps_per_epoch: optimizer updates per epoch (already divided by grad_accum_steps).
    total_steps: optimizer updates of the whole run (cosine decays to 0 at this step).

  Returns:
    An optax schedule: "step" holds base_lr and multiplies it by lr_drop_factor from update
    lr_drop_epochs * steps_per_epoch on (like torch StepLR stepped per epoch); "cosine" decays to
    zero at total_steps; "linear" decays linearly to zero at total_steps; "constant" holds
    base_lr. All start with a linear warmup of warmup_steps updates from 0 when
    warmup_steps > 0.

  Raises:
    ValueError: for an unknown schedule name or negative step counts.
  """
  name = opt_config.get("schedule", "step")
  warmup_steps = int(opt_config.get("warmup_steps", 0))
  if name not in _SCHEDULES:
    raise ValueError(f"config.optimizer.schedule={name!r} is unknown; use one of {_SCHEDULES}.")
  if warmup_steps < 0 or total_steps <= 0 or steps_per_epoch <= 0:
    raise ValueError(
        f"Schedule needs warmup_steps >= 0 and total_steps, steps_per_epoch > 0; got "
        f"warmup_steps={warmup_steps}, total_steps={total_steps}, "
        f"steps_per_epoch={steps_per_epoch}.")

  if name == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=base_lr, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=0.0)

  if name == "linear":
    decay = optax.linear_schedule(base_lr, 0.0, max(total_steps - warmup_steps, 1))
    if warmup_steps == 0:
      return decay
    return optax.join_schedules(
        [optax.linear_schedule(0.0, base_lr, warmup_steps), decay], [warmup_steps])

  if name == "step":
    drop_step = int(opt_config.get("lr_drop_epochs", 0)) * steps_per_epoch
    factor = float(opt_config.get("lr_drop_factor", 0.1))
    # piecewise_constant applies the factor from count == drop_step on, so update number
    # drop_step (0-based) is the first at the dropped lr, like StepLR after lr_drop epochs.
    main = optax.piecewise_constant_schedule(
        base_lr, {drop_step: factor} if drop_step > 0 else None)
  else:
    main = optax.constant_schedule(base_lr)

  if warmup_steps == 0:
    return main
  warmup = optax.linear_schedule(0.0, base_lr, warmup_steps)
  # join_schedules shifts the count of the second schedule; the step drop keeps its absolute step.
  return optax.join_schedules(
      [warmup, lambda count: main(count + warmup_steps)], [warmup_steps])


def _adamw(learning_rate: optax.ScalarOrSchedule, weight_decay: float, b1: float, b2: float):
  # Decoupled weight decay on every leaf of the group, as torch AdamW does on all parameters.
  return optax.adamw(learning_rate, b1=b1, b2=b2, eps=1e-8, weight_decay=weight_decay)


def create_optimizer(
    config: ml_collections.ConfigDict,
    labels: Any,
    steps_per_epoch: int,
    total_steps: int,
) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
  """Builds the DETR optimizer for a parameter tree.

  Chain: zero the gradients of frozen leaves (so they do not count in the clipping norm, like
  parameters with requires_grad=False in torch), clip to global norm `clip_norm`, then
  `optax.multi_transform` over the labels: AdamW at lr_backbone / lr, set_to_zero for frozen.
  With `grad_accum_steps > 1` the whole chain is wrapped in `optax.MultiSteps`, so gradients are
  averaged over that many calls before one clipped AdamW update.

  Args:
    config: the full config; reads `config.optimizer`.
    labels: tree like the params with leaves "frozen" | "backbone" | "transformer"
      (`detr_jax.models.param_labels`).
    steps_per_epoch: training-loop steps (batches) per epoch.
    total_steps: training-loop steps of the whole run.

  Returns:
    (optimizer, schedules): schedules maps "backbone" / "transformer" to the lr schedule of that
    group, indexed by training-loop step, for logging.

  Raises:
    ValueError: on a bad label or bad optimizer field.
  """
  opt = config.optimizer
  accum = int(opt.get("grad_accum_steps", 1))
  if accum < 1:
    raise ValueError(f"config.optimizer.grad_accum_steps must be >= 1, got {accum}.")
  bad = {l for l in jax.tree.leaves(labels) if l not in (FROZEN, BACKBONE, TRANSFORMER)}
  if bad:
    raise ValueError(f"Parameter labels must be frozen|backbone|transformer, got {sorted(bad)}.")
  clip_norm = float(opt.get("clip_norm", 0.0))
  weight_decay = float(opt.get("weight_decay", 1e-4))
  b1, b2 = (float(opt.get(name, default)) for name, default in config_checks.ADAM_BETA_DEFAULTS)
  if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
    raise ValueError(f"config.optimizer.b1 and b2 must be in [0, 1), got b1={b1}, b2={b2}.")

  # The optimizer counts updates, which is loop steps / accum under MultiSteps.
  updates_per_epoch = max(steps_per_epoch // accum, 1)
  total_updates = max(total_steps // accum, 1)
  schedules = {
      group: create_learning_rate_schedule(opt, float(lr), updates_per_epoch, total_updates)
      for group, lr in ((BACKBONE, opt.lr_backbone), (TRANSFORMER, opt.lr))
  }

  frozen_mask = jax.tree.map(lambda l: l == FROZEN, labels)
  parts = [optax.masked(optax.set_to_zero(), frozen_mask)]
  if clip_norm > 0:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.multi_transform(
      {FROZEN: optax.set_to_zero(),
       BACKBONE: _adamw(schedules[BACKBONE], weight_decay, b1, b2),
       TRANSFORMER: _adamw(schedules[TRANSFORMER], weight_decay, b1, b2)},
      labels))
  tx = optax.chain(*parts)
  if accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum)

  counts = {g: sum(int(l == g) for l in jax.tree.leaves(labels)) for g in (FROZEN, BACKBONE,
                                                                          TRANSFORMER)}
  logging.info("Optimizer: AdamW wd=%g clip=%g accum=%d; leaves per group %s.",
               weight_decay, clip_norm, accum, counts)
  by_step = {g: _per_loop_step(s, accum) for g, s in schedules.items()}
  return tx, by_step


def _per_loop_step(schedule: optax.Schedule, accum: int) -> Callable[[Any], Any]:
  return lambda step: schedule(jnp.asarray(step) // accum)


def trainable_global_norm(grads: Any, labels: Any) -> jax.Array:
  """Global L2 norm of the gradients of trained (non-frozen) leaves: the norm that gets clipped."""
  trained = [g for g, l in zip(jax.tree.leaves(grads), jax.tree.leaves(labels)) if l != FROZEN]
  return optax.tree.norm(trained)
