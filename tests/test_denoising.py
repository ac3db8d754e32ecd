"""DN-DETR's denoising queries (`config.model.denoising_groups`, on anchor-point queries): in
training, G groups of one query per target slot, anchored near the target's centre and carrying
its (possibly flipped) label's embedding, each trained to reconstruct its own target without
matching.

Closed forms: with no noise and a zero box head, a denoising query's box is its target's centre
with width and height sigmoid(0) = 0.5; the model's own queries never see the denoising ones, so
their outputs equal the outputs without denoising; G identical groups give the loss of one; the
fixed-assignment loss equals L1 / GIoU / weighted cross-entropy computed here by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from configs import tiny_test
from detr_jax import box_ops
from detr_jax import checkpointing
from detr_jax import losses
from detr_jax import models
import train_steps

RNGS = {"dropout": jax.random.PRNGKey(1), "denoising": jax.random.PRNGKey(2)}


def _config(groups=2, box_noise=0.4, label_noise=0.2, **model):
  config = tiny_test.get_config()
  config.model.query_anchors = True
  config.model.denoising_groups = groups
  config.model.denoising_box_noise = box_noise
  config.model.denoising_label_noise = label_noise
  for key, value in model.items():
    config.model[key] = value
  return config


def _inputs(batch=2):
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch, 64, 64, 3)), jnp.float32)
  mask = np.ones((batch, 64, 64), bool)
  mask[1, :, 40:] = False
  return images, jnp.asarray(mask)


def _targets(batch=2, slots=8, seed=1):
  rng = np.random.default_rng(seed)
  valid = np.zeros((batch, slots), bool)
  valid[0, :3] = True
  valid[1, :5] = True
  boxes = np.concatenate([rng.uniform(0.3, 0.7, (batch, slots, 2)),
                          rng.uniform(0.1, 0.3, (batch, slots, 2))], -1)
  boxes[~valid] = 0.0  # the input pipeline's padding
  return {"labels": jnp.asarray(rng.integers(0, 6, (batch, slots)), jnp.int32),
          "boxes": jnp.asarray(boxes, jnp.float32), "valid": jnp.asarray(valid)}


def _init(config):
  model = models.build_model(config.model)
  images, mask = _inputs()
  return model, model.init(jax.random.PRNGKey(0), images, mask), images, mask


def _zero_box_head(variables):
  params = jax.tree_util.tree_map(lambda x: x, variables["params"])
  last = params["bbox_embed"]["layers_2"]
  last["kernel"] = jnp.zeros_like(last["kernel"])
  last["bias"] = jnp.zeros_like(last["bias"])
  return {**variables, "params": params}


def test_noiseless_denoising_boxes_sit_on_their_targets():
  config = _config(groups=3, box_noise=0.0, label_noise=0.0)
  model, variables, images, mask = _init(config)
  variables = _zero_box_head(variables)
  targets = _targets()
  out = model.apply(variables, images, mask, train=True, targets=targets, rngs=RNGS)
  slots = targets["labels"].shape[1]
  dn = out["denoising"]
  assert dn["pred_boxes"].shape == (2, 3 * slots, 4)
  assert len(dn["aux_outputs"]) == config.model.dec_layers - 1
  want = np.tile(np.clip(np.asarray(targets["boxes"][..., :2]), 1e-3, 1 - 1e-3), (1, 3, 1))
  for boxes in [dn["pred_boxes"]] + [aux["pred_boxes"] for aux in dn["aux_outputs"]]:
    np.testing.assert_allclose(np.asarray(boxes[..., :2]), want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(boxes[..., 2:]), 0.5, atol=1e-6)
  # Without noise the groups are the same queries, and no group sees another: equal outputs.
  logits = np.asarray(dn["pred_logits"]).reshape(2, 3, slots, -1)
  np.testing.assert_allclose(logits[:, 1], logits[:, 0], atol=1e-5)
  np.testing.assert_allclose(logits[:, 2], logits[:, 0], atol=1e-5)


def test_box_noise_stays_within_its_scale_and_varies_by_key():
  config = _config(groups=4, box_noise=0.4, label_noise=0.0)
  model, variables, images, mask = _init(config)
  variables = _zero_box_head(variables)
  targets = _targets()
  out = model.apply(variables, images, mask, train=True, targets=targets, rngs=RNGS)
  centres = np.asarray(out["denoising"]["pred_boxes"][..., :2]).reshape(2, 4, 8, 2)
  valid = np.asarray(targets["valid"])
  boxes = np.asarray(targets["boxes"])[valid][:, None]  # [n, 1, 4]
  shift = np.abs(centres.transpose(0, 2, 1, 3)[valid] - boxes[..., :2]) / (boxes[..., 2:] / 2)
  assert shift.shape == (valid.sum(), 4, 2)
  assert np.all(shift <= 0.4 + 1e-4) and np.all(shift > 0)  # moved, within the noise scale
  other = model.apply(variables, images, mask, train=True, targets=targets,
                      rngs={**RNGS, "denoising": jax.random.PRNGKey(3)})
  assert np.abs(np.asarray(other["denoising"]["pred_boxes"] -
                           out["denoising"]["pred_boxes"])).max() > 1e-3


def test_the_models_own_queries_never_see_the_denoising_ones():
  with_dn = _config(groups=2, num_query_groups=2, one_to_many_queries=8)
  model, variables, images, mask = _init(with_dn)
  plain = _config(groups=0, num_query_groups=2, one_to_many_queries=8)
  plain_model = models.build_model(plain.model)
  plain_vars = {**variables, "params": {k: v for k, v in variables["params"].items()
                                        if k != "denoising_label_embed"}}
  a = model.apply(variables, images, mask, train=True, targets=_targets(), rngs=RNGS)
  b = plain_model.apply(plain_vars, images, mask, train=True, rngs=RNGS)
  np.testing.assert_allclose(np.asarray(a["pred_logits"]), np.asarray(b["pred_logits"]),
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(a["one_to_many"]["pred_boxes"]),
                             np.asarray(b["one_to_many"]["pred_boxes"]), atol=1e-5)
  assert a["denoising"]["pred_logits"].shape[1] == 2 * 8
  # Inference: the model's own queries only, no targets needed.
  out = model.apply(variables, images, mask)
  assert "denoising" not in out and out["pred_logits"].shape[1] == with_dn.model.num_queries


def test_fixed_assignment_loss_by_hand():
  config = _config()
  loss_config = config.loss
  loss_config.aux_loss = False
  targets = _targets(batch=2, slots=4, seed=3)
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(2, 4, 7)).astype(np.float32)
  boxes = np.concatenate([rng.uniform(0.2, 0.8, (2, 4, 2)), rng.uniform(0.1, 0.4, (2, 4, 2))],
                         -1).astype(np.float32)
  outputs = {"pred_logits": jnp.asarray(logits), "pred_boxes": jnp.asarray(boxes),
             "aux_outputs": []}
  _, metrics = losses.set_loss(outputs, targets, loss_config, fixed_assignment=True)
  valid = np.asarray(targets["valid"])
  tboxes = np.asarray(targets["boxes"])
  labels = np.where(valid, np.asarray(targets["labels"]), 6)  # query m <-> slot m
  num_boxes = valid.sum()
  l1 = np.abs(boxes - tboxes).sum(-1)
  np.testing.assert_allclose(float(metrics["loss_bbox"]), (l1 * valid).sum() / num_boxes,
                             rtol=1e-5)
  giou = np.asarray(box_ops.elementwise_generalized_box_iou(
      box_ops.box_cxcywh_to_xyxy(jnp.asarray(boxes)), box_ops.box_cxcywh_to_xyxy(tboxes)))
  np.testing.assert_allclose(float(metrics["loss_giou"]), ((1 - giou) * valid).sum() / num_boxes,
                             rtol=1e-5)
  nll = -np.take_along_axis(special.log_softmax(logits, -1), labels[..., None], -1)[..., 0]
  weight = np.where(labels == 6, loss_config.eos_coef, 1.0)
  np.testing.assert_allclose(float(metrics["loss_ce"]), (weight * nll).sum() / weight.sum(),
                             rtol=1e-5)
  # G identical groups: the mean over groups, i.e. the same loss (also with "sum" for groups).
  loss_config.query_group_losses = "sum"
  tiled = {"pred_logits": jnp.tile(outputs["pred_logits"], (1, 3, 1)),
           "pred_boxes": jnp.tile(outputs["pred_boxes"], (1, 3, 1)), "aux_outputs": []}
  total_1, _ = losses.set_loss(outputs, targets, loss_config, fixed_assignment=True)
  total_3, _ = losses.set_loss(tiled, targets, loss_config, num_query_groups=3,
                               fixed_assignment=True)
  np.testing.assert_allclose(float(total_3), float(total_1), rtol=1e-6)
  with pytest.raises(ValueError, match="must be equal"):
    losses.set_loss({**tiled, "aux_outputs": []}, targets, loss_config, fixed_assignment=True)


def test_training_loss_adds_the_weighted_denoising_loss():
  config = _config(groups=2)
  model, variables, images, mask = _init(config)
  targets = _targets()
  out = model.apply(variables, images, mask, train=True, targets=targets, rngs=RNGS)
  plain_total, _ = losses.training_loss({k: v for k, v in out.items() if k != "denoising"},
                                        targets, config.loss)
  dn_total, _ = losses.set_loss(out["denoising"], targets, config.loss, num_query_groups=2,
                                fixed_assignment=True)
  config.loss.denoising_weight = 0.5
  total, metrics = losses.training_loss(out, targets, config.loss)
  np.testing.assert_allclose(float(total), float(plain_total) + 0.5 * float(dn_total), rtol=1e-5)
  assert "dn_loss_giou" in metrics and "dn_loss_ce_0" in metrics


def test_bad_configs_fail_clearly():
  with pytest.raises(ValueError, match="needs config.model.query_anchors=True"):
    models.build_model(_config(query_anchors=False).model)
  with pytest.raises(ValueError, match="denoising_groups=-1"):
    models.build_model(_config(groups=-1).model)
  with pytest.raises(ValueError, match="denoising_label_noise=1.5"):
    models.build_model(_config(label_noise=1.5).model)
  config = _config()
  model, variables, images, mask = _init(config)
  with pytest.raises(ValueError, match="training needs the targets"):
    model.apply(variables, images, mask, train=True, rngs=RNGS)


def test_train_step_on_8_devices_trains_the_label_embedding_and_drops_it_for_inference():
  config = _config(groups=2, num_query_groups=2)
  config.loss.label_loss = "sigmoid_focal"
  config.loss.class_cost_type = "focal"
  assert jax.device_count() == 8
  _, before, after, metrics = train_steps.one_step(config)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["nonfinite"]) == 0.0
  assert np.isfinite(float(metrics["dn_loss_giou"]))
  assert np.abs(after["denoising_label_embed"] - before["denoising_label_embed"]).max() > 0
  # Checkpoint -> inference model without denoising: the training-only table is left out.
  plain = _config(groups=0)
  fresh = models.build_model(plain.model).init(jax.random.PRNGKey(0), *_inputs())
  merged, _ = checkpointing.merge_pretrained(fresh["params"], after)
  assert "denoising_label_embed" not in merged
  assert "denoising_label_embed" in models.TRAINING_ONLY_PARAMS
