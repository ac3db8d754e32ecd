"""Tests for detr_jax.box_ops: closed forms, parity with the PyTorch reference, NaN safety."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.image_transforms import center_to_corners_format
from transformers.loss import loss_for_object_detection as hf_loss

from detr_jax import box_ops


def _random_cxcywh(rng, n):
  centres = rng.uniform(0.1, 0.9, size=(n, 2))
  sizes = rng.uniform(0.01, 0.5, size=(n, 2))
  return np.concatenate([centres, sizes], -1).astype(np.float32)


def test_conversions_closed_form_and_round_trip():
  cxcywh = np.array([[0.5, 0.4, 0.2, 0.6]], np.float32)
  xyxy = box_ops.box_cxcywh_to_xyxy(cxcywh)
  np.testing.assert_allclose(xyxy, [[0.4, 0.1, 0.6, 0.7]], atol=1e-7)
  np.testing.assert_allclose(box_ops.box_area(xyxy), [0.12], rtol=1e-6)
  boxes = _random_cxcywh(np.random.default_rng(0), 20)
  round_trip = box_ops.box_xyxy_to_cxcywh(box_ops.box_cxcywh_to_xyxy(boxes))
  np.testing.assert_allclose(round_trip, boxes, atol=1e-6)
  np.testing.assert_allclose(box_ops.box_cxcywh_to_xyxy(boxes),
                             center_to_corners_format(torch.from_numpy(boxes)).numpy(), atol=1e-7)


def test_iou_and_giou_closed_form():
  unit = np.array([[0.0, 0.0, 1.0, 1.0]], np.float32)
  shifted = np.array([[0.5, 0.0, 1.5, 1.0]], np.float32)  # overlap 0.5, union 1.5
  apart = np.array([[2.0, 0.0, 3.0, 1.0]], np.float32)  # no overlap, enclosing area 3, union 2
  iou, union = box_ops.box_iou(unit, np.concatenate([unit, shifted, apart]))
  np.testing.assert_allclose(iou, [[1.0, 1 / 3, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(union, [[1.0, 1.5, 2.0]], rtol=1e-6)
  giou = box_ops.generalized_box_iou(unit, np.concatenate([unit, shifted, apart]))
  np.testing.assert_allclose(giou, [[1.0, 1 / 3, -1 / 3]], rtol=1e-6)


def test_pairwise_matches_torch_reference_and_elementwise_is_diagonal():
  rng = np.random.default_rng(1)
  boxes1 = box_ops.box_cxcywh_to_xyxy(_random_cxcywh(rng, 7))
  boxes2 = box_ops.box_cxcywh_to_xyxy(_random_cxcywh(rng, 5))
  torch1, torch2 = torch.tensor(np.array(boxes1)), torch.tensor(np.array(boxes2))
  expected_iou, expected_union = hf_loss.box_iou(torch1, torch2)
  iou, union = box_ops.box_iou(boxes1, boxes2)
  np.testing.assert_allclose(iou, expected_iou.numpy(), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(union, expected_union.numpy(), rtol=1e-6)
  giou = box_ops.generalized_box_iou(boxes1, boxes2)
  np.testing.assert_allclose(giou, hf_loss.generalized_box_iou(torch1, torch2).numpy(),
                             rtol=1e-6, atol=1e-7)
  # Elementwise on the first five pairs equals the diagonal of the pairwise matrix.
  np.testing.assert_allclose(box_ops.elementwise_generalized_box_iou(boxes1[:5], boxes2),
                             np.diag(np.asarray(giou)[:5]), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(box_ops.elementwise_box_iou(boxes1[:5], boxes2),
                             np.diag(np.asarray(iou)[:5]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", ["zero_width", "zero_both", "padding_zeros", "same_point"])
def test_degenerate_boxes_give_finite_values_and_gradients(case):
  pred = np.array([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]], np.float32)
  target = np.array([[0.5, 0.5, 0.2, 0.3], [0.6, 0.6, 0.2, 0.2]], np.float32)
  if case == "zero_width":
    pred[:, 2] = 0.0
  elif case == "zero_both":
    pred[:, 2:] = 0.0
    target[:, 2:] = 0.0
  elif case == "padding_zeros":
    pred[:] = 0.0
    target[:] = 0.0
  else:  # Zero-size boxes on the same point: empty union and empty enclosing box.
    pred[:] = [0.5, 0.5, 0.0, 0.0]
    target[:] = [0.5, 0.5, 0.0, 0.0]

  def total(pred, target):
    p, t = box_ops.box_cxcywh_to_xyxy(pred), box_ops.box_cxcywh_to_xyxy(target)
    return (box_ops.generalized_box_iou(p, t).sum() + box_ops.box_iou(p, t)[0].sum()
            + box_ops.elementwise_generalized_box_iou(p, t).sum())

  value, grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(pred, target)
  assert np.isfinite(value)
  for grad in grads:
    assert np.all(np.isfinite(grad)), grad
  giou = box_ops.generalized_box_iou(box_ops.box_cxcywh_to_xyxy(pred),
                                     box_ops.box_cxcywh_to_xyxy(target))
  assert np.all(np.asarray(giou) >= -1.0) and np.all(np.asarray(giou) <= 1.0)


def test_zero_width_box_matches_torch_where_torch_is_defined():
  # A zero-width prediction against a real box: the union is positive, so torch is defined.
  pred = jnp.array([[0.4, 0.4, 0.4, 0.6]], jnp.float32)  # xyxy, zero width
  target = jnp.array([[0.3, 0.3, 0.5, 0.7]], jnp.float32)
  expected = hf_loss.generalized_box_iou(torch.tensor(np.asarray(pred)),
                                         torch.tensor(np.asarray(target))).numpy()
  np.testing.assert_allclose(box_ops.generalized_box_iou(pred, target), expected, rtol=1e-6)
