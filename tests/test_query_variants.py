"""The training-only query variants: Group DETR (`config.model.num_query_groups = K`: K groups
of queries in training, decoder self-attention within each group, one-to-one matching per group)
and H-DETR's one-to-many branch (`config.model.one_to_many_queries`, targets repeated
`config.loss.one_to_many_k` times); inference uses `query_embed` alone.

The closed forms used: a K-group model whose extra groups are copies of group 0 outputs K
identical copies of the plain model's training output (no group sees another), and its
mean-over-groups loss equals the plain loss (the sum K times it); a one-to-many branch that
copies the one-to-one queries with k = 1 is a second one-to-one branch, so the loss is
(1 + weight) times the plain loss.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import tiny_test
from detr_jax import checkpointing
from detr_jax import export
from detr_jax import losses
from detr_jax import models
from detr_jax import parallel
from detr_jax import predict
from detr_jax import train
from detr_jax.models import detr as detr_lib
import train_steps

K = 3


def _config(num_groups=1, label_loss="softmax_ce", one_to_many=0, k=1, weight=1.0):
  config = tiny_test.get_config()
  config.model.num_query_groups = num_groups
  config.model.one_to_many_queries = one_to_many
  config.loss.one_to_many_k = k
  config.loss.one_to_many_weight = weight
  config.loss.label_loss = label_loss
  if label_loss != "softmax_ce":
    config.loss.class_cost_type = "focal"
  return config


def _inputs(batch=2, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, 64, 64, 3)).astype(np.float32)
  mask = np.ones((batch, 64, 64), bool)
  mask[1, :, 48:] = False  # one padded image
  return jnp.asarray(images), jnp.asarray(mask)


def _targets(batch=2, slots=8, seed=1):
  rng = np.random.default_rng(seed)
  valid = np.zeros((batch, slots), bool)
  valid[0, :3] = True
  valid[1, :5] = True
  boxes = np.concatenate([rng.uniform(0.3, 0.7, (batch, slots, 2)),
                          rng.uniform(0.1, 0.3, (batch, slots, 2))], -1)
  return {"labels": jnp.asarray(rng.integers(0, 6, (batch, slots)), jnp.int32),
          "boxes": jnp.asarray(boxes, jnp.float32), "valid": jnp.asarray(valid)}


def _copied_groups(plain_params, num_groups):
  """Group-model params whose extra groups are copies of group 0."""
  params = dict(plain_params)
  params["group_query_embed"] = {"embedding": jnp.tile(plain_params["query_embed"]["embedding"],
                                                       (num_groups - 1, 1))}
  return params


@pytest.fixture(scope="module")
def plain():
  config = _config()
  model = models.build_model(config.model)
  variables = train.init_variables(config, model, jax.random.PRNGKey(0))
  return config, model, variables


def test_group_attention_mask_blocks_every_cross_group_pair():
  q = 4
  mask = np.asarray(detr_lib.group_attention_mask(K, q))
  assert mask.shape == (K * q, K * q)
  for i in range(K * q):
    for j in range(K * q):
      assert mask[i, j] == (i // q == j // q), (i, j)


def test_one_group_is_the_plain_model(plain):
  config, model, variables = plain
  grouped = models.build_model(_config(num_groups=1).model)
  assert jax.tree.structure(train.init_variables(config, grouped, jax.random.PRNGKey(0))) == (
      jax.tree.structure(variables))
  images, mask = _inputs()
  a = model.apply(variables, images, mask, train=True)
  b = grouped.apply(variables, images, mask, train=True)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  la, _ = losses.set_loss(a, _targets(), config.loss)
  lb, _ = losses.set_loss(b, _targets(), config.loss, num_query_groups=1)
  assert float(la) == float(lb)


@pytest.mark.parametrize("label_loss", ["softmax_ce", "sigmoid_focal"])
def test_copied_groups_give_copies_of_the_outputs_and_the_same_loss(plain, label_loss):
  config, model, variables = plain
  grouped_config = _config(num_groups=K, label_loss=label_loss)
  grouped = models.build_model(grouped_config.model)
  params = _copied_groups(variables["params"], K)
  fresh = train.init_variables(grouped_config, grouped, jax.random.PRNGKey(0))
  assert jax.tree.structure(fresh["params"]) == jax.tree.structure(params)
  images, mask = _inputs()
  out = model.apply(variables, images, mask, train=True)
  grouped_out = grouped.apply({**variables, "params": params}, images, mask, train=True)
  q = config.model.num_queries
  assert grouped_out["pred_logits"].shape[1] == K * q
  for k in range(K):
    np.testing.assert_allclose(grouped_out["pred_logits"][:, k * q:(k + 1) * q],
                               out["pred_logits"], atol=2e-5)
    np.testing.assert_allclose(grouped_out["pred_boxes"][:, k * q:(k + 1) * q],
                               out["pred_boxes"], atol=2e-6)
  loss_config = grouped_config.loss
  plain_loss, plain_metrics = losses.set_loss(out, _targets(), loss_config)
  mean_loss, metrics = losses.set_loss(grouped_out, _targets(), loss_config, num_query_groups=K)
  np.testing.assert_allclose(float(mean_loss), float(plain_loss), rtol=1e-5)
  for name in ("loss_ce", "loss_bbox", "loss_giou", "loss_bbox_0"):
    np.testing.assert_allclose(float(metrics[name]), float(plain_metrics[name]), rtol=1e-5)
  sum_config = ml_collections.ConfigDict(loss_config.to_dict())
  sum_config.query_group_losses = "sum"
  sum_loss, _ = losses.set_loss(grouped_out, _targets(), sum_config, num_query_groups=K)
  np.testing.assert_allclose(float(sum_loss), K * float(plain_loss), rtol=1e-5)


def test_groups_do_not_see_each_other(plain):
  """Changing group 1's queries leaves group 0's and group 2's training outputs unchanged."""
  config, _, variables = plain
  grouped = models.build_model(_config(num_groups=K).model)
  params = _copied_groups(variables["params"], K)
  q = config.model.num_queries
  changed = dict(params)
  embedding = params["group_query_embed"]["embedding"]
  changed["group_query_embed"] = {"embedding": embedding.at[:q].add(1.0)}  # group 1
  images, mask = _inputs()
  a = grouped.apply({**variables, "params": params}, images, mask, train=True)["pred_logits"]
  b = grouped.apply({**variables, "params": changed}, images, mask, train=True)["pred_logits"]
  np.testing.assert_array_equal(a[:, :q], b[:, :q])
  np.testing.assert_array_equal(a[:, 2 * q:], b[:, 2 * q:])
  assert np.abs(np.asarray(a[:, q:2 * q] - b[:, q:2 * q])).max() > 1e-3


def test_matching_is_one_to_one_within_each_group(plain):
  """Each group's queries are matched to every target once: split rows are (image, group)."""
  config, _, variables = plain
  grouped = models.build_model(_config(num_groups=K).model)
  fresh = train.init_variables(_config(num_groups=K), grouped, jax.random.PRNGKey(3))
  images, mask = _inputs()
  out = grouped.apply(fresh, images, mask, train=True)
  split, targets = losses.split_query_groups(out, _targets(), K)
  q = config.model.num_queries
  assert split["pred_logits"].shape[:2] == (2 * K, q)
  from detr_jax import matching  # pylint: disable=g-import-not-at-top
  indices = np.asarray(matching.match(split["pred_logits"][None], split["pred_boxes"][None],
                                      targets, config.loss))[0]  # [B * K, M]
  valid = np.asarray(targets["valid"])
  for row in range(2 * K):
    # Row b * K + k holds group k of image b, and its targets are image b's.
    np.testing.assert_array_equal(np.asarray(split["pred_logits"][row]),
                                  np.asarray(out["pred_logits"][row // K, (row % K) * q:
                                                                 (row % K + 1) * q]))
    matched = indices[row][valid[row]]
    assert len(set(matched)) == valid[row].sum() and (matched >= 0).all()


def test_inference_uses_group_0_and_published_weights_load(plain, tmp_path):
  config, model, variables = plain
  grouped_config = _config(num_groups=K)
  grouped = models.build_model(grouped_config.model)
  trained = train.init_variables(grouped_config, grouped, jax.random.PRNGKey(4))
  images, mask = _inputs()
  out = grouped.apply(trained, images, mask, train=False)
  assert out["pred_logits"].shape[1] == config.model.num_queries
  plain_view = {**trained, "params": {k: v for k, v in trained["params"].items()
                                      if k != "group_query_embed"}}
  np.testing.assert_array_equal(out["pred_logits"],
                                model.apply(plain_view, images, mask)["pred_logits"])
  # Plain (published) weights evaluate and predict with a Group-DETR config...
  np.testing.assert_array_equal(
      grouped.apply(variables, images, mask)["pred_logits"],
      model.apply(variables, images, mask)["pred_logits"])
  detector = predict.Detector(grouped_config, variables, {i: str(i) for i in range(6)},
                              mesh=parallel.create_mesh(jax.devices()[:1]))
  assert detector.run([detector.prepare(np.zeros((64, 64, 3), np.uint8))])[0].scores.shape == (
      config.model.num_queries,)
  # ...initialise its training (the extra groups start fresh), and a group-trained checkpoint
  # fine-tunes a plain model and exports as the plain model.
  merged, _ = checkpointing.merge_pretrained(trained["params"], variables["params"])
  np.testing.assert_array_equal(merged["group_query_embed"]["embedding"],
                                trained["params"]["group_query_embed"]["embedding"])
  merged, _ = checkpointing.merge_pretrained(variables["params"], trained["params"])
  assert "group_query_embed" not in merged
  state_dict = export.to_state_dict(jax.device_get(trained), "official")
  assert not [k for k in state_dict if "group" in k]
  assert state_dict["query_embed.weight"].shape == (config.model.num_queries,
                                                    config.model.hidden_dim)


def test_one_to_many_with_k_1_is_a_second_one_to_one_branch(plain):
  config, model, variables = plain
  q = config.model.num_queries
  o2m_config = _config(one_to_many=q, k=1, weight=0.5)
  o2m_model = models.build_model(o2m_config.model)
  params = dict(variables["params"])
  params["one_to_many_query_embed"] = {"embedding": params["query_embed"]["embedding"]}
  fresh = train.init_variables(o2m_config, o2m_model, jax.random.PRNGKey(0))
  assert jax.tree.structure(fresh["params"]) == jax.tree.structure(params)
  images, mask = _inputs()
  out = model.apply(variables, images, mask, train=True)
  o2m_out = o2m_model.apply({**variables, "params": params}, images, mask, train=True)
  assert o2m_out["pred_logits"].shape[1] == q and o2m_out["one_to_many"]["pred_logits"].shape[1] == q
  for branch in (o2m_out, o2m_out["one_to_many"]):
    np.testing.assert_allclose(branch["pred_logits"], out["pred_logits"], atol=2e-5)
    np.testing.assert_allclose(branch["aux_outputs"][0]["pred_boxes"],
                               out["aux_outputs"][0]["pred_boxes"], atol=2e-6)
  plain_loss, _ = losses.set_loss(out, _targets(), o2m_config.loss)
  total, metrics = losses.training_loss(o2m_out, _targets(), o2m_config.loss)
  np.testing.assert_allclose(float(total), 1.5 * float(plain_loss), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["o2m_loss_giou"]), float(metrics["loss_giou"]),
                             rtol=1e-5)


def test_one_to_many_targets_repeat_each_image_k_times():
  targets = _targets()
  repeated = losses.one_to_many_targets(targets, 3)
  m = targets["labels"].shape[1]
  assert repeated["boxes"].shape == (2, 3 * m, 4)
  for i in range(3):
    for name in targets:
      np.testing.assert_array_equal(repeated[name][:, i * m:(i + 1) * m], targets[name])


def test_one_to_many_queries_do_not_disturb_the_one_to_one_ones(plain):
  config, _, variables = plain
  both = _config(num_groups=2, one_to_many=24, k=3)
  model = models.build_model(both.model)
  trained = train.init_variables(both, model, jax.random.PRNGKey(6))
  changed = {**trained, "params": dict(trained["params"])}
  changed["params"]["one_to_many_query_embed"] = {
      "embedding": trained["params"]["one_to_many_query_embed"]["embedding"] + 1.0}
  images, mask = _inputs()
  a = model.apply(trained, images, mask, train=True)
  b = model.apply(changed, images, mask, train=True)
  assert a["pred_logits"].shape[1] == 2 * config.model.num_queries
  assert a["one_to_many"]["pred_logits"].shape[1] == 24
  np.testing.assert_array_equal(a["pred_logits"], b["pred_logits"])
  assert np.abs(np.asarray(a["one_to_many"]["pred_logits"] -
                           b["one_to_many"]["pred_logits"])).max() > 1e-3
  # Inference: the plain model's queries only, no branch; exported without the extra queries.
  out = model.apply(trained, images, mask)
  assert "one_to_many" not in out and out["pred_logits"].shape[1] == config.model.num_queries
  state_dict = export.to_state_dict(jax.device_get(trained), "official")
  assert not [k for k in state_dict if "one_to_many" in k or "group" in k]
  merged, _ = checkpointing.merge_pretrained(variables["params"], trained["params"])
  assert set(merged) == set(variables["params"])


def test_one_to_many_needs_a_query_per_repeated_target():
  from detr_jax import config_checks  # pylint: disable=g-import-not-at-top
  config = _config(one_to_many=20, k=3)  # max_boxes 8: 24 repeated targets
  with pytest.raises(config_checks.ConfigError, match="config.model.one_to_many_queries=20"):
    config_checks.check_train_config(config, num_devices=8)


def test_group_train_step_on_8_devices_with_focal_loss():
  config = _config(num_groups=K, label_loss="sigmoid_focal", one_to_many=24, k=3)
  _, before, after, metrics = train_steps.one_step(config)
  assert np.isfinite(float(metrics["loss"])) and float(metrics["nonfinite"]) == 0.0
  assert np.isfinite(float(metrics["o2m_loss_ce"]))
  # The extra groups and the one-to-many queries are trained.
  for name in ("group_query_embed", "one_to_many_query_embed"):
    assert np.abs(after[name]["embedding"] - before[name]["embedding"]).max() > 0, name
