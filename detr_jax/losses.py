"""The DETR set loss (official `SetCriterion`) as a pure function of padded arrays.

`set_loss` matches each decoder output to the targets on its own (detr_jax.matching), then
computes for each output the classification loss, L1 on cxcywh boxes and 1 - GIoU, and the
logged cardinality and class errors. Values equal the official PyTorch loss (tests compare them
with Hugging Face transformers' copy of it).

The classification term is picked by `config.loss.label_loss` from `LABEL_LOSSES`:
  "softmax_ce"    official cross entropy over C+1 classes, no-object weight `eos_coef`.
  "sigmoid_focal" Deformable DETR: sigmoid focal loss over the C real classes (the no-object
                  logit is ignored), alpha/gamma `focal_alpha`/`focal_gamma`, divided by
                  num_boxes. Deformable multiplies its per-query mean by num_queries, which is
                  the plain sum used here.
  "varifocal"     VarifocalNet / RT-DETR: sigmoid BCE whose target for the matched class is the
                  IoU of the matched box (no gradient through it), negatives weighted by
                  alpha * p^gamma (`varifocal_alpha`, default 0.75 as RT-DETR; `focal_gamma`).
A new term is one function with the `LabelLoss.loss` signature and one entry in `LABEL_LOSSES`.

Multi-device use: call inside `jax.shard_map` (or `jax.vmap` with an axis name) with
`axis_name="data"`; num_boxes is then the global box count divided by the number of devices,
clamped to >= 1 (official `models/detr.py`, `SetCriterion.forward`, in facebookresearch/detr at
commit 29901c5). The returned values are this device's loss; averaging gradients over devices
(pmean) reproduces the official distributed training.
"""

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from detr_jax import box_ops
from detr_jax import matching


class LabelLoss(NamedTuple):
  """A registered classification loss.

  Attributes:
    loss: fn(pred_logits [B, Q, C+1], pred_boxes [B, Q, 4], matched, num_boxes, loss_config)
      -> scalar. `matched` is the per-query target dict built by `matched_targets`.
    activation: "softmax" (scores over C+1 classes, the last one no-object) or "sigmoid"
      (independent scores of the C real classes); decides how class_error and
      cardinality_error read the logits.
  """
  loss: Callable
  activation: str


def matched_targets(match_indices, targets, num_classes, num_queries):
  """Gathers, for every query, the target it is matched to.

  Args:
    match_indices: [B, M] int32 matched query per target slot, -1 for none.
    targets: dict with "labels" [B, M] and "boxes" [B, M, 4] cxcywh.
    num_classes: C; the no-object label is C.
    num_queries: Q.

  Returns:
    dict with "labels" int32 [B, Q] (C where unmatched), "boxes" float32 [B, Q, 4] (zeros where
    unmatched) and "is_matched" bool [B, Q].
  """
  slot = matching.query_target_indices(match_indices, num_queries)  # [B, Q]
  is_matched = slot >= 0
  safe_slot = jnp.maximum(slot, 0)
  labels = jnp.take_along_axis(targets["labels"].astype(jnp.int32), safe_slot, axis=1)
  boxes = jnp.take_along_axis(targets["boxes"].astype(jnp.float32), safe_slot[..., None], axis=1)
  return {
      "labels": jnp.where(is_matched, labels, num_classes),
      "boxes": jnp.where(is_matched[..., None], boxes, 0.0),
      "is_matched": is_matched,
  }


def _divide_or_zero(numerator, denominator):
  return jnp.where(denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1.0), 0.0)


# --- Classification losses (LABEL_LOSSES) ---


def softmax_cross_entropy(pred_logits, pred_boxes, matched, num_boxes, loss_config):
  """Official loss_ce: weighted CE, mean over the weights of the targets (not num_boxes)."""
  del pred_boxes, num_boxes
  num_classes = pred_logits.shape[-1] - 1
  log_probs = jax.nn.log_softmax(pred_logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, matched["labels"][..., None], axis=-1)[..., 0]  # [B, Q]
  # F.cross_entropy(weight=w, reduction="mean") divides by sum of w[target], as done here.
  weights = jnp.where(matched["labels"] == num_classes, loss_config.get("eos_coef", 0.1), 1.0)
  return _divide_or_zero(jnp.sum(weights * nll), jnp.sum(weights))


def _real_class_one_hot(matched, num_classes):
  # One-hot over C+1 classes with the no-object column dropped: unmatched queries are all-zero.
  return jax.nn.one_hot(matched["labels"], num_classes + 1)[..., :-1]


def sigmoid_focal(pred_logits, pred_boxes, matched, num_boxes, loss_config):
  """Deformable DETR loss_ce: sigmoid focal over real classes, summed, divided by num_boxes."""
  del pred_boxes
  num_classes = pred_logits.shape[-1] - 1
  loss = optax.sigmoid_focal_loss(
      pred_logits[..., :-1], _real_class_one_hot(matched, num_classes),
      alpha=loss_config.get("focal_alpha", 0.25), gamma=loss_config.get("focal_gamma", 2.0))
  return jnp.sum(loss) / num_boxes


def varifocal(pred_logits, pred_boxes, matched, num_boxes, loss_config):
  """RT-DETR loss_vfl: BCE towards IoU-valued targets, negatives weighted alpha * p^gamma."""
  num_classes = pred_logits.shape[-1] - 1
  logits = pred_logits[..., :-1]  # [B, Q, C]
  one_hot = _real_class_one_hot(matched, num_classes)
  iou = box_ops.elementwise_box_iou(
      box_ops.box_cxcywh_to_xyxy(jax.lax.stop_gradient(pred_boxes)),
      box_ops.box_cxcywh_to_xyxy(matched["boxes"]))  # [B, Q]
  target_score = jnp.where(matched["is_matched"], iou, 0.0)[..., None] * one_hot
  pred_score = jax.lax.stop_gradient(jax.nn.sigmoid(logits))
  alpha = loss_config.get("varifocal_alpha", 0.75)
  gamma = loss_config.get("focal_gamma", 2.0)
  weight = alpha * pred_score**gamma * (1 - one_hot) + target_score
  loss = weight * optax.sigmoid_binary_cross_entropy(logits, target_score)
  return jnp.sum(loss) / num_boxes


LABEL_LOSSES: dict[str, LabelLoss] = {
    "softmax_ce": LabelLoss(softmax_cross_entropy, activation="softmax"),
    "sigmoid_focal": LabelLoss(sigmoid_focal, activation="sigmoid"),
    "varifocal": LabelLoss(varifocal, activation="sigmoid"),
}


def get_label_loss(name: str) -> LabelLoss:
  """Returns the classification loss registered under `name` (config.loss.label_loss)."""
  if name not in LABEL_LOSSES:
    raise ValueError(f"Unknown config.loss.label_loss={name!r}; choose one of "
                     f"{sorted(LABEL_LOSSES)} or register one in detr_jax.losses.LABEL_LOSSES.")
  return LABEL_LOSSES[name]


# --- Per decoder output ---


def _class_scores(pred_logits, activation):
  """(predicted class [B, Q], predicts-an-object [B, Q]) as each activation reads logits."""
  if activation == "softmax":
    predicted = jnp.argmax(pred_logits, axis=-1)
    return predicted, predicted != pred_logits.shape[-1] - 1
  # Sigmoid heads (as Deformable DETR): object where the best real-class probability > 0.5.
  real = pred_logits[..., :-1]
  return jnp.argmax(real, axis=-1), jnp.max(jax.nn.sigmoid(real), axis=-1) > 0.5


def _output_losses(pred_logits, pred_boxes, match_indices, targets, num_boxes, loss_config):
  """Loss terms and logged errors of one decoder output ([B, Q, ...]) given its matching."""
  num_classes = pred_logits.shape[-1] - 1
  label_loss = get_label_loss(loss_config.get("label_loss", "softmax_ce"))
  matched = matched_targets(match_indices, targets, num_classes, pred_logits.shape[1])
  is_matched = matched["is_matched"].astype(jnp.float32)  # [B, Q]

  loss_ce = label_loss.loss(pred_logits, pred_boxes, matched, num_boxes, loss_config)
  l1 = jnp.abs(pred_boxes - matched["boxes"]).sum(-1)  # [B, Q]
  giou = box_ops.elementwise_generalized_box_iou(
      box_ops.box_cxcywh_to_xyxy(pred_boxes), box_ops.box_cxcywh_to_xyxy(matched["boxes"]))

  # Logged only (no gradient), as the official loss_cardinality and class_error.
  logits = jax.lax.stop_gradient(pred_logits)
  predicted_class, predicts_object = _class_scores(logits, label_loss.activation)
  num_targets = targets["valid"].sum(-1).astype(jnp.float32)  # [B]
  cardinality_error = jnp.mean(jnp.abs(predicts_object.sum(-1).astype(jnp.float32) - num_targets))
  correct = jnp.sum((predicted_class == matched["labels"]) * is_matched)
  # Official accuracy() is 0 when nothing is matched, so class_error is then 100.
  class_error = 100.0 - 100.0 * _divide_or_zero(correct, jnp.sum(is_matched))
  return {
      "loss_ce": loss_ce,
      "loss_bbox": jnp.sum(l1 * is_matched) / num_boxes,
      "loss_giou": jnp.sum((1.0 - giou) * is_matched) / num_boxes,
      "cardinality_error": cardinality_error,
      "class_error": class_error,
  }


def _check_inputs(outputs, targets, layers):
  """Raises ValueError on inconsistent keys or shapes (static, so it also runs under jit)."""
  for key in ("pred_logits", "pred_boxes"):
    if key not in outputs:
      raise ValueError(f"outputs lacks {key!r}; pass the model output dict "
                       "(pred_logits, pred_boxes, aux_outputs).")
  for key in ("labels", "boxes", "valid"):
    if key not in targets:
      raise ValueError(f"targets lacks {key!r}; expected labels [B,M], boxes [B,M,4], valid [B,M].")
  batch, num_queries, _ = outputs["pred_logits"].shape
  for i, (logits, boxes) in enumerate(layers):
    if logits.ndim != 3 or logits.shape[:2] != (batch, num_queries) or boxes.shape != (
        batch, num_queries, 4):
      raise ValueError(f"decoder output {i}: pred_logits {logits.shape} / pred_boxes {boxes.shape} "
                       f"do not match [B={batch}, Q={num_queries}, C+1] / [B, Q, 4].")
  labels, boxes, valid = targets["labels"], targets["boxes"], targets["valid"]
  if labels.ndim != 2 or labels.shape[0] != batch or boxes.shape != labels.shape + (4,) or (
      valid.shape != labels.shape):
    raise ValueError(f"targets shapes labels {labels.shape}, boxes {boxes.shape}, valid "
                     f"{valid.shape} must be [B={batch}, M], [B, M, 4], [B, M] (padded targets).")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"targets['labels'] must be integer class ids, got {labels.dtype}.")
  num_classes = outputs["pred_logits"].shape[-1] - 1
  if not any(isinstance(x, jax.core.Tracer) for x in (labels, valid)):
    # Concrete inputs (eager use): check label values too; under jit this is skipped.
    labels, valid = np.asarray(labels), np.asarray(valid).astype(bool)
    if np.any(valid & ((labels < 0) | (labels >= num_classes))):
      raise ValueError(f"valid target labels must lie in [0, {num_classes - 1}] "
                       f"(pred_logits has C+1={num_classes + 1} classes, the last is no-object).")


GROUP_LOSSES = ("mean", "sum")


def split_query_groups(outputs, targets, num_groups: int):
  """Group DETR: outputs of K query groups [B, K * Q, ...] -> [B * K, Q, ...], targets repeated.

  Each (image, group) pair becomes one row, so matching is one-to-one within each group and the
  set loss treats the groups as K copies of the batch: its num_boxes is K times the box count,
  i.e. the loss is the mean over groups.
  """
  batch, total = outputs["pred_logits"].shape[:2]
  if total % num_groups:
    raise ValueError(f"{total} queries do not split into config.model.num_query_groups="
                     f"{num_groups} groups.")

  def split(x):
    return x.reshape(batch * num_groups, total // num_groups, *x.shape[2:])

  grouped = {"pred_logits": split(outputs["pred_logits"]),
             "pred_boxes": split(outputs["pred_boxes"]),
             "aux_outputs": [{k: split(aux[k]) for k in ("pred_logits", "pred_boxes")}
                             for aux in outputs.get("aux_outputs", [])]}
  return grouped, {k: jnp.repeat(v, num_groups, axis=0) for k, v in targets.items()}


def set_loss(outputs, targets, loss_config, axis_name=None, num_query_groups: int = 1,
             fixed_assignment: bool = False):
  """The DETR set loss over the final and (optionally) auxiliary decoder outputs.

  Args:
    outputs: model output dict: "pred_logits" [B, Q, C+1], "pred_boxes" [B, Q, 4] cxcywh and
      optionally "aux_outputs", a list of L-1 dicts of the same two arrays (layers 0..L-2).
    targets: "labels" int32 [B, M], "boxes" float32 [B, M, 4] cxcywh normalised, "valid" bool
      [B, M] (False on padding slots).
    loss_config: `config.loss`: matcher, class_cost_type, cost_class/bbox/giou, label_loss,
      eos_coef, ce/bbox/giou_loss_coef, focal_alpha, focal_gamma, aux_loss (and
      varifocal_alpha for "varifocal").
    axis_name: mesh/vmap axis the batch is split over (e.g. "data"), or None on one device.
    num_query_groups: K > 1 for Group DETR training outputs (K * Q queries, group after group):
      each group is matched one-to-one on its own (`split_query_groups`) and the loss is the
      mean over groups (`loss_config.query_group_losses="mean"`, LW-DETR's default,
      `sum_group_losses=False`) or their sum ("sum"). K = 1 is the plain loss.
    fixed_assignment: no matching: query m (of each group) is assigned target slot m, so Q must
      equal M (DN-DETR's denoising queries, one per target slot); groups are then always
      averaged.

  Returns:
    (total, metrics): total float32 scalar = sum over used outputs of ce_loss_coef * loss_ce +
    bbox_loss_coef * loss_bbox + giou_loss_coef * loss_giou; metrics maps loss_ce, loss_bbox,
    loss_giou, cardinality_error, class_error (final output) and the same keys suffixed _i for
    aux output i to float32 scalars.
  """
  reduction = loss_config.get("query_group_losses", "mean")
  if reduction not in GROUP_LOSSES:
    raise ValueError(f"config.loss.query_group_losses={reduction!r}: use one of {GROUP_LOSSES}.")
  if num_query_groups > 1:
    outputs, targets = split_query_groups(outputs, targets, num_query_groups)
  layers = [(outputs["pred_logits"], outputs["pred_boxes"])] if "pred_logits" in outputs else []
  if loss_config.get("aux_loss", True):
    layers = [(aux["pred_logits"], aux["pred_boxes"]) for aux in outputs.get("aux_outputs", [])
             ] + layers
  _check_inputs(outputs, targets, layers)
  pred_logits = jnp.stack([logits for logits, _ in layers]).astype(jnp.float32)  # [L, B, Q, C+1]
  pred_boxes = jnp.stack([boxes for _, boxes in layers]).astype(jnp.float32)  # [L, B, Q, 4]
  targets = {"labels": targets["labels"].astype(jnp.int32),
             "boxes": targets["boxes"].astype(jnp.float32),
             "valid": targets["valid"].astype(bool)}

  num_boxes = jnp.sum(targets["valid"]).astype(jnp.float32)
  if axis_name is not None:
    num_boxes = jax.lax.psum(num_boxes, axis_name) / jax.lax.psum(1.0, axis_name)
  num_boxes = jnp.maximum(num_boxes, 1.0)

  if fixed_assignment:
    slots = targets["labels"].shape[1]
    if pred_logits.shape[2] != slots:
      raise ValueError(f"fixed assignment: {pred_logits.shape[2]} queries per group for {slots} "
                       "target slots; they must be equal (one denoising query per slot).")
    identity = jnp.where(targets["valid"], jnp.arange(slots, dtype=jnp.int32), -1)
    match_indices = jnp.broadcast_to(identity, pred_logits.shape[:1] + identity.shape)
  else:
    match_indices = matching.match(pred_logits, pred_boxes, targets, loss_config)  # [L, B, M]
  # loss_config is not a pytree: bind it, vmap over the decoder outputs only.
  output_losses = functools.partial(_output_losses, loss_config=loss_config)
  per_output = jax.vmap(output_losses, in_axes=(0, 0, 0, None, None))(
      pred_logits, pred_boxes, match_indices, targets, num_boxes)  # each [L]

  weights = {"loss_ce": loss_config.get("ce_loss_coef", 1.0),
             "loss_bbox": loss_config.get("bbox_loss_coef", 5.0),
             "loss_giou": loss_config.get("giou_loss_coef", 2.0)}
  total = sum(weight * jnp.sum(per_output[name]) for name, weight in weights.items())
  if num_query_groups > 1 and reduction == "sum" and not fixed_assignment:
    total = total * num_query_groups
  num_outputs = len(layers)
  metrics = {}
  for name, values in per_output.items():
    metrics[name] = values[-1]
    for i in range(num_outputs - 1):
      metrics[f"{name}_{i}"] = values[i]
  return total, metrics


def one_to_many_targets(targets, k: int):
  """H-DETR's one-to-many targets: every image's target slots repeated k times ([B, k * M])."""
  return {name: jnp.tile(value, (1, k) + (1,) * (value.ndim - 2))
          for name, value in targets.items()}


def training_loss(outputs, targets, loss_config, axis_name=None, num_query_groups: int = 1):
  """The training objective of a model's outputs: `set_loss` of the one-to-one queries (Group DETR
  groups included), plus, when the outputs have a "one_to_many" branch (H-DETR, Jia et al.,
  "DETRs with Hybrid Matching"), `loss_config.one_to_many_weight` times the set loss of that
  branch against the targets repeated `loss_config.one_to_many_k` times, matched with the same
  matcher. The branch's terms are logged with an "o2m_" prefix. With a "denoising" branch
  (DN-DETR, Li et al., "DN-DETR: Accelerate DETR Training by Introducing Query DeNoising"; G
  groups of one query per target slot), `loss_config.denoising_weight` times its set loss with
  query m of each group assigned target slot m (no matching), the mean over groups; logged with
  a "dn_" prefix.
  """
  total, metrics = set_loss(outputs, targets, loss_config, axis_name, num_query_groups)
  if "one_to_many" in outputs:
    k = int(loss_config.get("one_to_many_k", 6))
    weight = float(loss_config.get("one_to_many_weight", 1.0))
    if k < 1:
      raise ValueError(f"config.loss.one_to_many_k={k}: use 1 or more.")
    o2m_total, o2m_metrics = set_loss(outputs["one_to_many"], one_to_many_targets(targets, k),
                                      loss_config, axis_name)
    total = total + weight * o2m_total
    metrics.update({f"o2m_{name}": value for name, value in o2m_metrics.items()})
  if "denoising" in outputs:
    num_denoising, slots = outputs["denoising"]["pred_logits"].shape[1], targets["labels"].shape[1]
    if num_denoising % slots:
      raise ValueError(f"{num_denoising} denoising queries are not groups of one query per each "
                       f"of the {slots} target slots.")
    dn_total, dn_metrics = set_loss(outputs["denoising"], targets, loss_config, axis_name,
                                    num_query_groups=num_denoising // slots,
                                    fixed_assignment=True)
    total = total + float(loss_config.get("denoising_weight", 1.0)) * dn_total
    metrics.update({f"dn_{name}": value for name, value in dn_metrics.items()})
  return total, metrics
