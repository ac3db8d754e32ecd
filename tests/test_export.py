"""detr_jax.export: to transformers (loaded back with from_pretrained) and to official names.

The references are transformers' DetrForObjectDetection, which must load the exported folder
and give the JAX model's outputs, and the official checkpoint layout of
`torch_reference.official_shapes` (written from the official module names, independently of the
exporter); `convert.from_torch_state_dict` must read every export back bit for bit.
"""

import numpy as np
import pytest
import torch

from configs import detr_r101_coco
from configs import detr_r50_coco
from configs import detr_r50_dc5_coco
from configs import tiny_test
from detr_jax import convert
from detr_jax import export
from detr_jax.models import build_model
import torch_reference

ATOL = 1e-4


def _random_variables(model_config, seed=0):
  """Every variable random (frozen BatchNorm included: scale and var positive)."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, shape in convert._expected_flat(model_config).items():  # pylint: disable=protected-access
    value = rng.normal(0, 0.05, shape.shape).astype(np.float32)
    if path.startswith("batch_stats/") and path.endswith(("/scale", "/var")):
      value = (0.5 + rng.random(shape.shape)).astype(np.float32)
    flat[path] = value
  return convert._unflatten(flat)  # pylint: disable=protected-access


_flat = torch_reference.flat_tree


def _small_r50(**overrides):
  model_config = detr_r50_coco.get_config().model
  model_config.update(dict(hidden_dim=64, num_heads=4, enc_layers=2, dec_layers=3,
                           dim_feedforward=96, num_queries=12, num_classes=9, dropout=0.0))
  model_config.update(overrides)
  return model_config


def _tiny(**overrides):
  model_config = tiny_test.get_config().model
  model_config.update(num_classes=6, **overrides)
  return model_config


@pytest.mark.parametrize("name,model_config,blocks", [
    ("r18", _tiny(), None),
    ("r50", detr_r50_coco.get_config().model, (3, 4, 6, 3)),
    ("r101", detr_r101_coco.get_config().model, (3, 4, 23, 3)),
    ("r50_dc5", detr_r50_dc5_coco.get_config().model, (3, 4, 6, 3)),
])
def test_both_formats_convert_back_bit_for_bit(name, model_config, blocks):
  variables = _random_variables(model_config, seed=len(name))
  official = export.to_state_dict(variables, "official")
  if blocks is not None:  # the published official layout, name for name and shape for shape
    expected = torch_reference.official_shapes(blocks=blocks)
    assert {k: v.shape for k, v in official.items()} == expected
  hf = export.to_state_dict(variables, "hf", timm_backbone=bool(model_config.dilation))
  for state in (official, hf, {"model": official}):
    back = convert.from_torch_state_dict(state, model_config)
    got, want = _flat(back), _flat(variables)
    assert set(got) == set(want)
    for path, value in want.items():
      np.testing.assert_array_equal(got[path], value, err_msg=f"{name} {path}")


_padded_batch = torch_reference.padded_batch


@pytest.mark.parametrize("model_config", [_small_r50(), _tiny(position_embedding="learned")],
                         ids=["r50", "r18_learned"])
def test_hf_export_loads_in_transformers_with_the_same_outputs(tmp_path, monkeypatch,
                                                               model_config):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  from transformers import DetrForObjectDetection  # pylint: disable=g-import-not-at-top
  variables = _random_variables(model_config, seed=3)
  names = {i: f"class_{i}" for i in range(1, model_config.num_classes)}  # 0 unnamed
  out = tmp_path / "hf"
  line = export.export(variables, model_config, "hf", str(out), names)
  assert str(out) in line
  hf_model = DetrForObjectDetection.from_pretrained(str(out)).eval()
  assert hf_model.config.id2label[1] == "class_1" and hf_model.config.id2label[0] == "N/A"
  assert hf_model.config.num_labels == model_config.num_classes
  images, pixel_mask = _padded_batch()
  with torch.no_grad():
    expected = hf_model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
                        pixel_mask=torch.from_numpy(pixel_mask.astype(np.int64)))
  model = build_model(model_config)
  actual = model.apply(variables, images, pixel_mask, train=False)
  np.testing.assert_allclose(actual["pred_logits"], expected.logits.numpy(), atol=ATOL)
  np.testing.assert_allclose(actual["pred_boxes"], expected.pred_boxes.numpy(), atol=ATOL)


def test_official_export_is_a_torch_checkpoint(tmp_path):
  model_config = _tiny()
  variables = _random_variables(model_config, seed=4)
  path = tmp_path / "detr.pth"
  export.export(variables, model_config, "official", str(path), {})
  loaded = torch.load(path, map_location="cpu", weights_only=True)
  assert set(loaded) == {"model"}
  back = convert.from_torch_state_dict(loaded, model_config)
  for key, value in _flat(variables).items():
    np.testing.assert_array_equal(_flat(back)[key], value, err_msg=key)


def test_export_errors_are_clear(tmp_path):
  model_config = _tiny(pre_norm=True)
  variables = _random_variables(model_config)
  with pytest.raises(ValueError, match="pre_norm"):
    export.export(variables, model_config, "hf", str(tmp_path / "a"), {})
  with pytest.raises(ValueError, match="format"):
    export.export(variables, model_config, "onnx", str(tmp_path / "b"), {})
  (tmp_path / "exists").mkdir()
  with pytest.raises(ValueError, match="exists"):
    export.export(variables, model_config, "official", str(tmp_path / "exists"), {})
  # A pre-norm model still exports in official names and reads back.
  back = convert.from_torch_state_dict(export.to_state_dict(variables, "official"), model_config)
  assert "encoder_norm" in back["params"]["transformer"]
