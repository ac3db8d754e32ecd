"""`config.model.backbone_norm`: "frozen_bn" (official, default) or "group_norm" (trained
GroupNorm with 32 groups, for a backbone trained from scratch)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny_test
from detr_jax import config_checks
from detr_jax import models
from detr_jax import train
from detr_jax.models import resnet
import train_steps


def test_group_norm_is_the_closed_form():
  x = np.random.default_rng(0).normal(2.0, 3.0, size=(2, 5, 6, 64)).astype(np.float32)
  layer = resnet.norm_layer("group_norm", jnp.float32, "bn1")
  variables = layer.init(jax.random.PRNGKey(0), x)
  y = np.asarray(layer.apply(variables, x))
  groups = x.reshape(2, 5, 6, 32, 2)
  mean = groups.mean(axis=(1, 2, 4), keepdims=True)
  var = groups.var(axis=(1, 2, 4), keepdims=True)
  expected = ((groups - mean) / np.sqrt(var + resnet.FROZEN_BN_EPS)).reshape(x.shape)
  np.testing.assert_allclose(y, expected, atol=2e-5)
  assert set(variables["params"]) == {"scale", "bias"}


def _config(norm):
  config = tiny_test.get_config()
  config.model.backbone_norm = norm
  return config


def test_group_norm_backbone_is_trained_and_has_no_statistics():
  variables, before, after, metrics = train_steps.one_step(_config("group_norm"))
  assert not jax.tree.leaves(variables.get("batch_stats", {}))
  assert set(variables["params"]["backbone"]["bn1"]) == {"scale", "bias"}
  assert set(variables["params"]["backbone"]["layer4_1"]["bn2"]) == {"scale", "bias"}
  frozen = train.init_variables(_config("frozen_bn"), models.build_model(
      _config("frozen_bn").model), jax.random.PRNGKey(0))
  assert "bn1" not in frozen["params"]["backbone"] and "bn1" in frozen["batch_stats"]["backbone"]
  assert np.isfinite(float(metrics["loss"]))
  scale = lambda p: p["backbone"]["layer2_0"]["bn2"]["scale"]
  assert np.abs(scale(after) - scale(before)).max() > 0  # the norm's scale is trained


def test_backbone_norm_choices_are_checked():
  with pytest.raises(ValueError, match="config.model.backbone_norm 'batch_norm'"):
    models.build_model(_config("batch_norm").model)
  config = _config("group_norm")
  config.backbone_init = __file__  # exists, but BatchNorm weights cannot go into GroupNorm
  with pytest.raises(config_checks.ConfigError, match="config.model.backbone_norm='group_norm'"):
    config_checks.check_train_config(config, num_devices=8)
