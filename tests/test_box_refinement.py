"""Box refinement (`config.model.box_refinement`, with anchor-point queries): decoder layer i > 0
predicts a correction of layer i - 1's box, and its query position is the anchor embedding of
that box's centre.

Closed forms: layer 0 is the anchor model's layer 0 (to float32 round-off); with a zero box head every
layer's box stays on its anchor at width and height 0.5; layer 1's box is sigmoid(bbox_embed(h_1)
+ inverse_sigmoid(box_0)) for the decoder's normed output h_1; the parameter tree is the anchor
model's.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny_test
from detr_jax import models
from detr_jax.models import detr as detr_lib


def _setup(refine, groups=1, one_to_many=0, denoising=0):
  config = tiny_test.get_config()
  config.model.query_anchors = True
  config.model.box_refinement = refine
  config.model.num_query_groups = groups
  config.model.one_to_many_queries = one_to_many
  config.model.denoising_groups = denoising
  config.model.dec_layers = 3
  model = models.build_model(config.model)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
  mask = jnp.ones((2, 64, 64), bool)
  variables = model.init(jax.random.PRNGKey(0), images, mask)
  return config, model, variables, images, mask


def _layers(out, key):
  return np.stack([np.asarray(a[key]) for a in out["aux_outputs"]] + [np.asarray(out[key])])


def test_same_parameters_and_first_layer_as_the_anchor_model():
  _, plain_model, plain, images, mask = _setup(False)
  _, model, variables, _, _ = _setup(True)
  assert (jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(variables))
  plain_out = plain_model.apply(plain, images, mask)
  out = model.apply(plain, images, mask)  # the anchor model's own parameters
  for key in ("pred_boxes", "pred_logits"):
    np.testing.assert_allclose(_layers(out, key)[0], _layers(plain_out, key)[0], atol=1e-6)
    # Later layers see other query positions and predict relative to other references.
    assert np.max(np.abs(_layers(out, key)[1:] - _layers(plain_out, key)[1:])) > 1e-4


def test_zero_box_head_keeps_every_layer_on_its_anchor():
  config, model, variables, images, mask = _setup(True, groups=2, one_to_many=4)
  params = flax.core.unfreeze(variables["params"])
  last = params["bbox_embed"]["layers_2"]
  last["kernel"] = jnp.zeros_like(last["kernel"])
  last["bias"] = jnp.zeros_like(last["bias"])
  out = model.apply({**variables, "params": params}, images, mask, train=True,
                    rngs={"dropout": jax.random.PRNGKey(1)})
  anchors = np.clip(np.concatenate([np.asarray(params["query_embed_anchors"]),
                                    np.asarray(params["group_query_embed_anchors"])]),
                    1e-3, 1 - 1e-3)
  boxes = _layers(out, "pred_boxes")
  assert boxes.shape == (config.model.dec_layers, 2, 2 * config.model.num_queries, 4)
  np.testing.assert_allclose(boxes[..., :2], np.broadcast_to(anchors, boxes[..., :2].shape),
                             atol=5e-5)
  np.testing.assert_allclose(boxes[..., 2:], 0.5, atol=5e-5)
  o2m = _layers(out["one_to_many"], "pred_boxes")
  np.testing.assert_allclose(
      o2m[..., :2], np.broadcast_to(np.clip(params["one_to_many_query_embed_anchors"], 1e-3,
                                            1 - 1e-3), o2m[..., :2].shape), atol=5e-5)


def test_each_layer_corrects_the_previous_box():
  config, model, variables, images, mask = _setup(True)
  out, state = model.apply(variables, images, mask, capture_intermediates=True,
                           mutable=["intermediates"])
  # The decoder's normed output of every layer (decoder_norm is called once per layer).
  hidden = state["intermediates"]["transformer"]["decoder_norm"]["__call__"]
  assert len(hidden) == config.model.dec_layers
  head = detr_lib.MLP(config.model.hidden_dim, 4, 3)
  boxes = _layers(out, "pred_boxes")
  for i in range(1, config.model.dec_layers):
    delta = head.apply({"params": variables["params"]["bbox_embed"]}, hidden[i])
    expected = jax.nn.sigmoid(delta + detr_lib.inverse_sigmoid(jnp.asarray(boxes[i - 1])))
    np.testing.assert_allclose(boxes[i], np.asarray(expected), atol=1e-5)


def test_references_pass_no_gradient_to_earlier_layers():
  """Layer 1's box is sigmoid(bbox_embed(h_1) + inverse_sigmoid(stop_gradient(box_0))), and h_1
  depends on box_0 only through the stopped reference: a loss on layer 1's boxes gives the box
  head exactly the gradient it has with h_1 and box_0 held as constants."""
  config, model, variables, images, mask = _setup(True)
  head = detr_lib.MLP(config.model.hidden_dim, 4, 3)

  def layer1_loss(params):
    out = model.apply({**variables, "params": params}, images, mask)
    return jnp.sum(out["aux_outputs"][1]["pred_boxes"] ** 2)

  out, state = model.apply(variables, images, mask, capture_intermediates=True,
                           mutable=["intermediates"])
  hidden1 = state["intermediates"]["transformer"]["decoder_norm"]["__call__"][1]
  offset = detr_lib.inverse_sigmoid(out["aux_outputs"][0]["pred_boxes"])

  def constant_reference_loss(head_params):
    delta = head.apply({"params": head_params}, hidden1)
    return jnp.sum(jax.nn.sigmoid(delta + offset) ** 2)

  got = jax.grad(layer1_loss)(variables["params"])["bbox_embed"]
  expected = jax.grad(constant_reference_loss)(variables["params"]["bbox_embed"])
  for g, e in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
    assert float(jnp.max(jnp.abs(e))) > 0
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-6)


def test_denoising_queries_are_refined_too():
  config, model, variables, images, mask = _setup(True, denoising=2)
  targets = {"labels": jnp.asarray([[1, 2, 0], [3, 0, 0]]),
             "boxes": jnp.asarray([[[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.2], [0, 0, 0, 0]],
                                   [[0.5, 0.5, 0.4, 0.4], [0, 0, 0, 0], [0, 0, 0, 0]]]),
             "valid": jnp.asarray([[True, True, False], [True, False, False]])}
  out = model.apply(variables, images, mask, train=True, targets=targets,
                    rngs={"dropout": jax.random.PRNGKey(1), "denoising": jax.random.PRNGKey(2)})
  boxes = _layers(out["denoising"], "pred_boxes")
  assert boxes.shape == (config.model.dec_layers, 2, 2 * 3, 4)
  assert np.all(np.isfinite(boxes))


def test_needs_anchor_queries():
  config = tiny_test.get_config()
  config.model.box_refinement = True
  with pytest.raises(ValueError, match="needs config.model.query_anchors=True"):
    models.build_model(config.model)
