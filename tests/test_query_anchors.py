"""Anchor-point queries (`config.model.query_anchors`, Anchor DETR): each query is a learned
point whose sine embedding goes through an MLP to give the query position, and the box centre is
predicted relative to it.

Closed forms: with a zero box head, every predicted box is centred on its anchor with width and
height sigmoid(0) = 0.5; a point's sine embedding at a feature cell's coordinates equals the
feature map's own position encoding there; off, the parameter tree is the plain DETR's.
"""

import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny_test
import pytest

from detr_jax import export
from detr_jax import models
from detr_jax.models import detr as detr_lib
from detr_jax.models import position_encoding


def _init(query_anchors, groups=1, one_to_many=0):
  config = tiny_test.get_config()
  config.model.query_anchors = query_anchors
  config.model.num_query_groups = groups
  config.model.one_to_many_queries = one_to_many
  model = models.build_model(config.model)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
  mask = jnp.ones((2, 64, 64), bool)
  return config, model, model.init(jax.random.PRNGKey(0), images, mask), images, mask


def test_off_is_the_plain_parameter_tree():
  _, _, plain, _, _ = _init(False)
  assert "query_embed" in plain["params"]
  assert not any("anchors" in k or k == "query_pos_mlp" for k in plain["params"])


def test_zero_box_head_puts_every_box_on_its_anchor():
  config, model, variables, images, mask = _init(True, groups=2, one_to_many=8)
  params = jax.tree_util.tree_map(lambda x: x, variables["params"])
  last = params["bbox_embed"]["layers_2"]
  last["kernel"] = jnp.zeros_like(last["kernel"])
  last["bias"] = jnp.zeros_like(last["bias"])
  variables = {**variables, "params": params}
  anchors = np.clip(np.asarray(params["query_embed_anchors"]), 1e-3, 1 - 1e-3)
  assert anchors.shape == (config.model.num_queries, 2)
  out = model.apply(variables, images, mask)  # inference: the model's own queries only
  boxes = np.asarray(out["pred_boxes"])
  assert boxes.shape == (2, config.model.num_queries, 4)
  np.testing.assert_allclose(boxes[..., :2], np.broadcast_to(anchors, boxes[..., :2].shape),
                             atol=2e-5)
  np.testing.assert_allclose(boxes[..., 2:], 0.5, atol=1e-6)
  # Training: the extra group and the one-to-many queries sit on their own anchors.
  out = model.apply(variables, images, mask, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  group = np.clip(np.asarray(params["group_query_embed_anchors"]), 1e-3, 1 - 1e-3)
  o2m = np.clip(np.asarray(params["one_to_many_query_embed_anchors"]), 1e-3, 1 - 1e-3)
  np.testing.assert_allclose(np.asarray(out["pred_boxes"])[0, :, :2],
                             np.concatenate([anchors, group]), atol=2e-5)
  np.testing.assert_allclose(np.asarray(out["one_to_many"]["pred_boxes"])[0, :, :2], o2m,
                             atol=2e-5)


def test_anchors_learn_and_move_the_queries():
  """The anchors get gradients through both the box centre and the query position."""
  config, model, variables, images, mask = _init(True)
  del config

  def centre_sum(anchors, path):
    params = dict(variables["params"], query_embed_anchors=anchors)
    out = model.apply({**variables, "params": params}, images, mask)
    if path == "boxes":
      return jnp.sum(out["pred_boxes"][..., :2])
    return jnp.sum(out["pred_logits"])  # only through the query position

  anchors = variables["params"]["query_embed_anchors"]
  assert float(jnp.max(jnp.abs(jax.grad(centre_sum)(anchors, "boxes")))) > 0
  assert float(jnp.max(jnp.abs(jax.grad(centre_sum)(anchors, "logits")))) > 0


def test_point_embedding_matches_the_feature_position_encoding():
  h, w, feats = 5, 7, 16
  pos = np.asarray(position_encoding.sine_position_embedding(jnp.ones((1, h, w), bool), feats))
  ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  points = np.stack([(jj + 1) / w, (ii + 1) / h], axis=-1).astype(np.float32)
  np.testing.assert_allclose(
      np.asarray(position_encoding.sine_point_embedding(jnp.asarray(points), feats)), pos[0],
      atol=1e-4)


def test_inverse_sigmoid_inverts_sigmoid():
  x = jnp.asarray([1e-3, 0.1, 0.5, 0.9, 0.999])
  np.testing.assert_allclose(np.asarray(jax.nn.sigmoid(detr_lib.inverse_sigmoid(x))), x,
                             rtol=1e-5)


def test_export_refuses_anchor_queries(tmp_path):
  config, _, variables, _, _ = _init(True)
  with pytest.raises(ValueError, match="query_anchors"):
    export.export(variables, config.model, "official", str(tmp_path / "out.pth"), {})
