"""`config.model.backbone_norm`: "frozen_bn" (official, default) or "group_norm" (trained
GroupNorm with `model.group_norm_groups` groups, 32 by default, for a backbone trained from
scratch)."""

import flax.linen as nn
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


@pytest.mark.parametrize("num_groups", [32, 8])
def test_group_norm_is_the_closed_form(num_groups):
  x = np.random.default_rng(0).normal(2.0, 3.0, size=(2, 5, 6, 64)).astype(np.float32)
  layer = resnet.norm_layer("group_norm", jnp.float32, "bn1", groups=num_groups)
  variables = layer.init(jax.random.PRNGKey(0), x)
  y = np.asarray(layer.apply(variables, x))
  groups = x.reshape(2, 5, 6, num_groups, 64 // num_groups)
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


def test_group_count_reaches_every_norm_of_a_narrow_backbone():
  config = _config("group_norm")
  config.model.backbone_width = 16
  with pytest.raises(ValueError, match=r"group_norm_groups=32 to divide it \(try 16\)"):
    models.build_model(config.model)
  config.model.group_norm_groups = 8
  model = models.build_model(config.model)
  images = jax.random.normal(jax.random.PRNGKey(1), (1, 64, 64, 3))
  variables = model.init(jax.random.PRNGKey(0), images, jnp.ones((1, 64, 64), bool))
  params = {"params": variables["params"]["backbone"]}
  out = model.apply(variables, images, jnp.ones((1, 64, 64), bool),
                    capture_intermediates=lambda m, _: m.name == "backbone")
  features = out[1]["intermediates"]["backbone"]["__call__"][0]
  backbone = lambda g: resnet.ResNet(config.model.backbone, width=16, norm="group_norm",
                                     norm_groups=g)
  np.testing.assert_allclose(features, backbone(8).apply(params, images), atol=1e-5)
  # Every GroupNorm the model calls (stem, each block's and each downsample's) has 8 groups.
  counts = []
  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.GroupNorm) and context.method_name == "__call__":
      counts.append(context.module.num_groups)
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(record):
    model.apply(variables, images, jnp.ones((1, 64, 64), bool))
  num_norms = len([k for k in jax.tree_util.tree_flatten_with_path(params)[0]
                   if k[0][-1].key == "scale"])
  assert counts == [8] * num_norms and num_norms > 8
  # The count matters: the same weights with 16 groups give other features.
  assert np.abs(features - backbone(16).apply(params, images)).max() > 1e-3
