"""Bipartite matching of predicted queries to padded target boxes (official DETR `matcher.py`).

Cost (official `models/matcher.py`, `HungarianMatcher.forward`, in facebookresearch/detr at
commit 29901c5): C = cost_class * class_cost + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU(xyxy)),
with the class term picked by `config.loss.class_cost_type` from `CLASS_COSTS` ("softmax": the
official -p[target class]; "focal": the Deformable DETR focal cost). The assignment carries no
gradient. `config.loss.cost_query_order` w (0, the official cost, by default) adds w * q / Q to
every cost of query q: a fixed priority between queries whose costs differ by less than
w / Q, so that of two queries predicting the same box the lower-numbered one is always the match
(`matching_cost`).

Matchers share one signature and are picked by `config.loss.matcher` from `MATCHERS`:

  matcher(cost [L, B, Q, M], valid [B, M] bool) -> match_indices int32 [L, B, M]

`match_indices[l, b, m]` is the query matched to target slot m of image b for decoder output l,
or -1 where the slot is padding (`valid` False) or, when an image has more targets than queries,
left unmatched. `query_target_indices` turns it into the per-query view that the loss needs.

* "hungarian_host": scipy `linear_sum_assignment`, exactly the official matcher, through one
  `jax.pure_callback` for all decoder outputs of the batch; each image is solved over its valid
  columns only, so padding can never be matched and images without targets cost nothing.
* "hungarian_device": `optax.assignment.hungarian_algorithm`, exact, on the accelerator. Inside
  `jax.shard_map` it needs `check_vma=False` (optax's loops are not typed for per-device values).
* "greedy": repeatedly takes the cheapest remaining (query, target) pair; not optimal, a baseline.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize

from detr_jax import box_ops

# Non-finite costs (from NaN/inf predictions) are replaced by this, so the solvers stay defined
# and such pairs are matched only when nothing else is left (as the official matcher does).
_NONFINITE_COST = 1e8


# --- Class-cost terms: (pred_logits [..., Q, C+1], target_labels [..., M], loss_config) ---


def softmax_class_cost(pred_logits, target_labels, loss_config):
  """Official DETR class cost: -softmax probability of the target class, [..., Q, M]."""
  del loss_config
  probabilities = jax.nn.softmax(pred_logits, axis=-1)  # [..., Q, C+1]
  return -_gather_classes(probabilities, target_labels)


def focal_class_cost(pred_logits, target_labels, loss_config):
  """Deformable DETR class cost: focal loss of the positive minus that of the negative.

  Sigmoid probabilities of the real classes; the no-object logit (last) is not used. alpha and
  gamma are `focal_alpha` / `focal_gamma` (Deformable DETR hard-codes 0.25 and 2, the defaults).
  """
  alpha = loss_config.get("focal_alpha", 0.25)
  gamma = loss_config.get("focal_gamma", 2.0)
  probabilities = jax.nn.sigmoid(pred_logits[..., :-1])  # [..., Q, C]
  # The 1e-8 inside the logs is part of the reference formula, kept for equal values.
  negative = (1 - alpha) * probabilities**gamma * -jnp.log(1 - probabilities + 1e-8)
  positive = alpha * (1 - probabilities)**gamma * -jnp.log(probabilities + 1e-8)
  return _gather_classes(positive - negative, target_labels)


CLASS_COSTS: dict[str, Callable] = {
    "softmax": softmax_class_cost,
    "focal": focal_class_cost,
}


def _gather_classes(per_class, target_labels):
  """per_class [..., Q, K], target_labels [..., M] -> [..., Q, M] = per_class[..., q, label_m]."""
  num_queries = per_class.shape[-2]
  # Padding slots may hold any label; clip so the gather stays in range (they are masked later).
  labels = jnp.clip(target_labels, 0, per_class.shape[-1] - 1)
  labels = jnp.broadcast_to(labels[..., None, :],
                            labels.shape[:-1] + (num_queries,) + labels.shape[-1:])
  return jnp.take_along_axis(per_class, labels, axis=-1)


def matching_cost(pred_logits, pred_boxes, target_labels, target_boxes, loss_config):
  """The DETR matching cost between every query and every target slot (padding included).

  Args:
    pred_logits: [..., Q, C+1] class logits, the last class is "no object".
    pred_boxes: [..., Q, 4] cxcywh in [0, 1].
    target_labels: [..., M] int32 class ids.
    target_boxes: [..., M, 4] cxcywh in [0, 1].
    loss_config: `config.loss` (cost_class, cost_bbox, cost_giou, class_cost_type and
      cost_query_order).

  Returns:
    [..., Q, M] float32 cost; columns of padding slots hold meaningless finite values.

  `cost_query_order` w != 0 adds w * q / Q to row q. Two queries that predict the same box with
  the same class probability are otherwise a tie the matcher breaks arbitrarily, image by image:
  each is the match half of the time, the other is then trained towards "no object" with weight
  `eos_coef`, and the cross-entropy's optimum for both is a confident score, 1 / (1 + eos_coef),
  a duplicate detection. With the priority the lower-numbered query is the match every time, a
  rule the decoder's self-attention between the two can learn. Not in the official DETR.
  """
  pred_logits = pred_logits.astype(jnp.float32)
  pred_boxes = pred_boxes.astype(jnp.float32)
  target_boxes = target_boxes.astype(jnp.float32)
  class_cost_fn = get_class_cost(loss_config.get("class_cost_type", "softmax"))
  class_cost = class_cost_fn(pred_logits, target_labels, loss_config)  # [..., Q, M]
  l1_cost = jnp.abs(pred_boxes[..., :, None, :] - target_boxes[..., None, :, :]).sum(-1)
  giou = box_ops.generalized_box_iou(
      box_ops.box_cxcywh_to_xyxy(pred_boxes), box_ops.box_cxcywh_to_xyxy(target_boxes))
  # Summed in the official order (bbox, class, giou) so float32 values agree to the last bit.
  cost = (loss_config.get("cost_bbox", 5.0) * l1_cost
          + loss_config.get("cost_class", 1.0) * class_cost
          + loss_config.get("cost_giou", 2.0) * -giou)
  order = float(loss_config.get("cost_query_order", 0.0))
  if order:
    num_queries = cost.shape[-2]
    cost = cost + order * (jnp.arange(num_queries, dtype=jnp.float32) / num_queries)[:, None]
  return cost


def _prepare(cost, valid):
  """No gradient, finite cost; valid [B, M] broadcast to the cost's [L, B, M]."""
  cost = jax.lax.stop_gradient(jnp.where(jnp.isfinite(cost), cost, _NONFINITE_COST))
  return cost, jnp.broadcast_to(valid, cost.shape[:-2] + cost.shape[-1:])


def _per_image(solve_one_image, cost, valid):
  """Applies a [Q, M] solver to every image of every decoder output of `cost` [..., Q, M]."""
  solve = solve_one_image
  for _ in range(cost.ndim - 2):
    solve = jax.vmap(solve)
  return solve(cost, valid)


# --- Matchers: (cost [L, B, Q, M], valid [B, M]) -> match_indices int32 [L, B, M] ---


def _solve_on_host(cost, valid):
  """numpy: cost [..., Q, M], valid [..., M] -> [..., M] int32 query per target or -1."""
  cost = np.asarray(cost)
  valid = np.asarray(valid)
  num_queries, num_slots = cost.shape[-2:]
  flat_cost = cost.reshape(-1, num_queries, num_slots)
  flat_valid = valid.reshape(-1, num_slots)
  match = np.full(flat_valid.shape, -1, np.int32)
  for image_cost, image_valid, image_match in zip(flat_cost, flat_valid, match):
    columns = np.flatnonzero(image_valid)
    if columns.size == 0:
      continue
    rows, picked = scipy.optimize.linear_sum_assignment(image_cost[:, columns])
    image_match[columns[picked]] = rows
  return match.reshape(valid.shape)


def hungarian_host(cost, valid):
  """Exact matching with scipy on the host: one callback for every layer and image.

  Args:
    cost: [L, B, Q, M] matching cost.
    valid: [B, M] True on real target slots.

  Returns:
    [L, B, M] int32 matched query per target slot, -1 on padding.
  """
  cost, valid = _prepare(cost, valid)
  result_shape = jax.ShapeDtypeStruct(valid.shape, jnp.int32)
  # broadcast_all: under vmap the callback gets the full batched arrays and still runs once.
  return jax.pure_callback(_solve_on_host, result_shape, cost, valid, vmap_method="broadcast_all")


def _hungarian_one_image(cost, valid):
  """optax Hungarian on one [Q, M] cost; padding columns get one constant cost above all others.

  A column of constant cost cannot change which queries the valid targets get when Q >= M, and
  being the most expensive it is only used when Q < (valid targets) leaves nothing else.
  """
  num_slots = cost.shape[-1]
  padding_cost = jnp.max(jnp.where(valid[None, :], cost, -jnp.inf), initial=0.0) + 1.0
  cost = jnp.where(valid[None, :], cost, padding_cost)
  query_indices, slot_indices = optax.assignment.hungarian_algorithm(cost)
  match = jnp.full((num_slots,), -1, jnp.int32)
  match = match.at[slot_indices].set(query_indices.astype(jnp.int32))
  return jnp.where(valid, match, -1)


def _varying_mesh_axes(x):
  """Mesh axes over which x differs per device inside jax.shard_map (empty outside)."""
  aval = jax.typeof(x)
  manual_axis_type = getattr(aval, "mat", None)  # other jax versions expose `aval.vma` instead
  if manual_axis_type is not None:
    return frozenset(manual_axis_type.varying)
  return frozenset(getattr(aval, "vma", ()))


def hungarian_device(cost, valid):
  """Exact matching on the device with `optax.assignment.hungarian_algorithm`.

  Args:
    cost: [L, B, Q, M] matching cost.
    valid: [B, M] True on real target slots.

  Returns:
    [L, B, M] int32 matched query per target slot, -1 on padding.
  """
  varying_axes = _varying_mesh_axes(cost)
  if varying_axes:
    # optax's loops start from fresh (device-invariant) zeros, which shard_map's type check
    # rejects once the cost differs per device.
    raise ValueError(
        f"matcher 'hungarian_device' inside jax.shard_map needs check_vma=False (the cost varies "
        f"over mesh axes {sorted(varying_axes)} and optax.assignment.hungarian_algorithm's loops "
        "do not carry that type); pass check_vma=False to jax.shard_map or use 'hungarian_host'.")
  return _per_image(_hungarian_one_image, *_prepare(cost, valid))


def _greedy_one_image(cost, valid):
  """Greedy matching of one [Q, M] cost: min(Q, valid targets) steps of 'cheapest pair left'."""
  num_queries, num_slots = cost.shape
  cost = jnp.where(valid[None, :], cost, jnp.inf)

  def step(_, state):
    cost, match = state
    flat_index = jnp.argmin(cost)
    query, slot = flat_index // num_slots, flat_index % num_slots
    found = jnp.isfinite(cost[query, slot])
    match = jnp.where(found, match.at[slot].set(query.astype(jnp.int32)), match)
    cost = cost.at[query, :].set(jnp.inf).at[:, slot].set(jnp.inf)
    return cost, match

  # Derived from `valid` (not jnp.full) so that under shard_map the loop carry has the same
  # device-varying type as the values written into it.
  match = valid.astype(jnp.int32) * 0 - 1
  _, match = jax.lax.fori_loop(0, min(num_queries, num_slots), step, (cost, match))
  return match


def greedy(cost, valid):
  """Greedy matching (not optimal): a cheap baseline to compare against the Hungarian ones.

  Args:
    cost: [L, B, Q, M] matching cost.
    valid: [B, M] True on real target slots.

  Returns:
    [L, B, M] int32 matched query per target slot, -1 on padding.
  """
  # Non-finite costs become a large finite value, then padding becomes inf (never picked).
  return _per_image(_greedy_one_image, *_prepare(cost, valid))


MATCHERS: dict[str, Callable] = {
    "hungarian_host": hungarian_host,
    "hungarian_device": hungarian_device,
    "greedy": greedy,
}


def _lookup(registry, name, field):
  if name not in registry:
    raise ValueError(
        f"Unknown config.loss.{field}={name!r}; choose one of {sorted(registry)} or register a new "
        f"one in detr_jax.matching.{'MATCHERS' if field == 'matcher' else 'CLASS_COSTS'}.")
  return registry[name]


def get_matcher(name: str) -> Callable:
  """Returns the matcher registered under `name` (config.loss.matcher)."""
  return _lookup(MATCHERS, name, "matcher")


def get_class_cost(name: str) -> Callable:
  """Returns the class-cost term registered under `name` (config.loss.class_cost_type)."""
  return _lookup(CLASS_COSTS, name, "class_cost_type")


def match(pred_logits, pred_boxes, targets, loss_config):
  """Matches every decoder output to the targets in one go.

  Args:
    pred_logits: [L, B, Q, C+1] logits of L decoder outputs (e.g. aux outputs and the final one).
    pred_boxes: [L, B, Q, 4] cxcywh boxes.
    targets: dict with "labels" int32 [B, M], "boxes" float32 [B, M, 4] cxcywh, "valid" bool [B, M].
    loss_config: `config.loss` (matcher, class_cost_type and cost weights).

  Returns:
    [L, B, M] int32 matched query per target slot, -1 on padding.
  """
  matcher = get_matcher(loss_config.get("matcher", "hungarian_host"))
  cost = matching_cost(pred_logits, pred_boxes, targets["labels"][None], targets["boxes"][None],
                       loss_config)  # [L, B, Q, M]
  return matcher(cost, targets["valid"].astype(bool))


def query_target_indices(match_indices: jnp.ndarray, num_queries: int) -> jnp.ndarray:
  """Per-query view of a matching: the target slot each query is matched to, or -1.

  Args:
    match_indices: [..., M] int32 matched query per target slot, -1 where unmatched.
    num_queries: Q.

  Returns:
    [..., Q] int32 target slot per query, -1 for queries matched to nothing ("no object").
  """
  # A [.., Q, M] comparison instead of a scatter: no out-of-range writes for the -1 entries, and
  # it batches under vmap without special cases.
  hits = match_indices[..., None, :] == jnp.arange(num_queries, dtype=match_indices.dtype)[:, None]
  return jnp.where(hits.any(-1), jnp.argmax(hits, axis=-1), -1).astype(jnp.int32)
