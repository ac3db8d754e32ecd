"""Tests for detr_jax.losses: parity with Hugging Face's copies of the DETR, Deformable DETR and
RT-DETR losses (values and gradients), multi-device normalisation, and NaN safety."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec as P
from transformers.loss import loss_deformable_detr as hf_deformable
from transformers.loss import loss_for_object_detection as hf_loss
from transformers.loss import loss_rt_detr as hf_rt_detr

from detr_jax import losses

NUM_CLASSES = 5  # logits have NUM_CLASSES + 1 entries, the last is no-object
TERMS = ("loss_ce", "loss_bbox", "loss_giou")
WEIGHTS = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def _loss_config(**overrides):
  config = ml_collections.ConfigDict(dict(
      matcher="hungarian_host", class_cost_type="softmax", cost_class=1.0, cost_bbox=5.0,
      cost_giou=2.0, label_loss="softmax_ce", eos_coef=0.1, ce_loss_coef=1.0,
      bbox_loss_coef=5.0, giou_loss_coef=2.0, focal_alpha=0.25, focal_gamma=2.0, aux_loss=True))
  config.update(overrides)
  return config


def _random_batch(seed, layers=3, batch=3, queries=10, slots=6):
  """Random outputs of `layers` decoder layers and padded targets with the usual edge cases."""
  rng = np.random.default_rng(seed)
  logits = (rng.normal(size=(layers, batch, queries, NUM_CLASSES + 1)) * 2).astype(np.float32)
  boxes = np.concatenate([rng.uniform(0.2, 0.8, size=(layers, batch, queries, 2)),
                          rng.uniform(0.02, 0.5, size=(layers, batch, queries, 2))], -1)
  labels = rng.integers(0, NUM_CLASSES, size=(batch, slots)).astype(np.int32)
  target_boxes = np.concatenate([rng.uniform(0.2, 0.8, size=(batch, slots, 2)),
                                 rng.uniform(0.05, 0.4, size=(batch, slots, 2))], -1)
  valid = rng.uniform(size=(batch, slots)) < 0.7
  valid[0, :2] = [True, False]  # padding between real boxes
  if batch > 2:
    valid[1, 0] = True
    target_boxes[1, 0, 2:] = 1e-4  # a tiny box
    valid[2] = False  # an image without boxes
  labels[~valid] = 0
  target_boxes[~valid] = 0.0
  targets = {"labels": labels, "boxes": target_boxes.astype(np.float32), "valid": valid}
  return logits, boxes.astype(np.float32), targets


def _outputs(logits, boxes):
  return {"pred_logits": logits[-1], "pred_boxes": boxes[-1],
          "aux_outputs": [{"pred_logits": l, "pred_boxes": b}
                          for l, b in zip(logits[:-1], boxes[:-1])]}


def _hf_targets(targets):
  """HF takes a list of per-image dicts of the real boxes (an empty tensor for no boxes)."""
  return [{"class_labels": torch.tensor(labels[valid], dtype=torch.int64),
           "boxes": torch.tensor(boxes[valid])}
          for labels, boxes, valid in zip(targets["labels"], targets["boxes"], targets["valid"])]


def _hf_outputs(logits, boxes):
  """Leaf tensors requiring grad, in HF's layout (final output + auxiliary_outputs)."""
  logits = [torch.tensor(l, requires_grad=True) for l in logits]
  boxes = [torch.tensor(b, requires_grad=True) for b in boxes]
  outputs = {"logits": logits[-1], "pred_boxes": boxes[-1],
             "auxiliary_outputs": [{"logits": l, "pred_boxes": b}
                                   for l, b in zip(logits[:-1], boxes[:-1])]}
  return outputs, logits, boxes


def _official_class_error(logits, indices, hf_targets):
  """Official class_error (100 - top-1 accuracy of matched queries) from HF's matching."""
  predicted = torch.cat([logits[i, source].argmax(-1) for i, (source, _) in enumerate(indices)])
  expected = torch.cat([t["class_labels"][j] for t, (_, j) in zip(hf_targets, indices)])
  if expected.numel() == 0:
    return 100.0
  return 100.0 - 100.0 * (predicted == expected).float().mean().item()


def _jax_loss_and_grads(logits, boxes, targets, config, with_aux=True):
  def loss_fn(logits, boxes):
    outputs = _outputs(logits, boxes) if with_aux else {"pred_logits": logits[-1],
                                                        "pred_boxes": boxes[-1]}
    return losses.set_loss(outputs, targets, config)

  (total, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(
      logits, boxes)
  return total, metrics, grads


def _assert_close(got, expected, name):
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6,
                             err_msg=name)


@pytest.mark.parametrize("matcher", ["hungarian_host", "hungarian_device"])
def test_detr_loss_and_gradients_equal_reference(matcher):
  logits, boxes, targets = _random_batch(0)
  total, metrics, (grad_logits, grad_boxes) = _jax_loss_and_grads(
      logits, boxes, targets, _loss_config(matcher=matcher))

  matcher_ref = hf_loss.HungarianMatcher(class_cost=1.0, bbox_cost=5.0, giou_cost=2.0)
  criterion = hf_loss.ImageLoss(matcher_ref, num_classes=NUM_CLASSES, eos_coef=0.1,
                                losses=["labels", "boxes", "cardinality"])
  hf_outputs, hf_logits, hf_boxes = _hf_outputs(logits, boxes)
  hf_targets = _hf_targets(targets)
  expected = criterion(hf_outputs, hf_targets)
  num_aux = len(logits) - 1
  suffixes = [""] + [f"_{i}" for i in range(num_aux)]
  assert set(metrics) == {name + s for s in suffixes for name in TERMS + (
      "cardinality_error", "class_error")}
  for suffix in suffixes:
    for name in TERMS + ("cardinality_error",):
      _assert_close(metrics[name + suffix], expected[name + suffix].item(), name + suffix)
  expected_total = sum(WEIGHTS[name] * expected[name + s] for s in suffixes for name in TERMS)
  _assert_close(total, expected_total.item(), "total")

  # class_error from the reference matching of each output, with the official formula.
  for layer, suffix in enumerate([f"_{i}" for i in range(num_aux)] + [""]):
    indices = matcher_ref({"logits": hf_logits[layer].detach(),
                           "pred_boxes": hf_boxes[layer].detach()}, hf_targets)
    _assert_close(metrics["class_error" + suffix],
                  _official_class_error(hf_logits[layer].detach(), indices, hf_targets),
                  "class_error" + suffix)

  expected_total.backward()
  for layer in range(len(logits)):
    np.testing.assert_allclose(grad_logits[layer], hf_logits[layer].grad.numpy(),
                               rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(grad_boxes[layer], hf_boxes[layer].grad.numpy(),
                               rtol=1e-4, atol=1e-7)


def test_sigmoid_focal_loss_equals_deformable_detr_reference():
  logits, boxes, targets = _random_batch(1)
  config = _loss_config(label_loss="sigmoid_focal", class_cost_type="focal", cost_class=2.0)
  total, metrics, (grad_logits, grad_boxes) = _jax_loss_and_grads(logits, boxes, targets, config)

  matcher_ref = hf_deformable.DeformableDetrHungarianMatcher(
      class_cost=2.0, bbox_cost=5.0, giou_cost=2.0)
  criterion = hf_deformable.DeformableDetrImageLoss(
      matcher_ref, num_classes=NUM_CLASSES, focal_alpha=0.25,
      losses=["labels", "boxes", "cardinality"])
  # Deformable DETR has no no-object logit: the reference sees the real-class logits.
  hf_outputs, hf_logits, hf_boxes = _hf_outputs(logits[..., :-1], boxes)
  expected = criterion(hf_outputs, _hf_targets(targets))
  suffixes = [""] + [f"_{i}" for i in range(len(logits) - 1)]
  for suffix in suffixes:
    for name in TERMS + ("cardinality_error",):
      _assert_close(metrics[name + suffix], expected[name + suffix].item(), name + suffix)
  expected_total = sum(WEIGHTS[name] * expected[name + s] for s in suffixes for name in TERMS)
  _assert_close(total, expected_total.item(), "total")
  expected_total.backward()
  for layer in range(len(logits)):
    np.testing.assert_allclose(grad_logits[layer][..., :-1], hf_logits[layer].grad.numpy(),
                               rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(grad_logits[layer][..., -1], 0.0)  # no-object logit unused
    np.testing.assert_allclose(grad_boxes[layer], hf_boxes[layer].grad.numpy(),
                               rtol=1e-4, atol=1e-7)


def test_varifocal_loss_equals_rt_detr_reference():
  logits, boxes, targets = _random_batch(2, layers=1)
  config = _loss_config(label_loss="varifocal", class_cost_type="focal", cost_class=2.0,
                        varifocal_alpha=0.75)
  total, metrics, (grad_logits, _) = _jax_loss_and_grads(
      logits, boxes, targets, config, with_aux=False)

  rt_config = transformers.RTDetrConfig(
      num_labels=NUM_CLASSES, use_focal_loss=True, matcher_alpha=0.25, matcher_gamma=2.0,
      matcher_class_cost=2.0, matcher_bbox_cost=5.0, matcher_giou_cost=2.0,
      focal_loss_alpha=0.75, focal_loss_gamma=2.0)
  criterion = hf_rt_detr.RTDetrLoss(rt_config)
  hf_outputs, hf_logits, _ = _hf_outputs(logits[..., :-1], boxes)
  hf_targets = _hf_targets(targets)
  indices = criterion.matcher(hf_outputs, hf_targets)
  num_boxes = max(float(targets["valid"].sum()), 1.0)
  expected = criterion.loss_labels_vfl(hf_outputs, hf_targets, indices, num_boxes)
  expected.update(criterion.loss_boxes(hf_outputs, hf_targets, indices, num_boxes))
  _assert_close(metrics["loss_ce"], expected["loss_vfl"].item(), "loss_vfl")
  for name in ("loss_bbox", "loss_giou"):
    _assert_close(metrics[name], expected[name].item(), name)
  expected["loss_vfl"].backward()
  # Only loss_ce depends on the logits, so the total's logit gradient is the vfl gradient.
  np.testing.assert_allclose(grad_logits[0][..., :-1], hf_logits[0].grad.numpy(),
                             rtol=1e-4, atol=1e-7)
  assert np.isfinite(total)


def test_num_boxes_is_global_average_under_shard_map_and_vmap():
  """Per device: box sums over the global box count / device count (`SetCriterion.forward`)."""
  num_devices = 8
  logits, boxes, targets = _random_batch(3, layers=2, batch=num_devices, queries=6, slots=4)
  config = _loss_config(matcher="hungarian_host")
  outputs = _outputs(logits, boxes)

  def per_device(outputs, targets):
    total, metrics = losses.set_loss(outputs, targets, config, axis_name="data")
    return total[None], {k: v[None] for k, v in metrics.items()}

  mesh = jax.make_mesh((num_devices,), ("data",), devices=jax.devices())
  out_sharding = jax.sharding.NamedSharding(mesh, P(None, "data"))
  batch_sharding = jax.sharding.NamedSharding(mesh, P("data"))
  sharded_outputs = {"pred_logits": jax.device_put(logits[-1], batch_sharding),
                     "pred_boxes": jax.device_put(boxes[-1], batch_sharding),
                     "aux_outputs": [{"pred_logits": jax.device_put(logits[:-1], out_sharding)[0],
                                      "pred_boxes": jax.device_put(boxes[:-1], out_sharding)[0]}]}
  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P("data")),
                                  out_specs=P("data")))
  sharded_total, sharded_metrics = sharded(sharded_outputs,
                                           jax.device_put(targets, batch_sharding))

  # The same split emulated with vmap over a named axis on one device.
  split = lambda x: x.reshape((num_devices, -1) + x.shape[1:])
  vmapped_total, vmapped_metrics = jax.jit(jax.vmap(
      lambda o, t: losses.set_loss(o, t, config, axis_name="data"), axis_name="data"))(
          jax.tree.map(split, outputs), jax.tree.map(split, targets))
  np.testing.assert_allclose(sharded_total, vmapped_total, rtol=1e-6)
  for name, values in vmapped_metrics.items():
    np.testing.assert_allclose(sharded_metrics[name], values, rtol=1e-6, atol=1e-6,
                               err_msg=name)

  # Closed form against the reference run on each device's images alone (num_boxes local).
  global_average = max(targets["valid"].sum() / num_devices, 1.0)
  matcher_ref = hf_loss.HungarianMatcher(class_cost=1.0, bbox_cost=5.0, giou_cost=2.0)
  criterion = hf_loss.ImageLoss(matcher_ref, num_classes=NUM_CLASSES, eos_coef=0.1,
                                losses=["labels", "boxes", "cardinality"])
  for device in range(num_devices):
    chunk = jax.tree.map(lambda x: x[device:device + 1], targets)
    hf_outputs, _, _ = _hf_outputs(logits[:, device:device + 1], boxes[:, device:device + 1])
    expected = criterion(hf_outputs, _hf_targets(chunk))
    local = max(float(chunk["valid"].sum()), 1.0)
    for suffix in ("", "_0"):
      _assert_close(vmapped_metrics["loss_bbox" + suffix][device],
                    expected["loss_bbox" + suffix].item() * local / global_average, "bbox")
      _assert_close(vmapped_metrics["loss_giou" + suffix][device],
                    expected["loss_giou" + suffix].item() * local / global_average, "giou")
      # The weighted CE is a per-device mean over weights: num_boxes does not enter.
      _assert_close(vmapped_metrics["loss_ce" + suffix][device],
                    expected["loss_ce" + suffix].item(), "ce")


@pytest.mark.parametrize("label_loss", ["softmax_ce", "sigmoid_focal", "varifocal"])
@pytest.mark.parametrize("case", ["zero_width_boxes", "all_padded"])
def test_gradients_are_finite_on_degenerate_inputs(label_loss, case):
  logits, boxes, targets = _random_batch(4, layers=2)
  if case == "zero_width_boxes":
    boxes[..., 2] = 0.0
    boxes[0, 0, :, 3] = 0.0  # some predictions are points
    targets["boxes"][..., 2] = 0.0
    targets["valid"][:] = True
  else:
    targets["valid"][:] = False
  config = _loss_config(label_loss=label_loss)
  total, metrics, grads = _jax_loss_and_grads(logits, boxes, targets, config)
  assert np.isfinite(total)
  assert all(np.isfinite(v) for v in metrics.values()), metrics
  for grad in grads:
    assert np.all(np.isfinite(grad))
  if case == "all_padded":
    assert metrics["loss_bbox"] == 0.0 and metrics["loss_giou"] == 0.0
    assert metrics["class_error"] == 100.0
    np.testing.assert_array_equal(grads[1], 0.0)  # nothing is matched: no box gradient


@pytest.mark.parametrize("label_loss", ["softmax_ce", "sigmoid_focal"])
def test_gradient_agrees_with_finite_differences_in_float64(label_loss):
  logits, boxes, targets = _random_batch(5, layers=2, batch=2, queries=4, slots=3)
  config = _loss_config(label_loss=label_loss, class_cost_type="softmax")
  with jax.enable_x64(True):
    logits64, boxes64 = jnp.asarray(logits, jnp.float64), jnp.asarray(boxes, jnp.float64)

    @jax.jit
    def total(logits, boxes):
      # set_loss computes in float32; the finite difference needs the whole chain in float64.
      return _float64_loss(logits, boxes, targets, config)

    grad_logits, grad_boxes = jax.jit(jax.grad(total, argnums=(0, 1)))(logits64, boxes64)
    rng = np.random.default_rng(0)
    direction_logits = jnp.asarray(rng.normal(size=logits.shape))
    direction_boxes = jnp.asarray(rng.normal(size=boxes.shape)) * 0.1
    eps = 1e-6
    difference = (total(logits64 + eps * direction_logits, boxes64 + eps * direction_boxes)
                  - total(logits64 - eps * direction_logits, boxes64 - eps * direction_boxes))
    numeric = difference / (2 * eps)
    analytic = jnp.sum(grad_logits * direction_logits) + jnp.sum(grad_boxes * direction_boxes)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6)


def _float64_loss(logits, boxes, targets, config):
  """set_loss's terms in float64: the matched queries are fixed by the float32 matching."""
  from detr_jax import matching  # pylint: disable=g-import-not-at-top
  targets64 = {"labels": jnp.asarray(targets["labels"]), "valid": jnp.asarray(targets["valid"]),
               "boxes": jnp.asarray(targets["boxes"], jnp.float64)}
  match_indices = matching.match(logits.astype(jnp.float32), boxes.astype(jnp.float32),
                                 targets, config)
  num_boxes = jnp.maximum(jnp.sum(targets64["valid"]), 1).astype(jnp.float64)
  total = 0.0
  for layer in range(logits.shape[0]):
    terms = losses._output_losses(logits[layer], boxes[layer], match_indices[layer], targets64,
                                  num_boxes, config)
    total += sum(WEIGHTS[name] * terms[name] for name in TERMS)
  return total


def test_aux_loss_off_uses_the_final_output_only():
  logits, boxes, targets = _random_batch(6)
  loss_fn = lambda config: jax.jit(lambda o: losses.set_loss(o, targets, config))
  with_aux_total, with_aux = loss_fn(_loss_config())(_outputs(logits, boxes))
  total, metrics = loss_fn(_loss_config(aux_loss=False))(_outputs(logits, boxes))
  assert set(metrics) == set(TERMS) | {"cardinality_error", "class_error"}
  for name in metrics:
    _assert_close(metrics[name], with_aux[name], name)
  _assert_close(total, sum(WEIGHTS[name] * metrics[name] for name in TERMS), "total")
  assert with_aux_total > total


def test_bad_inputs_raise_value_error():
  logits, boxes, targets = _random_batch(7, layers=1)
  outputs = _outputs(logits, boxes)
  with pytest.raises(ValueError, match="label_loss"):
    losses.set_loss(outputs, targets, _loss_config(label_loss="hinge"))
  with pytest.raises(ValueError, match="targets shapes"):
    losses.set_loss(outputs, dict(targets, boxes=targets["boxes"][..., :2]), _loss_config())
  with pytest.raises(ValueError, match="lacks 'valid'"):
    losses.set_loss(outputs, {"labels": targets["labels"], "boxes": targets["boxes"]},
                    _loss_config())
  bad_labels = targets["labels"].copy()
  bad_labels[0, 0] = NUM_CLASSES  # the no-object id is not a valid target label
  with pytest.raises(ValueError, match="labels must lie"):
    losses.set_loss(outputs, dict(targets, labels=bad_labels), _loss_config())
