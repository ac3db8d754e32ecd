"""Tests of detr_jax.optimizer: parameter groups, clipping, schedules, gradient accumulation.

Expected values are closed forms of AdamW: at any step with a gradient that has been constant,
Adam's bias-corrected update is g / (|g| + eps), so an update's size is the learning rate.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from detr_jax import optimizer

EPS = 1e-8


def _config(**overrides):
  opt = ml_collections.ConfigDict(dict(
      lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4, clip_norm=0.1, schedule="step",
      warmup_steps=0, lr_drop_epochs=3, lr_drop_factor=0.1, grad_accum_steps=1))
  opt.update(overrides)
  return ml_collections.ConfigDict({"optimizer": opt})


def _params():
  rng = np.random.default_rng(0)
  shapes = {"backbone": {"conv1": {"kernel": (3, 3, 3, 4)},
                         "layer2_0": {"conv1": {"kernel": (3, 3, 4, 4)}}},
            "transformer": {"linear1": {"kernel": (4, 5), "bias": (5,)}},
            "class_embed": {"kernel": (5, 3)}}
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))
  labels = {"backbone": {"conv1": {"kernel": "frozen"},
                         "layer2_0": {"conv1": {"kernel": "backbone"}}},
            "transformer": {"linear1": {"kernel": "transformer", "bias": "transformer"}},
            "class_embed": {"kernel": "transformer"}}
  return params, labels


def _random_like(params, seed, scale=1.0):
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(
      tree, [jnp.asarray(scale * rng.normal(size=x.shape), jnp.float32) for x in leaves])


def _mu_sq_norm(opt_state):
  # Adam's first moments of both trained groups (MaskedNode leaves of the other group are empty).
  mus = [v for _, v in optax.tree_utils.tree_get_all_with_path(opt_state, "mu")]
  return sum(float(jnp.sum(x ** 2)) for x in jax.tree.leaves(mus))


def test_frozen_unchanged_and_group_learning_rates():
  params, labels = _params()
  tx, _ = optimizer.create_optimizer(_config(clip_norm=0.0), labels, steps_per_epoch=10,
                                     total_steps=100)
  grads = _random_like(params, 1)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  # Frozen: untouched, no weight decay either.
  np.testing.assert_array_equal(new["backbone"]["conv1"]["kernel"],
                                params["backbone"]["conv1"]["kernel"])
  # Trained: AdamW closed form for the first step, lr of the group.
  for path, lr in ((("backbone", "layer2_0", "conv1", "kernel"), 1e-5),
                   (("transformer", "linear1", "kernel"), 1e-4),
                   (("class_embed", "kernel"), 1e-4)):
    g, p, u = grads, params, updates
    for k in path:
      g, p, u = g[k], p[k], u[k]
    expected = -lr * (g / (jnp.abs(g) + EPS) + 1e-4 * p)
    np.testing.assert_allclose(u, expected, rtol=1e-4, atol=1e-12)
  ratio = (jnp.abs(updates["backbone"]["layer2_0"]["conv1"]["kernel"]).mean()
           / jnp.abs(updates["transformer"]["linear1"]["kernel"]).mean())
  np.testing.assert_allclose(ratio, 0.1, rtol=1e-3)


@pytest.mark.parametrize("scale", [10.0, 1e-3])
def test_clipping_over_trained_grads_only(scale):
  params, labels = _params()
  tx, _ = optimizer.create_optimizer(_config(), labels, steps_per_epoch=10, total_steps=100)
  grads = _random_like(params, 2, scale)
  # A huge frozen gradient must not count in the clipped norm (requires_grad=False in torch).
  grads["backbone"]["conv1"]["kernel"] = grads["backbone"]["conv1"]["kernel"] * 1e6
  trained_norm = float(optimizer.trainable_global_norm(grads, labels))
  _, state = tx.update(grads, tx.init(params), params)
  clipped_norm = min(trained_norm, 0.1)
  # Adam's first moment after one step is (1 - b1) * clipped gradient.
  np.testing.assert_allclose(np.sqrt(_mu_sq_norm(state)), 0.1 * clipped_norm, rtol=1e-4)


def test_step_schedule_drops_at_the_right_update():
  params, labels = _params()
  steps_per_epoch, drop_epochs = 4, 3
  tx, schedules = optimizer.create_optimizer(
      _config(clip_norm=0.0, weight_decay=0.0, lr_drop_epochs=drop_epochs), labels,
      steps_per_epoch=steps_per_epoch, total_steps=40)
  drop = steps_per_epoch * drop_epochs
  grads = _random_like(params, 3)  # constant gradient: each Adam step has size lr
  state = tx.init(params)
  sizes = []
  for _ in range(drop + 2):
    updates, state = tx.update(grads, state, params)
    sizes.append(float(jnp.abs(updates["class_embed"]["kernel"]).max()))
  np.testing.assert_allclose(sizes[:drop], 1e-4, rtol=1e-4)
  np.testing.assert_allclose(sizes[drop:], 1e-5, rtol=1e-4)
  assert float(schedules["transformer"](drop - 1)) == pytest.approx(1e-4)
  assert float(schedules["transformer"](drop)) == pytest.approx(1e-5)
  assert float(schedules["backbone"](drop)) == pytest.approx(1e-6)


def test_warmup_and_cosine_closed_form():
  cfg = _config(schedule="cosine", warmup_steps=10).optimizer
  sched = optimizer.create_learning_rate_schedule(cfg, 1.0, steps_per_epoch=5, total_steps=110)
  for step in (0, 5, 10, 60, 110):
    expected = step / 10 if step < 10 else 0.5 * (1 + np.cos(np.pi * (step - 10) / 100))
    assert float(sched(step)) == pytest.approx(expected, abs=1e-6)
  cfg = _config(schedule="step", warmup_steps=4, lr_drop_epochs=2).optimizer
  sched = optimizer.create_learning_rate_schedule(cfg, 1.0, steps_per_epoch=5, total_steps=50)
  assert [float(sched(s)) for s in (0, 2, 4, 9, 10)] == pytest.approx([0, 0.5, 1, 1, 0.1])


def test_warmup_and_linear_decay_closed_form():
  cfg = _config(schedule="linear", warmup_steps=10).optimizer
  sched = optimizer.create_learning_rate_schedule(cfg, 2.0, steps_per_epoch=5, total_steps=110)
  for step in (0, 5, 10, 35, 60, 109, 110, 120):
    expected = 2.0 * step / 10 if step < 10 else 2.0 * max(110 - step, 0) / 100
    assert float(sched(step)) == pytest.approx(expected, abs=1e-6)
  cfg = _config(schedule="linear").optimizer  # no warmup: from the peak straight down
  sched = optimizer.create_learning_rate_schedule(cfg, 1.0, steps_per_epoch=5, total_steps=40)
  assert [float(sched(s)) for s in (0, 10, 40)] == pytest.approx([1.0, 0.75, 0.0])


def test_adam_betas_from_config():
  """Two updates with gradients g1 then g2 follow Adam's moments with the configured decays."""
  params, labels = _params()
  b1, b2 = 0.8, 0.95
  tx, _ = optimizer.create_optimizer(_config(clip_norm=0.0, weight_decay=0.0, b1=b1, b2=b2),
                                     labels, steps_per_epoch=10, total_steps=100)
  g1, g2 = _random_like(params, 6), _random_like(params, 7)
  state = tx.init(params)
  _, state = tx.update(g1, state, params)
  updates, _ = tx.update(g2, state, params)
  a1, a2 = g1["class_embed"]["kernel"], g2["class_embed"]["kernel"]
  mu = ((1 - b1) * b1 * a1 + (1 - b1) * a2) / (1 - b1 ** 2)
  nu = ((1 - b2) * b2 * a1 ** 2 + (1 - b2) * a2 ** 2) / (1 - b2 ** 2)
  np.testing.assert_allclose(updates["class_embed"]["kernel"], -1e-4 * mu / (np.sqrt(nu) + EPS),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="b1 and b2"):
    optimizer.create_optimizer(_config(b2=1.0), labels, steps_per_epoch=10, total_steps=100)


def test_grad_accumulation_equals_mean_gradient():
  params, labels = _params()
  kwargs = dict(steps_per_epoch=10, total_steps=100)
  tx_accum, _ = optimizer.create_optimizer(_config(grad_accum_steps=2), labels, **kwargs)
  tx_plain, _ = optimizer.create_optimizer(_config(), labels, **kwargs)
  g1, g2 = _random_like(params, 4, 0.01), _random_like(params, 5, 0.01)
  state = tx_accum.init(params)
  first, state = tx_accum.update(g1, state, params)
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(first))
  second, _ = tx_accum.update(g2, state, params)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  expected, _ = tx_plain.update(mean, tx_plain.init(params), params)
  for a, b in zip(jax.tree.leaves(second), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-12)


def test_model_labels_freeze_stem_and_layer1():
  models = pytest.importorskip("detr_jax.models")
  from configs import tiny_test  # pylint: disable=g-import-not-at-top
  config = tiny_test.get_config()
  config.model.train_backbone_from = "layer2"
  model = models.build_model(config.model)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), jnp.ones((1, 64, 64), bool)))
  labels = models.param_labels(variables["params"], config.model)
  params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), variables["params"])
  tx, _ = optimizer.create_optimizer(config, labels, steps_per_epoch=8, total_steps=8)
  updates, _ = tx.update(params, tx.init(params), params)
  assert not np.any(updates["backbone"]["conv1"]["kernel"])
  assert not np.any(updates["backbone"]["layer1_0"]["conv1"]["kernel"])
  assert np.all(updates["backbone"]["layer2_0"]["conv1"]["kernel"] != 0)
  assert np.all(updates["class_embed"]["kernel"] != 0)


@pytest.mark.parametrize("field,value", [("schedule", "exponential"), ("grad_accum_steps", 0)])
def test_bad_config_raises(field, value):
  params, labels = _params()
  with pytest.raises(ValueError, match=field):
    optimizer.create_optimizer(_config(**{field: value}), labels, steps_per_epoch=10,
                               total_steps=100)
