"""`model.backbone_stages = 3`: the ResNet ends at layer3 and DETR reads its stride-16 map."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny_test
from detr_jax.models import build_model
from detr_jax.models import resnet


@pytest.mark.parametrize("arch,width", [("resnet18", 16), ("resnet50", 64)])
def test_three_stages_are_the_standard_resnet_up_to_layer3(arch, width):
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 96, 3))
  full = resnet.ResNet(arch, width=width)
  variables = full.init(jax.random.PRNGKey(0), images)
  _, captured = full.apply(variables, images, capture_intermediates=True)
  last_layer3 = max(k for k in captured["intermediates"] if k.startswith("layer3_"))
  expected = captured["intermediates"][last_layer3]["__call__"][0]

  three = resnet.ResNet(arch, width=width, stages=3)
  # The same parameters without layer4's: the 3-stage tree is the 4-stage one less layer4.
  shapes = jax.eval_shape(three.init, jax.random.PRNGKey(0), images)
  kept = {c: {k: v for k, v in tree.items() if not k.startswith("layer4_")}
          for c, tree in variables.items()}
  assert jax.tree.map(lambda x: x.shape, kept) == jax.tree.map(lambda x: x.shape, shapes)
  features = three.apply(kept, images)
  assert features.shape == (2, 4, 6, resnet.backbone_channels(arch, width, stages=3))
  assert features.shape[-1] == resnet.backbone_channels(arch, width) // 2
  np.testing.assert_array_equal(np.asarray(features), np.asarray(expected))
  assert resnet.feature_stride(False, 3) == 16 and resnet.feature_stride(False) == 32


def test_detr_with_three_stages_reads_the_stride_16_grid():
  config = tiny_test.get_config()
  config.model.backbone = "resnet18"
  config.model.backbone_width = 16
  config.model.backbone_stages = 3
  model = build_model(config.model)
  images = jnp.zeros((1, 64, 96, 3))
  mask = jnp.ones((1, 64, 96), bool).at[:, :, 64:].set(False)
  variables = model.init(jax.random.PRNGKey(0), images, mask)
  flat = flax.traverse_util.flatten_dict(variables["params"], sep="/")
  assert not any(k.startswith("backbone/layer4") for k in flat)
  assert flat["input_proj/kernel"].shape == (1, 1, 64, config.model.hidden_dim)
  out = model.apply(variables, images, mask, capture_attention=True)
  assert out["attention"].shape[-2:] == (4, 6)  # 64 x 96 at stride 16
  # The padded columns (64..95 of the image: feature columns 4, 5) get no attention.
  np.testing.assert_array_equal(np.asarray(out["feature_mask"])[0].sum(axis=0),
                                [4, 4, 4, 4, 0, 0])
  assert np.all(np.asarray(out["attention"])[..., 4:] == 0)


def test_bad_backbone_stages_are_config_errors(tmp_path):
  from detr_jax import export  # pylint: disable=g-import-not-at-top
  config = tiny_test.get_config()
  config.model.backbone_stages = 5
  with pytest.raises(ValueError, match="backbone_stages=5"):
    build_model(config.model)
  config.model.backbone_stages = 3
  config.model.backbone, config.model.dilation = "resnet50", True
  with pytest.raises(ValueError, match="dilates layer4"):
    build_model(config.model)
  config.model.backbone, config.model.dilation = "resnet18", False
  config.model.train_backbone_from = "layer4"
  with pytest.raises(ValueError, match="train_backbone_from='layer4'"):
    build_model(config.model)
  config.model.train_backbone_from = "layer2"
  model = build_model(config.model)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)),
                         jnp.ones((1, 64, 64), bool))
  with pytest.raises(ValueError, match="backbone_stages=3"):
    export.export(variables, config.model, "official", str(tmp_path / "out.pth"), {})
