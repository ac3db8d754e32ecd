"""Training and evaluation loop: data parallel over every device of every host.

`train_and_evaluate(config, workdir)` trains DETR, checkpoints (resuming automatically from
`workdir`), evaluates COCO box AP and writes prediction PNGs. The global batch is sharded over a
1-D mesh with axis "data"; the forward pass and the set loss run per device in `jax.shard_map`
(host Hungarian matching is a callback per device shard), gradients are averaged with
`lax.pmean` and the optimizer update runs replicated under `jax.jit`.
"""

import collections
import functools
import json
import os
import time
from typing import Any

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import flax
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from detr_jax import checkpointing
from detr_jax import config_checks
from detr_jax import evaluate
from detr_jax import losses
from detr_jax import models
from detr_jax import optimizer as optimizer_lib
from detr_jax import parallel
from detr_jax.models import conv as conv_lib

TRAIN_KEYS = ("images", "pixel_mask", "labels", "boxes", "valid")


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken (training-loop steps)
  params: Any
  batch_stats: Any  # frozen BatchNorm constants, never updated
  opt_state: Any
  rng: jax.Array  # base dropout key; step and device are folded in


def resolve_config(config: ml_collections.ConfigDict, info) -> ml_collections.ConfigDict:
  """`input_pipeline.resolve_config`: the config's dataset-dependent fields filled and checked."""
  from detr_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.resolve_config(config, info)


def total_train_steps(config: ml_collections.ConfigDict) -> int:
  if config.get("num_train_steps", -1) > 0:
    return int(config.num_train_steps)
  return int(config.num_epochs * config.steps_per_epoch)


# Re-exported: the mesh helpers live in detr_jax.parallel.
create_mesh = parallel.create_mesh
check_batch_sizes = parallel.check_batch_sizes


# ------------------------------------------------------------------ model and optimizer
def _dummy_inputs(config):
  height, width = config.dataset.buckets[0]
  return jnp.zeros((1, height, width, 3), jnp.float32), jnp.ones((1, height, width), bool)


def create_train_state(config, model, tx, mesh, rng: jax.Array,
                       variables: Any | None = None) -> TrainState:
  """Initialises (or wraps `variables` into) a replicated TrainState on `mesh`."""
  init_rng, dropout_rng = jax.random.split(rng)

  def init(init_rng, variables):
    if variables is None:
      variables = model.init(init_rng, *_dummy_inputs(config), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), rng=dropout_rng)

  replicated = NamedSharding(mesh, P())
  return jax.jit(init, static_argnums=() if variables is not None else (1,),
                 out_shardings=replicated)(init_rng, variables)


def init_variables(config, model, rng) -> dict[str, Any]:
  """Fresh variables, with `config.init_from` / `config.backbone_init` weights merged in."""
  variables = jax.jit(functools.partial(model.init, train=False))(rng, *_dummy_inputs(config))
  variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
  init_from = config.get("init_from", "")
  backbone_init = config.get("backbone_init", "")
  if init_from:
    from detr_jax import convert  # pylint: disable=g-import-not-at-top
    loaded = convert.load_variables(init_from)
    logging.info("Initialising from converted checkpoint %s.", init_from)
    for col in ("params", "batch_stats"):
      variables[col], _ = checkpointing.merge_pretrained(
          variables[col], loaded.get(col, {}), name=col)
  if backbone_init:
    from detr_jax import convert  # pylint: disable=g-import-not-at-top
    state_dict = convert.read_state_dict(backbone_init)  # .pth (needs torch) or .safetensors
    loaded = convert.backbone_from_torchvision(state_dict, config.model)
    logging.info("Initialising the backbone from torchvision weights %s.", backbone_init)
    for col in ("params", "batch_stats"):
      variables[col], _ = checkpointing.merge_pretrained(
          variables[col], loaded.get(col, {}), reinit_on_mismatch=(), name=col)
  return variables


# ------------------------------------------------------------------ update step
def _donated_state(mesh) -> tuple[int, ...]:
  """`donate_argnums` of the train step: its state on accelerators, nothing on the CPU.

  Donated, the state's buffers are the new state's: an accelerator holds one copy of the
  parameters and AdamW moments instead of two. XLA then copies every moment it updates in place
  before the update (the parameter's update and the moment's both read the old moment): 280
  copies per step of the 6-minute shapes recipe (2 + 3 layers then), 12 ms of a 75 ms step on a
  2-core CPU, where memory is not short. Without donation the step was 1.15x faster there
  (medians of 30 interleaved steps on a fixed batch); the values are the same.
  """
  return () if mesh.devices.flat[0].platform == "cpu" else (0,)


def make_train_step(config, model, tx, labels, mesh, schedules):
  """Returns jitted `train_step(state, batch) -> (state, metrics)`; the state is donated on
  accelerators (`_donated_state`)."""
  loss_config = config.loss

  def device_loss(params, batch_stats, batch, rng):
    # Frozen parameters are constants of the loss (the optimizer ignores their zero gradients).
    params = models.stop_frozen_gradients(params, labels)
    targets = {"labels": batch["labels"], "boxes": batch["boxes"], "valid": batch["valid"]}
    # The targets reach the model for DN-DETR's denoising queries only (denoising_groups > 0).
    outputs = model.apply({"params": params, "batch_stats": batch_stats},
                          batch["images"], batch["pixel_mask"], train=True, targets=targets,
                          rngs={"dropout": rng, "denoising": jax.random.fold_in(rng, 1)})
    return losses.training_loss(outputs, targets, loss_config, axis_name="data",
                                num_query_groups=int(config.model.get("num_query_groups", 1)))

  def device_grads(params, batch_stats, batch, rng):
    # Different dropout masks on every device.
    rng = jax.random.fold_in(rng, lax.axis_index("data"))
    (loss, metrics), grads = jax.value_and_grad(device_loss, has_aux=True)(
        params, batch_stats, batch, rng)
    # set_loss divides by num_boxes / num_devices, so the mean over devices is the gradient of
    # the loss of the global batch (torch DDP averages the same way).
    grads = lax.pmean(grads, "data")
    metrics = lax.pmean(dict(metrics, loss=loss), "data")
    return grads, metrics

  sharded_grads = jax.shard_map(
      device_grads, mesh=mesh, in_specs=(P(), P(), P("data"), P()), out_specs=(P(), P()),
      check_vma=False)

  def train_step(state: TrainState, batch):
    step_rng = jax.random.fold_in(state.rng, state.step)
    grads, metrics = sharded_grads(state.params, state.batch_stats, batch, step_rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A NaN or Inf in the loss or in any gradient skips the update on the device: parameters
    # and optimizer state stay as they were (jnp.where(True, new, old) is `new` bit for bit).
    # (Frozen parameters' gradients are zeros and never applied.)
    metrics["grad_norm"] = optimizer_lib.trainable_global_norm(grads, labels)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    keep_finite = lambda new, old: jnp.where(finite, new, old)
    params = jax.tree.map(keep_finite, params, state.params)
    opt_state = jax.tree.map(keep_finite, opt_state, state.opt_state)
    metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    for group, schedule in schedules.items():
      metrics[f"lr_{group}"] = schedule(state.step)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  replicated = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P("data"))
  return jax.jit(train_step, in_shardings=(replicated, data),
                 out_shardings=(replicated, replicated), donate_argnums=_donated_state(mesh),
                 compiler_options=conv_lib.program_compiler_options(model, mesh))


def build(config, mesh, total_steps: int):
  """Builds (model, optimizer, labels, schedules) for a resolved config."""
  model = models.build_model(config.model)
  abstract = jax.eval_shape(functools.partial(model.init, train=False),
                            jax.random.PRNGKey(0), *_dummy_inputs(config))
  labels = models.param_labels(abstract["params"], config.model)
  tx, schedules = optimizer_lib.create_optimizer(config, labels, config.steps_per_epoch,
                                                 total_steps)
  return model, tx, labels, schedules


# Train steps built in this process, by what their program depends on: the model, loss and
# optimizer fields, the schedule's length and the mesh. A second `train_and_evaluate` of the same
# program (a resumed run, another seed, another workdir) reuses the step XLA already compiled.
# JAX's persistent compilation cache cannot hold a step that calls back to the host (the scipy
# matcher), so it would otherwise compile again: about 10 s for configs/tiny_test.py on 8 CPU
# devices. The few most recent are kept.
_BUILT_STEPS: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_MAX_BUILT_STEPS = 4


def _program_key(config, mesh, total_steps: int) -> tuple:
  return (config.model.to_json(), config.loss.to_json(), config.optimizer.to_json(),
          int(config.steps_per_epoch), int(total_steps), tuple(mesh.axis_names),
          mesh.devices.shape, tuple(int(d.id) for d in mesh.devices.flat))


def build_train_step(config, mesh, total_steps: int):
  """`build` and `make_train_step` for a resolved config, reused within the process.

  Returns:
    (model, tx, labels, schedules, train_step); the same objects for a config whose model, loss,
    optimizer, steps per epoch and total steps are equal, on the same mesh (the jitted step then
    runs without compiling again).
  """
  key = _program_key(config, mesh, total_steps)
  if key in _BUILT_STEPS:
    _BUILT_STEPS.move_to_end(key)
    logging.info("Reusing this process's train step of the same model, loss and optimizer.")
    return _BUILT_STEPS[key]
  model, tx, labels, schedules = build(config, mesh, total_steps)
  built = (model, tx, labels, schedules,
           make_train_step(config, model, tx, labels, mesh, schedules))
  _BUILT_STEPS[key] = built
  while len(_BUILT_STEPS) > _MAX_BUILT_STEPS:
    _BUILT_STEPS.popitem(last=False)
  return built


def global_batch(local: dict[str, np.ndarray], mesh, keys=TRAIN_KEYS):
  from detr_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.make_global_batch({k: local[k] for k in keys}, mesh)


class NonFiniteError(RuntimeError):
  """Too many consecutive train steps with a NaN or Inf loss or gradient."""


class NonFiniteMonitor:
  """Counts the steps whose update the train step skipped (metric `nonfinite`).

  It reads the per-step flags when the loop logs (no extra host synchronisation) and raises
  `NonFiniteError` once `max_consecutive` steps in a row were non-finite (<= 0: never).
  """

  def __init__(self, max_consecutive: int):
    self.max_consecutive = int(max_consecutive)
    self.streak = 0  # consecutive non-finite steps up to the last one seen
    self.total = 0
    self.streak_start = None

  def update(self, flags: list[tuple[int, float]]) -> list[int]:
    """`flags`: (step, nonfinite) in order; returns the non-finite steps among them."""
    bad = []
    for step, flag in flags:
      if flag > 0:
        bad.append(step)
        self.total += 1
        self.streak += 1
        if self.streak == 1:
          self.streak_start = step
      else:
        self.streak = 0
    return bad

  @property
  def exceeded(self) -> bool:
    return self.max_consecutive > 0 and self.streak >= self.max_consecutive


def _mean_metrics(history: list[dict[str, jax.Array]]) -> tuple[dict[str, float], list[float]]:
  """Means over the finite steps of `history` (all steps if none is), and each step's flag."""
  stacked = jax.device_get(history)
  flags = [float(m.get("nonfinite", 0.0)) for m in stacked]
  finite = [m for m, flag in zip(stacked, flags) if flag == 0] or stacked
  means = {k: float(np.mean([m[k] for m in finite])) for k in stacked[0] if k != "nonfinite"}
  means["nonfinite_steps"] = float(sum(flags))
  return means, flags


# ------------------------------------------------------------------ main
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains, checkpoints and evaluates DETR as `config` says; resumes from `workdir`.

  Args:
    config: experiment config (see configs/detr_r50_coco.py for every field).
    workdir: output directory: checkpoints/, TensorBoard events, config.json, eval_metrics.json,
      visualizations/.

  Returns:
    The final TrainState.
  """
  from detr_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  if "://" not in workdir:
    workdir = os.path.abspath(workdir)
  # Config mistakes fail here, in one line, before the data is prepared or anything compiles.
  config_checks.check_train_config(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  info = input_pipeline.dataset_info(config.dataset)
  config = resolve_config(config, info)
  total_steps = total_train_steps(config)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  logging.info("Dataset %s: %d classes, %d train / %d eval images; %d steps (%d per epoch).",
               config.dataset.name, config.model.num_classes, info.num_train_examples,
               info.num_eval_examples, total_steps, config.steps_per_epoch)

  # --- Mesh.
  mesh = create_mesh()
  check_batch_sizes(config, mesh)
  logging.info("Mesh: %d devices on %d processes.", mesh.devices.size, jax.process_count())

  # --- Model, optimizer and update step (sharding: params replicated, batch split over "data").
  model, tx, labels, schedules, train_step = build_train_step(config, mesh, total_steps)
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng = jax.random.split(rng)

  # --- Checkpoint: resume from workdir, else fresh / pretrained init.
  manager = checkpointing.create_checkpoint_manager(
      workdir, keep=config.keep_checkpoints, save_every=config.checkpoint_every_steps)
  if manager.latest_step() is not None:
    abstract = jax.eval_shape(lambda: create_train_state(config, model, tx, mesh, state_rng))
    replicated = NamedSharding(mesh, P())
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)
    state = checkpointing.restore_latest_readable(manager, abstract)
  else:
    variables = init_variables(config, model, init_rng)
    state = create_train_state(config, model, tx, mesh, state_rng, variables)
  step = int(state.step)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("Model: %s, %.2fM parameters; starting at step %d.", config.model.backbone,
               num_params / 1e6, step)

  # --- Input (resumes at `step`: batch k depends on (seed, k) only).
  train_iter = input_pipeline.create_train_iterator(config, start_step=step)

  # --- Evals.
  eval_every = int(config.get("eval_every_steps", 0))

  eval_seconds = [0.0]  # kept out of the reported training time

  def run_eval(step):
    eval_start = time.time()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    metrics = evaluate.evaluate_coco(config, model, variables, mesh, info.class_names)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
    if is_main:
      with open(os.path.join(workdir, "eval_metrics.json"), "w") as f:
        json.dump(dict(metrics, step=step), f, indent=1)
    eval_seconds[0] += time.time() - eval_start
    return metrics

  # --- Loop.
  preemption = checkpointing.PreemptionFlag()
  report_progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
  hooks = [report_progress]
  history, start_time, first_step = [], time.time(), step
  nonfinite = NonFiniteMonitor(config.get("max_nonfinite_steps", 20))
  log_every = max(int(config.log_every_steps), 1)
  ckpt_every = max(int(config.checkpoint_every_steps), 1)
  try:
    # Batch k + 1 is read and put on the devices while step k runs (JAX dispatches a step
    # asynchronously), so the input's host work overlaps the step (experiments/bench_feed.py).
    batch = global_batch(next(train_iter), mesh) if step < total_steps else None
    while step < total_steps:
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = train_step(state, batch)
        batch = global_batch(next(train_iter), mesh) if step + 1 < total_steps else None
      step += 1
      history.append(metrics)
      for hook in hooks:
        hook(step)
      if step % log_every == 0 or step == total_steps:
        means, flags = _mean_metrics(history)
        bad = nonfinite.update(list(zip(range(step - len(flags) + 1, step + 1), flags)))
        history = []
        if bad:
          logging.warning("Skipped the update of %d step(s) with a non-finite loss or gradient: "
                          "%s (%d in this run).", len(bad), ", ".join(map(str, bad)),
                          nonfinite.total)
        if nonfinite.exceeded:
          manager.wait_until_finished()
          last_good = manager.latest_step()
          where = (f"the last checkpoint, step {last_good} in {manager.directory}, is kept"
                   if last_good is not None else "no checkpoint was saved")
          raise NonFiniteError(
              f"{nonfinite.streak} consecutive train steps (steps {nonfinite.streak_start}.."
              f"{step}) had a non-finite loss or gradient, at most "
              f"config.max_nonfinite_steps={nonfinite.max_consecutive}; their updates were "
              f"skipped, so the parameters are those of before step {nonfinite.streak_start}; "
              f"{where}. Lower the learning rate or check the data of those steps.")
        writer.write_scalars(step, {f"train/{k}": v for k, v in means.items()})
        elapsed = time.time() - start_time - eval_seconds[0]
        eta = elapsed / (step - first_step) * (total_steps - step)
        logging.info("step %d/%d  loss %.4f  ce %.4f  bbox %.4f  giou %.4f  lr %.2e  "
                     "%.1f min elapsed, ETA %.1f min", step, total_steps, means["loss"],
                     means.get("loss_ce", np.nan), means.get("loss_bbox", np.nan),
                     means.get("loss_giou", np.nan), means["lr_transformer"],
                     elapsed / 60, eta / 60)
      stop = preemption.should_stop(step)
      if stop or step % ckpt_every == 0 or step == total_steps:
        checkpointing.save(manager, step, state, force=True)
      if stop:
        logging.warning("Stopping at step %d for preemption; the next run resumes here.", step)
        break
      if eval_every > 0 and step % eval_every == 0 and step != total_steps:
        with report_progress.timed("eval"):
          run_eval(step)
    train_minutes = (time.time() - start_time - eval_seconds[0]) / 60
    writer.write_scalars(step, {"train/minutes": train_minutes})
    logging.info("Trained steps %d..%d in %.1f min.", first_step, step, train_minutes)

    if step >= total_steps:
      if eval_every >= 0:  # 0: only this final evaluation; < 0: none
        run_eval(step)
      num_vis = int(config.get("num_visualizations", 0))
      if num_vis > 0:
        from detr_jax import visualize  # pylint: disable=g-import-not-at-top
        visualize.write_predictions(
            config, model, {"params": state.params, "batch_stats": state.batch_stats}, mesh,
            info.class_names, os.path.join(workdir, "visualizations"), num_vis)
      num_predictions = int(config.get("num_predictions", 0))
      if num_predictions > 0:
        from detr_jax import predict  # pylint: disable=g-import-not-at-top
        out = os.path.join(workdir, "predictions")
        predict.predict_validation_images(
            config, {"params": state.params, "batch_stats": state.batch_stats}, mesh,
            info.class_names, out, num_predictions)
        logging.info("Wrote predictions with attention maps of %d validation images to %s.",
                     num_predictions, out)
  finally:
    manager.wait_until_finished()
    preemption.restore_handlers()
    writer.flush()
  return state
