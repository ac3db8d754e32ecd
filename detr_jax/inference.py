"""The model at inference: official DETR post-processing and the jitted, sharded predict step.

Shared by evaluation (`detr_jax.evaluate`), prediction on your own images (`detr_jax.predict`)
and the TPU planner. Post-processing is the official one (`models/detr.py`, `PostProcess.forward`,
in facebookresearch/detr at commit 29901c5): softmax over the classes, drop the "no object"
column, score = max probability, label = its argmax, boxes cxcywh -> xyxy scaled by the original
image size; no threshold, no NMS, every query is a detection.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from detr_jax import losses
from detr_jax import parallel
from detr_jax.models import conv as conv_lib


def label_activation(config: ml_collections.ConfigDict) -> str:
  """"softmax" or "sigmoid": how the config's label loss turns logits into scores."""
  return losses.get_label_loss(config.loss.get("label_loss", "softmax_ce")).activation


def postprocess(pred_logits, pred_boxes, orig_size, activation: str = "softmax"):
  """Turns raw DETR outputs into scored detections (official PostProcess).

  Works on numpy or jax arrays.

  Args:
    pred_logits: [batch, queries, num_classes + 1]; the last class is "no object".
    pred_boxes: [batch, queries, 4] cxcywh in [0, 1] of the unpadded image.
    orig_size: [batch, 2] (height, width) of the original images.
    activation: "softmax" (official) or "sigmoid" (models trained with a sigmoid label loss,
      e.g. sigmoid_focal: independent scores of the real classes). See `losses.LabelLoss`.

  Returns:
    (scores [batch, queries], labels [batch, queries] int32, boxes [batch, queries, 4] xyxy in
    original pixels).
  """
  pred_logits = jnp.asarray(pred_logits, jnp.float32)
  if activation == "softmax":
    prob = jax.nn.softmax(pred_logits, axis=-1)[..., :-1]
  elif activation == "sigmoid":
    prob = jax.nn.sigmoid(pred_logits[..., :-1])
  else:
    raise ValueError(f"Unknown activation {activation!r}; use 'softmax' or 'sigmoid'.")
  scores = prob.max(axis=-1)
  labels = prob.argmax(axis=-1).astype(jnp.int32)
  cx, cy, w, h = jnp.moveaxis(jnp.asarray(pred_boxes, jnp.float32), -1, 0)
  xyxy = jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)
  height, width = jnp.moveaxis(jnp.asarray(orig_size, jnp.float32), -1, 0)
  scale = jnp.stack([width, height, width, height], axis=-1)[:, None, :]
  return scores, labels, xyxy * scale


def make_predict_fn(model, mesh, activation: str = "softmax",
                    attention: bool = False) -> Callable[..., Any]:
  """Returns a jitted fn(variables, images, pixel_mask, orig_size) -> (scores, labels, boxes).

  Inputs and outputs are sharded on the mesh axis "data", variables replicated; `activation` as
  in `postprocess`. With `attention`, two more outputs: the last decoder layer's cross-attention
  weights, mean over heads, float32 [batch, queries, h, w] on the backbone's feature grid, and
  its mask bool [batch, h, w] (True on cells of the unpadded image); the model computes them only
  in this mode (`models.DETR.__call__`).
  """
  data, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)

  def predict(variables, images, pixel_mask, orig_size):
    outputs = model.apply(variables, images, pixel_mask, train=False,
                          capture_attention=attention)
    detections = postprocess(outputs["pred_logits"], outputs["pred_boxes"], orig_size, activation)
    if attention:
      return (*detections, outputs["attention"], outputs["feature_mask"])
    return detections

  num_outputs = 5 if attention else 3
  return jax.jit(predict, in_shardings=(replicated, data, data, data),
                 out_shardings=(data,) * num_outputs,
                 compiler_options=conv_lib.program_compiler_options(model, mesh))
