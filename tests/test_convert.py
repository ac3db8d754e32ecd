"""Tests of detr_jax.convert: PyTorch DETR weights -> Flax variables, number for number.

The reference is transformers' DetrForObjectDetection (PyTorch) with random weights; the official
layout is derived from it by the documented key mapping in tests/torch_reference.py, written
independently of the converter.
"""

import sys

import jax
import numpy as np
import pytest
import torch

from configs import detr_r101_coco
from configs import detr_r50_coco
from configs import detr_r50_dc5_coco
from configs import tiny_test
from detr_jax import convert
from detr_jax.models import build_model
from detr_jax.models import resnet
import torch_reference

ATOL = 1e-4
# A DETR-R50 with a small transformer (same sizes on both sides); full ResNet-50 backbone.
HF_KWARGS = dict(d_model=64, encoder_attention_heads=4, decoder_attention_heads=4,
                 encoder_layers=2, decoder_layers=3, encoder_ffn_dim=96, decoder_ffn_dim=96,
                 num_queries=12, num_labels=9, dropout=0.0)


def _model_config(**overrides):
  model_config = detr_r50_coco.get_config().model
  model_config.update(dict(hidden_dim=64, num_heads=4, enc_layers=2, dec_layers=3,
                           dim_feedforward=96, num_queries=12, num_classes=9, dropout=0.0))
  model_config.update(overrides)
  return model_config


_padded_batch = torch_reference.padded_batch


def _hf_outputs(hf_model, images, pixel_mask):
  """Final and per-layer (aux) outputs of the HF model on NHWC numpy inputs."""
  with torch.no_grad():
    out = hf_model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
                   pixel_mask=torch.from_numpy(pixel_mask.astype(np.int64)),
                   output_hidden_states=True)
    # decoder_hidden_states: (input, layer 0, ..., layer L-1), un-normed with auxiliary_loss=False,
    # which is what the official decoder feeds forward; the heads see the shared final norm.
    aux = []
    for hidden in out.decoder_hidden_states[1:-1]:
      normed = hf_model.model.decoder.layernorm(hidden)
      aux.append({"pred_logits": hf_model.class_labels_classifier(normed).numpy(),
                  "pred_boxes": hf_model.bbox_predictor(normed).sigmoid().numpy()})
  return {"pred_logits": out.logits.numpy(), "pred_boxes": out.pred_boxes.numpy(),
          "aux_outputs": aux}


def _apply(model_config, variables, images, pixel_mask):
  model = build_model(model_config)
  return jax.jit(lambda v, x, m: model.apply(v, x, m, train=False))(variables, images, pixel_mask)


def _assert_trees_equal(actual, expected):
  flat_actual = dict(jax.tree_util.tree_leaves_with_path(actual))
  flat_expected = dict(jax.tree_util.tree_leaves_with_path(expected))
  assert flat_actual.keys() == flat_expected.keys()
  for path, value in flat_expected.items():
    np.testing.assert_array_equal(np.asarray(flat_actual[path]), value, err_msg=str(path))


@pytest.fixture(scope="module")
def hf_model():
  return torch_reference.random_hf_detr(seed=0, **HF_KWARGS)


@pytest.fixture(scope="module")
def hf_state_dict(hf_model):
  return torch_reference.numpy_state_dict(hf_model)


@pytest.fixture(scope="module")
def hf_variables(hf_state_dict):
  return convert.from_torch_state_dict(hf_state_dict, _model_config())


def test_hf_parity_r50(hf_model, hf_variables):
  """Converted HF weights give HF's outputs (final and per decoder layer) on a padded batch."""
  images, pixel_mask = _padded_batch()
  expected = _hf_outputs(hf_model, images, pixel_mask)
  actual = _apply(_model_config(aux_loss=True), hf_variables, images, pixel_mask)
  assert np.abs(expected["pred_logits"]).max() > 0.1  # the comparison is not trivially small
  for key in ("pred_logits", "pred_boxes"):
    np.testing.assert_allclose(actual[key], expected[key], atol=ATOL, rtol=0, err_msg=key)
  assert len(actual["aux_outputs"]) == len(expected["aux_outputs"]) == HF_KWARGS[
      "decoder_layers"] - 1
  for i, (got, want) in enumerate(zip(actual["aux_outputs"], expected["aux_outputs"])):
    for key in ("pred_logits", "pred_boxes"):
      np.testing.assert_allclose(got[key], want[key], atol=ATOL, rtol=0, err_msg=f"aux {i} {key}")


def test_hf_parity_resnet18_learned_position_embedding():
  """ResNet-18 (BasicBlock) and the learned position embedding match HF too."""
  hf_model = torch_reference.random_hf_detr(seed=1, position_embedding_type="learned",
                                            **torch_reference.TINY_HF_KWARGS)
  model_config = tiny_test.get_config().model
  model_config.update(num_classes=5, position_embedding="learned", aux_loss=False)
  variables = convert.from_torch_state_dict(torch_reference.numpy_state_dict(hf_model),
                                            model_config)
  images, pixel_mask = _padded_batch()
  expected = _hf_outputs(hf_model, images, pixel_mask)
  actual = _apply(model_config, variables, images, pixel_mask)
  for key in ("pred_logits", "pred_boxes"):
    np.testing.assert_allclose(actual[key], expected[key], atol=ATOL, rtol=0, err_msg=key)


def test_variables_have_the_model_tree(hf_variables):
  """Variables have the model's tree and the frozen BN constants land in batch_stats."""
  expected = jax.eval_shape(
      build_model(_model_config()).init, jax.random.key(0), *map(np.asarray, _padded_batch()))
  assert jax.tree.structure(dict(hf_variables)) == jax.tree.structure(
      {k: expected[k] for k in ("params", "batch_stats")})
  assert hf_variables["params"]["backbone"]["conv1"]["kernel"].shape == (7, 7, 3, 64)
  assert not np.allclose(hf_variables["batch_stats"]["backbone"]["bn1"]["var"], 1.0)


@pytest.mark.parametrize("variant", ["official", "wrapped", "panoptic", "published_hf",
                                     "hf_4x_own_resnet"])
def test_other_layouts_give_identical_variables(variant, hf_state_dict, hf_variables):
  """Official (bare, {"model": ...}, panoptic `detr.`) and HF stored names convert the same."""
  official = torch_reference.hf_to_official(hf_state_dict)
  if variant == "official":
    # The mapped names and shapes are exactly the official ones (enumerated from the official
    # model's module names).
    assert {k: v.shape for k, v in official.items()} == torch_reference.official_shapes(
        num_classes=9, num_queries=12, hidden_dim=64, dim_feedforward=96, enc_layers=2,
        dec_layers=3)
    state_dict = official
  elif variant == "wrapped":
    state_dict = {"model": {**official, "backbone.0.body.bn1.num_batches_tracked": np.zeros(())}}
  elif variant == "panoptic":
    state_dict = {f"detr.{k}": v for k, v in official.items()}
    state_dict["bbox_attention.q_linear.weight"] = np.zeros((64, 64), np.float32)
    state_dict["mask_head.lay1.weight"] = np.zeros((72, 72, 3, 3), np.float32)
    state_dict = {"model": state_dict}
  elif variant == "published_hf":
    state_dict = torch_reference.hf_to_published_names(hf_state_dict)
    assert "model.backbone.conv_encoder.model.layer1.0.conv1.weight" in state_dict
  else:  # transformers 4.x with its own ResNet: conv_encoder prefix, out_proj, fc1
    state_dict = {k.replace("model.backbone.model.", "model.backbone.conv_encoder.model.")
                  .replace(".o_proj.", ".out_proj.").replace(".mlp.fc", ".fc"): v
                  for k, v in hf_state_dict.items()}
  _assert_trees_equal(convert.from_torch_state_dict(state_dict, _model_config()), hf_variables)


@pytest.mark.parametrize("config_module,blocks", [(detr_r101_coco, (3, 4, 23, 3)),
                                                  (detr_r50_dc5_coco, (3, 4, 6, 3))])
def test_official_r101_and_dc5_shapes_convert(config_module, blocks):
  """Full-size official R101 / DC5 checkpoints (zeros of the real shapes) convert completely."""
  shapes = torch_reference.official_shapes(blocks=blocks)
  if blocks == (3, 4, 6, 3):
    assert len(shapes) == 458  # tensors in the published detr-r50-e632da11.pth
  state_dict = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  # One recognisable fused projection, to check the [q; k; v] split and the transpose.
  in_proj = np.arange(768 * 256, dtype=np.float32).reshape(768, 256)
  state_dict["transformer.decoder.layers.5.multihead_attn.in_proj_weight"] = in_proj
  model_config = config_module.get_config().model
  variables = convert.from_torch_state_dict({"model": state_dict}, model_config)
  num_arrays = len(jax.tree.leaves(variables))
  assert num_arrays == len(shapes) + 2 * 2 * (6 + 6 * 2)  # each in_proj pair becomes 3 pairs
  cross = variables["params"]["transformer"]["decoder_layer_5"]["cross_attn"]
  np.testing.assert_array_equal(cross["query"]["kernel"], in_proj[:256].T)
  np.testing.assert_array_equal(cross["key"]["kernel"], in_proj[256:512].T)
  np.testing.assert_array_equal(cross["value"]["kernel"], in_proj[512:].T)
  assert len([k for k in variables["params"]["backbone"] if k.startswith("layer3_")]) == blocks[2]


def test_errors_name_the_problem(hf_state_dict):
  official = torch_reference.hf_to_official(hf_state_dict)
  model_config = _model_config()

  missing = dict(official)
  del missing["transformer.decoder.layers.1.norm2.bias"]
  with pytest.raises(ValueError, match="decoder_layer_1/norm2/bias"):
    convert.from_torch_state_dict(missing, model_config)

  unknown = {**official, "transformer.decoder.extra_head.weight": np.zeros((3,), np.float32)}
  with pytest.raises(ValueError, match="transformer.decoder.extra_head.weight"):
    convert.from_torch_state_dict(unknown, model_config)

  wrong_shape = {**official, "bbox_embed.layers.1.bias": np.zeros((65,), np.float32)}
  with pytest.raises(ValueError, match="bbox_embed.layers.1.bias -> params/bbox_embed/layers_1/b"):
    convert.from_torch_state_dict(wrong_shape, model_config)

  with pytest.raises(ValueError, match="num_queries=12"):
    convert.from_torch_state_dict(official, _model_config(num_queries=100))
  with pytest.raises(ValueError, match="num_classes=9"):
    convert.from_torch_state_dict(official, _model_config(num_classes=91))
  with pytest.raises(ValueError, match="dec_layers=3"):
    convert.from_torch_state_dict(official, _model_config(dec_layers=6))
  with pytest.raises(ValueError, match="backbone=resnet50"):
    convert.from_torch_state_dict(official, _model_config(backbone="resnet101"))
  with pytest.raises(ValueError, match="Unrecognised state_dict"):
    convert.from_torch_state_dict({"foo.weight": np.zeros(3)}, model_config)


@pytest.mark.parametrize("arch,dilation", [("resnet18", False), ("resnet50", True)])
def test_backbone_from_torchvision(arch, dilation):
  """torchvision-layout ImageNet weights give the torch ResNet's features (incl. DC5 dilation)."""
  torch.manual_seed(0)
  block_type, blocks = resnet.RESNET_ARCHS[arch]
  block = torch_reference.BasicBlock if block_type == "basic" else torch_reference.Bottleneck
  torch_model = torch_reference.TorchvisionResNet(block, blocks, dilate_last=dilation).eval()
  torch_reference.randomize_frozen_batchnorm(torch_model, torch.Generator().manual_seed(1))
  state_dict = dict(torch_model.state_dict())
  state_dict["bn1.num_batches_tracked"] = torch.tensor(0)
  model_config = _model_config(backbone=arch, dilation=dilation)

  variables = convert.backbone_from_torchvision(state_dict, model_config)
  images = np.random.default_rng(0).normal(size=(1, 64, 96, 3)).astype(np.float32)
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  backbone = resnet.ResNet(arch, dilation)
  actual = backbone.apply({"params": variables["params"]["backbone"],
                           "batch_stats": variables["batch_stats"]["backbone"]}, images)
  np.testing.assert_allclose(np.asarray(actual), expected.transpose(0, 2, 3, 1), atol=ATOL,
                             rtol=1e-4)
  with pytest.raises(ValueError, match="backbone=" + arch):
    convert.backbone_from_torchvision(
        state_dict, _model_config(backbone="resnet34" if arch == "resnet18" else "resnet101"))


def test_convert_file_round_trip(tmp_path, monkeypatch):
  """.safetensors (HF names) and .pth ({"model": official}) -> convert_file -> load_variables.

  The command line (`python -m detr_jax.convert`) is run in tests/test_commands.py.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  hf_model = torch_reference.random_hf_detr(seed=3, **torch_reference.TINY_HF_KWARGS)
  hf_state_dict = torch_reference.numpy_state_dict(hf_model)
  model_config = tiny_test.get_config().model
  model_config.num_classes = 5
  expected = convert.from_torch_state_dict(hf_state_dict, model_config)

  safetensors_file = str(tmp_path / "detr.safetensors")
  save_file(hf_state_dict, safetensors_file)
  pth_file = str(tmp_path / "detr.pth")
  torch.save({"model": {k: torch.from_numpy(v) for k, v in
                        torch_reference.hf_to_official(hf_state_dict).items()}}, pth_file)

  message = convert.convert_file(pth_file, model_config, str(tmp_path / "from_pth"))
  assert message.startswith(f"Converted {pth_file} (official layout, ")
  message = convert.convert_file(safetensors_file, model_config, str(tmp_path / "from_safetensors"))
  assert "(huggingface layout" in message

  for name in ("from_pth", "from_safetensors"):
    assert (tmp_path / name / "config.json").exists()
    _assert_trees_equal(convert.load_variables(str(tmp_path / name)), expected)

  images, pixel_mask = _padded_batch()
  with torch.no_grad():
    hf_logits = hf_model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
                         pixel_mask=torch.from_numpy(pixel_mask.astype(np.int64))).logits.numpy()
  loaded = convert.load_variables(str(tmp_path / "from_pth"))
  actual = _apply(model_config, loaded, images, pixel_mask)
  np.testing.assert_allclose(actual["pred_logits"], hf_logits, atol=ATOL, rtol=0)

  tiny_config = tiny_test.get_config().model  # num_classes=6: not the checkpoint's 5
  with pytest.raises(ValueError, match="num_classes=5"):
    convert.convert_file(pth_file, tiny_config, str(tmp_path / "again"))
  with pytest.raises(ValueError, match="exists"):
    convert.convert_file(pth_file, model_config, str(tmp_path / "from_pth"))
  with pytest.raises(ValueError, match="No converted checkpoint"):
    convert.load_variables(str(tmp_path / "nothing_here"))
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  with pytest.raises(ImportError, match=r"pip install -e \"\.\[convert\]\""):
    convert.read_state_dict(pth_file)
