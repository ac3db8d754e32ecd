"""Box conversions, IoU and generalized IoU (GIoU) for the matching cost and the set loss.

The formulas are those of the official DETR `util/box_ops.py`, so values are equal to the
PyTorch ones for ordinary boxes. Unlike the official code they never assert (that cannot run
inside `jax.jit`) and never produce NaN or inf, in values or in gradients, on degenerate boxes
(zero width or height) or on padding boxes: a division whose denominator is not positive
returns 0, through the "double where" pattern so the unused branch cannot poison the gradient.
No epsilon is added anywhere, which keeps ordinary values exactly those of PyTorch.

Boxes are float arrays whose last axis has 4 entries: `cxcywh` (centre x, centre y, width,
height) or `xyxy` (x0, y0, x1, y1). Leading axes are free.
"""

import jax.numpy as jnp


def box_cxcywh_to_xyxy(boxes: jnp.ndarray) -> jnp.ndarray:
  """Converts (cx, cy, w, h) boxes to (x0, y0, x1, y1).

  Args:
    boxes: [..., 4] boxes in cxcywh.

  Returns:
    [..., 4] boxes in xyxy.
  """
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def box_xyxy_to_cxcywh(boxes: jnp.ndarray) -> jnp.ndarray:
  """Converts (x0, y0, x1, y1) boxes to (cx, cy, w, h).

  Args:
    boxes: [..., 4] boxes in xyxy.

  Returns:
    [..., 4] boxes in cxcywh.
  """
  x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def box_area(boxes: jnp.ndarray) -> jnp.ndarray:
  """Area of xyxy boxes: (x1 - x0) * (y1 - y0), as the official code (no clamping).

  Args:
    boxes: [..., 4] boxes in xyxy.

  Returns:
    [...] areas.
  """
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _safe_divide(numerator: jnp.ndarray, denominator: jnp.ndarray) -> jnp.ndarray:
  """numerator / denominator where denominator > 0, else 0; finite gradients everywhere."""
  positive = denominator > 0
  # The inner where keeps the discarded branch finite, so its (masked) gradient is finite too.
  safe_denominator = jnp.where(positive, denominator, 1.0)
  return jnp.where(positive, numerator / safe_denominator, 0.0)


def _iou_and_union(boxes1, boxes2):
  """IoU and union of broadcastable xyxy boxes [..., 4]."""
  area1 = box_area(boxes1)
  area2 = box_area(boxes2)
  left_top = jnp.maximum(boxes1[..., :2], boxes2[..., :2])
  right_bottom = jnp.minimum(boxes1[..., 2:], boxes2[..., 2:])
  width_height = jnp.maximum(right_bottom - left_top, 0.0)
  intersection = width_height[..., 0] * width_height[..., 1]
  union = area1 + area2 - intersection
  return _safe_divide(intersection, union), union


def _generalized_iou(boxes1, boxes2):
  """GIoU of broadcastable xyxy boxes [..., 4]."""
  iou, union = _iou_and_union(boxes1, boxes2)
  top_left = jnp.minimum(boxes1[..., :2], boxes2[..., :2])
  bottom_right = jnp.maximum(boxes1[..., 2:], boxes2[..., 2:])
  width_height = jnp.maximum(bottom_right - top_left, 0.0)
  enclosing_area = width_height[..., 0] * width_height[..., 1]
  return iou - _safe_divide(enclosing_area - union, enclosing_area)


def box_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray):
  """Pairwise IoU and union of two sets of xyxy boxes (official `box_iou`).

  Args:
    boxes1: [..., N, 4] boxes in xyxy.
    boxes2: [..., M, 4] boxes in xyxy.

  Returns:
    (iou, union), each [..., N, M]. IoU is 0 where the union is not positive.
  """
  return _iou_and_union(boxes1[..., :, None, :], boxes2[..., None, :, :])


def generalized_box_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> jnp.ndarray:
  """Pairwise generalized IoU (https://giou.stanford.edu/) of two sets of xyxy boxes.

  Args:
    boxes1: [..., N, 4] boxes in xyxy.
    boxes2: [..., M, 4] boxes in xyxy.

  Returns:
    [..., N, M] GIoU in [-1, 1]. The enclosing-box term is 0 where the enclosing box has no area.
  """
  return _generalized_iou(boxes1[..., :, None, :], boxes2[..., None, :, :])


def elementwise_box_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> jnp.ndarray:
  """IoU of matched pairs of xyxy boxes (the diagonal of `box_iou`, without the N x M work).

  Args:
    boxes1: [..., 4] boxes in xyxy.
    boxes2: [..., 4] boxes in xyxy, same leading shape (or broadcastable).

  Returns:
    [...] IoU.
  """
  return _iou_and_union(boxes1, boxes2)[0]


def elementwise_generalized_box_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> jnp.ndarray:
  """GIoU of matched pairs of xyxy boxes (the diagonal of `generalized_box_iou`).

  Args:
    boxes1: [..., 4] boxes in xyxy.
    boxes2: [..., 4] boxes in xyxy, same leading shape (or broadcastable).

  Returns:
    [...] GIoU.
  """
  return _generalized_iou(boxes1, boxes2)
