"""Tests of detr_jax.models: parity with Hugging Face DETR (PyTorch), shapes, init, masking."""

import math

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.detr import modeling_detr

from configs import detr_r50_coco
from configs import tiny_test
from detr_jax.models import build_model
from detr_jax.models import param_labels
from detr_jax.models import position_encoding
from detr_jax.models import resnet
from detr_jax.models import transformer as transformer_lib


def _tiny_config(**overrides):
  config = tiny_test.get_config().model
  for key, value in overrides.items():
    config[key] = value
  return config


def _inputs(batch=2, height=64, width=48, seed=0, valid_size=None):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, height, width, 3)).astype(np.float32)
  pixel_mask = np.ones((batch, height, width), bool)
  valid_height, valid_width = valid_size or (height * 2 // 3, width // 2 + 3)
  pixel_mask[-1, valid_height:, :] = False  # last image padded bottom and right
  pixel_mask[-1, :, valid_width:] = False
  images[~pixel_mask] = 0.0
  return jnp.asarray(images), jnp.asarray(pixel_mask)


@pytest.fixture(scope="module")
def tiny_variables():
  """Variables of the tiny config; dropout, aux_loss and dtype do not change the tree."""
  config = _tiny_config()
  images, pixel_mask = _inputs(batch=1, height=32, width=32)
  model = build_model(config)
  return jax.jit(lambda: model.init(jax.random.PRNGKey(0), images, pixel_mask))()


def _path_shapes(tree):
  flat = flax.traverse_util.flatten_dict(tree, sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


# --------------------------------------------------------------------------------------------
# Parity with transformers' DetrForObjectDetection (PyTorch, its own ResNet-50 backbone).
# --------------------------------------------------------------------------------------------


def _hf_to_flax(state_dict, num_enc, num_dec):
  """Maps a transformers DETR (use_timm_backbone=False) state_dict onto our variables."""
  sd = {k: v.detach().numpy().astype(np.float32) for k, v in state_dict.items()}
  params, stats = {}, {}

  def put(tree, path, value):
    *parents, leaf = path.split("/")
    for p in parents:
      tree = tree.setdefault(p, {})
    tree[leaf] = value

  def conv(prefix, path):
    put(params, path + "/kernel", sd[prefix + ".weight"].transpose(2, 3, 1, 0))

  def bn(prefix, path):
    for ours, theirs in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"),
                         ("var", "running_var")):
      put(stats, f"{path}/{ours}", sd[f"{prefix}.{theirs}"])

  def dense(prefix, path):
    put(params, path + "/kernel", sd[prefix + ".weight"].T)
    put(params, path + "/bias", sd[prefix + ".bias"])

  def norm(prefix, path):
    put(params, path + "/scale", sd[prefix + ".weight"])
    put(params, path + "/bias", sd[prefix + ".bias"])

  def attention(prefix, path):
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"),
                         ("out", "o_proj")):
      dense(f"{prefix}.{theirs}", f"{path}/{ours}")

  body = "model.backbone.model."
  conv(body + "embedder.embedder.convolution", "backbone/conv1")
  bn(body + "embedder.embedder.normalization", "backbone/bn1")
  for stage, blocks in enumerate((3, 4, 6, 3)):
    for j in range(blocks):
      hf, ours = f"{body}encoder.stages.{stage}.layers.{j}", f"backbone/layer{stage + 1}_{j}"
      for c in range(3):
        conv(f"{hf}.layer.{c}.convolution", f"{ours}/conv{c + 1}")
        bn(f"{hf}.layer.{c}.normalization", f"{ours}/bn{c + 1}")
      if j == 0:
        conv(f"{hf}.shortcut.convolution", f"{ours}/downsample_conv")
        bn(f"{hf}.shortcut.normalization", f"{ours}/downsample_bn")
  put(params, "input_proj/kernel", sd["model.input_projection.weight"].transpose(2, 3, 1, 0))
  put(params, "input_proj/bias", sd["model.input_projection.bias"])
  put(params, "query_embed/embedding", sd["model.query_position_embeddings.weight"])
  for i in range(num_enc):
    hf, ours = f"model.encoder.layers.{i}", f"transformer/encoder_layer_{i}"
    attention(hf + ".self_attn", ours + "/self_attn")
    dense(hf + ".mlp.fc1", ours + "/linear1")
    dense(hf + ".mlp.fc2", ours + "/linear2")
    norm(hf + ".self_attn_layer_norm", ours + "/norm1")
    norm(hf + ".final_layer_norm", ours + "/norm2")
  for i in range(num_dec):
    hf, ours = f"model.decoder.layers.{i}", f"transformer/decoder_layer_{i}"
    attention(hf + ".self_attn", ours + "/self_attn")
    attention(hf + ".encoder_attn", ours + "/cross_attn")
    dense(hf + ".mlp.fc1", ours + "/linear1")
    dense(hf + ".mlp.fc2", ours + "/linear2")
    norm(hf + ".self_attn_layer_norm", ours + "/norm1")
    norm(hf + ".encoder_attn_layer_norm", ours + "/norm2")
    norm(hf + ".final_layer_norm", ours + "/norm3")
  norm("model.decoder.layernorm", "transformer/decoder_norm")
  dense("class_labels_classifier", "class_embed")
  for i in range(3):
    dense(f"bbox_predictor.layers.{i}", f"bbox_embed/layers_{i}")
  return {"params": params, "batch_stats": stats}


@pytest.mark.parametrize("enc_layers", [2, 0])  # 0: no encoder (the paper's Table 2 ablation)
def test_matches_huggingface_detr_resnet50(enc_layers):
  torch.manual_seed(0)
  hf_config = transformers.DetrConfig(
      use_timm_backbone=False, use_pretrained_backbone=False, d_model=32,
      encoder_layers=enc_layers,
      decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
      encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=5, num_labels=6,
      auxiliary_loss=False)
  hf_model = transformers.DetrForObjectDetection(hf_config).eval()
  with torch.no_grad():  # non-trivial frozen BatchNorm statistics
    for module in hf_model.modules():
      if isinstance(module, modeling_detr.DetrFrozenBatchNorm2d):
        n = module.weight.shape[0]
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.1)
        module.running_mean.normal_(0.0, 0.1)
        module.running_var.uniform_(0.5, 2.0)
        assert n > 0
    # Spread the boxes and logits away from sigmoid(0) = 0.5 so that they are sensitive.
    for layer in hf_model.bbox_predictor.layers:
      layer.weight.mul_(6.0)
    hf_model.class_labels_classifier.weight.mul_(20.0)
  # Odd sizes check PyTorch's conv padding; on the 3x3 feature map the valid 50x70 region keeps
  # feature row/column 2 with torch's nearest rule (source pixel 44 / 62) but not with
  # pixel-centre sampling (55 / 77), so the mask downsampling rule is checked too.
  images, pixel_mask = _inputs(batch=2, height=67, width=93, valid_size=(50, 70))
  with torch.no_grad():
    hf_out = hf_model(pixel_values=torch.from_numpy(np.array(images)).permute(0, 3, 1, 2),
                      pixel_mask=torch.from_numpy(np.array(pixel_mask)).long(),
                      output_hidden_states=True)
    # Aux heads: shared decoder layernorm on each un-normed intermediate decoder state.
    hf_aux = []
    for hidden in hf_out.decoder_hidden_states[1:-1]:
      normed = hf_model.model.decoder.layernorm(hidden)
      hf_aux.append((hf_model.class_labels_classifier(normed),
                     hf_model.bbox_predictor(normed).sigmoid()))

  config = _tiny_config(backbone="resnet50", hidden_dim=32, num_heads=4, enc_layers=enc_layers,
                        dec_layers=3, dim_feedforward=64, num_queries=5, num_classes=6)
  model = build_model(config)
  variables = _hf_to_flax(hf_model.state_dict(), enc_layers, 3)
  expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, pixel_mask))
  assert _path_shapes(variables) == _path_shapes(expected)
  out = jax.jit(model.apply)(variables, images, pixel_mask)
  np.testing.assert_allclose(out["pred_logits"], hf_out.logits.numpy(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out["pred_boxes"], hf_out.pred_boxes.numpy(), rtol=1e-4, atol=1e-5)
  assert len(out["aux_outputs"]) == 2
  for ours, (logits, boxes) in zip(out["aux_outputs"], hf_aux):
    np.testing.assert_allclose(ours["pred_logits"], logits.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours["pred_boxes"], boxes.numpy(), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Shapes, variants, dtypes.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [
    {},
    {"pre_norm": True, "position_embedding": "learned"},  # both add parameters: one compile
    {"dtype": "bfloat16", "aux_loss": False},
])
def test_forward_variants(overrides, tiny_variables):
  config = _tiny_config(**overrides)
  model = build_model(config)
  images, pixel_mask = _inputs()
  if config.pre_norm or config.position_embedding == "learned":  # these add parameters
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), images, pixel_mask))()
  else:
    variables = tiny_variables
  out = jax.jit(model.apply)(variables, images, pixel_mask)
  batch, queries = images.shape[0], config.num_queries
  assert out["pred_logits"].shape == (batch, queries, config.num_classes + 1)
  assert out["pred_boxes"].shape == (batch, queries, 4)
  assert out["pred_logits"].dtype == jnp.float32 and out["pred_boxes"].dtype == jnp.float32
  assert len(out["aux_outputs"]) == (config.dec_layers - 1 if config.aux_loss else 0)
  for o in [out] + out["aux_outputs"]:
    assert o["pred_logits"].shape == out["pred_logits"].shape
    assert np.isfinite(o["pred_logits"]).all() and np.isfinite(o["pred_boxes"]).all()
    assert ((o["pred_boxes"] >= 0) & (o["pred_boxes"] <= 1)).all()
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32  # parameters stay float32 whatever the compute dtype
  transformer = variables["params"]["transformer"]
  assert ("encoder_norm" in transformer) == bool(config.pre_norm)
  assert ("position_embedding" in variables["params"]) == (config.position_embedding == "learned")
  _, inter = jax.eval_shape(
      lambda v: model.apply(v, images, pixel_mask, capture_intermediates=True,
                            mutable=["intermediates"]), variables)
  hidden = inter["intermediates"]["transformer"]["__call__"][0]  # [L, B, Q, D]
  features = inter["intermediates"]["backbone"]["__call__"][0]
  expected_dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
  assert hidden.dtype == features.dtype == expected_dtype  # the compute runs in config.dtype


@pytest.mark.parametrize("arch,dilation,stride", [
    ("resnet18", False, 32), ("resnet34", False, 32), ("resnet50", False, 32),
    ("resnet50", True, 16), ("resnet101", False, 32), ("resnet101", True, 16)])
def test_backbone_stride_and_channels(arch, dilation, stride):
  height, width = 131, 97  # odd: output size is PyTorch's ceil-like rule, not SAME's

  def torch_out(size):  # conv 7x7/2 p3, maxpool 3/2 p1, then 3x3/2 p1 per strided stage
    size = (size + 6 - 7) // 2 + 1
    size = (size + 2 - 3) // 2 + 1
    for _ in range(int(math.log2(stride)) - 2):
      size = (size + 2 - 3) // 2 + 1
    return size

  module = resnet.ResNet(arch, dilation)
  images = jnp.zeros((1, height, width, 3))
  variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), images)
  features = jax.eval_shape(module.apply, variables, images)
  assert features.shape == (1, torch_out(height), torch_out(width),
                            resnet.backbone_channels(arch))
  blocks = resnet.RESNET_ARCHS[arch][1]
  for stage, num in enumerate(blocks):
    assert f"layer{stage + 1}_{num - 1}" in variables["params"]
    assert f"layer{stage + 1}_{num}" not in variables["params"]


def test_dc5_layer4_uses_dilation():
  # XLA's convolutions, so that every conv of the architecture shows as a conv op (the "auto"
  # implementation computes 1x1 convs as dots on CPU; tests/test_conv.py checks they agree).
  module = resnet.ResNet("resnet50", dilation=True, conv_implementation="xla")
  images = jnp.zeros((1, 64, 64, 3))
  variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), images)
  # torchvision keeps a 1x1 downsample (stride 1) in layer4_0 even without the stride.
  assert variables["params"]["layer4_0"]["downsample_conv"]["kernel"].shape == (1, 1, 1024, 2048)
  # torchvision `_make_layer(dilate=True)`: layer4_0 keeps dilation 1 (its stride becomes 1),
  # layer4_1 and layer4_2 use dilation 2 on their 3x3 conv; no other conv is dilated.
  jaxpr = jax.make_jaxpr(module.apply)(variables, images)
  convs = [eqn.params for eqn in jaxpr.eqns if eqn.primitive.name == "conv_general_dilated"]
  assert len(convs) == 53
  assert [c["rhs_dilation"] for c in convs].count((2, 2)) == 2
  assert all(c["rhs_dilation"] in ((1, 1), (2, 2)) for c in convs)
  strided = [c["window_strides"] for c in convs if c["window_strides"] != (1, 1)]
  assert len(strided) == 5  # stem, layer2_0 and layer3_0 (3x3 conv and downsample); none in layer4


def test_resnet50_param_tree_matches_documented_layout():
  config = detr_r50_coco.get_config().model
  model = build_model(config)
  images, pixel_mask = jnp.zeros((1, 64, 64, 3)), jnp.ones((1, 64, 64), bool)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, pixel_mask)
  assert set(variables) == {"params", "batch_stats"}
  params, stats = _path_shapes(variables["params"]), _path_shapes(variables["batch_stats"])
  d = config.hidden_dim
  assert params["backbone/conv1/kernel"] == (7, 7, 3, 64)
  assert params["backbone/layer1_0/conv3/kernel"] == (1, 1, 64, 256)
  assert params["backbone/layer2_0/conv2/kernel"] == (3, 3, 128, 128)
  assert params["backbone/layer4_0/downsample_conv/kernel"] == (1, 1, 1024, 2048)
  assert params["backbone/layer3_5/conv1/kernel"] == (1, 1, 1024, 256)
  assert "backbone/layer3_6/conv1/kernel" not in params
  assert "backbone/layer1_1/downsample_conv/kernel" not in params
  assert params["input_proj/kernel"] == (1, 1, 2048, d)
  assert params["input_proj/bias"] == (d,)
  for i in range(6):
    for name in ("query", "key", "value", "out"):
      assert params[f"transformer/encoder_layer_{i}/self_attn/{name}/kernel"] == (d, d)
      for attn in ("self_attn", "cross_attn"):
        assert params[f"transformer/decoder_layer_{i}/{attn}/{name}/bias"] == (d,)
    assert params[f"transformer/encoder_layer_{i}/linear1/kernel"] == (d, 2048)
    assert params[f"transformer/decoder_layer_{i}/linear2/kernel"] == (2048, d)
    assert params[f"transformer/decoder_layer_{i}/norm3/scale"] == (d,)
  assert params["transformer/decoder_norm/scale"] == (d,)
  assert not any("encoder_norm" in k for k in params)  # post-norm has no final encoder norm
  assert params["query_embed/embedding"] == (100, d)
  assert params["class_embed/kernel"] == (d, 92)
  assert params["bbox_embed/layers_2/kernel"] == (d, 4)
  assert stats["backbone/bn1/var"] == (64,)
  assert stats["backbone/layer4_2/bn3/mean"] == (2048,)
  assert stats["backbone/layer2_0/downsample_bn/scale"] == (512,)
  assert set(k.rsplit("/", 1)[1] for k in stats) == {"scale", "bias", "mean", "var"}
  # The official state_dict has 458 tensors; it fuses q/k/v kernels and biases into
  # in_proj_{weight,bias}, i.e. 4 fewer tensors per attention (6 encoder + 12 decoder).
  num_attention = sum(1 for k in params if k.endswith("/query/kernel"))
  assert num_attention == 18
  assert len(params) + len(stats) - 4 * num_attention == 458


# --------------------------------------------------------------------------------------------
# Position embedding and mask downsampling.
# --------------------------------------------------------------------------------------------


def _numpy_sine_embedding(valid, num_feats):
  """The official PositionEmbeddingSine(normalize=True), written out with numpy loops."""
  batch, height, width = valid.shape
  out = np.zeros((batch, height, width, 2 * num_feats))
  for b in range(batch):
    y = np.cumsum(valid[b].astype(np.float64), axis=0)
    x = np.cumsum(valid[b].astype(np.float64), axis=1)
    y = y / (y[-1:, :] + 1e-6) * 2 * np.pi
    x = x / (x[:, -1:] + 1e-6) * 2 * np.pi
    for f in range(num_feats):
      freq = 10000 ** (2 * (f // 2) / num_feats)
      trig = np.sin if f % 2 == 0 else np.cos
      out[b, :, :, f] = trig(y / freq)
      out[b, :, :, num_feats + f] = trig(x / freq)
  return out


def test_sine_position_embedding_matches_formula_and_huggingface():
  valid = np.ones((3, 7, 9), bool)
  valid[1, 5:, :] = False
  valid[2, :, 4:] = False
  valid[2, 6:, :] = False
  num_feats = 16
  ours = np.asarray(position_encoding.sine_position_embedding(jnp.asarray(valid), num_feats))
  np.testing.assert_allclose(ours, _numpy_sine_embedding(valid, num_feats), atol=2e-5)
  hf = modeling_detr.DetrSinePositionEmbedding(num_feats, normalize=True)
  hf_pos = hf(shape=(3, 2 * num_feats, 7, 9), device="cpu", dtype=torch.float32,
              mask=torch.from_numpy(valid))
  np.testing.assert_allclose(ours, hf_pos.permute(0, 2, 3, 1).numpy(), atol=2e-5)


def test_learned_position_embedding_layout():
  module = position_encoding.LearnedPositionEmbedding(num_pos_feats=6)
  mask = jnp.ones((2, 4, 5), bool)
  variables = module.init(jax.random.PRNGKey(0), mask)
  pos = np.asarray(module.apply(variables, mask))
  row = np.asarray(variables["params"]["row_embed"]["embedding"])
  col = np.asarray(variables["params"]["col_embed"]["embedding"])
  assert row.shape == col.shape == (50, 6)
  assert (row >= 0).all() and (row < 1).all()  # torch nn.init.uniform_: U[0, 1)
  for i in range(4):
    for j in range(5):  # official: cat([x_emb (column j), y_emb (row i)])
      np.testing.assert_array_equal(pos[1, i, j], np.concatenate([col[j], row[i]]))
  with pytest.raises(ValueError, match="learned position embedding"):
    module.apply(variables, jnp.ones((1, 51, 3), bool))


@pytest.mark.parametrize("in_size,out_size", [
    (64, 2), (67, 3), (800, 25), (1333, 42), (1199, 38), (97, 13), (7, 7), (5, 10), (10, 3),
    (100, 4), (96, 3), (1088, 34), (1337, 84)])
def test_nearest_indices_match_torch_interpolate(in_size, out_size):
  rng = np.random.default_rng(in_size * 7 + out_size)
  mask = rng.random((2, in_size, 5)) < 0.5
  ours = position_encoding.downsample_mask(jnp.asarray(mask), (out_size, 5))
  theirs = torch.nn.functional.interpolate(
      torch.from_numpy(mask)[None].float(), size=(out_size, 5)).bool()[0]
  np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())
  # jax.image.resize samples at pixel centres, which is not what DETR does.
  positions = np.arange(in_size, dtype=np.float32)[:, None]
  centres = np.asarray(jax.image.resize(positions, (out_size, 1), "nearest"))[:, 0]
  torch_index = position_encoding.nearest_indices(in_size, out_size)
  if in_size % out_size and out_size < in_size:
    assert not np.array_equal(centres, torch_index)


# --------------------------------------------------------------------------------------------
# Masking, dropout, tracing.
# --------------------------------------------------------------------------------------------


def test_padded_keys_do_not_influence_real_positions():
  d, seq, queries = 32, 12, 4
  rng = np.random.default_rng(3)
  src = jnp.asarray(rng.normal(size=(2, seq, d)), jnp.float32)
  pos = jnp.asarray(rng.normal(size=(2, seq, d)), jnp.float32)
  query_embed = jnp.asarray(rng.normal(size=(queries, d)), jnp.float32)
  mask = np.ones((2, seq), bool)
  mask[1, 7:] = False
  mask[0, 0] = False  # padding need not be a suffix once a 2-D map is flattened
  mask = jnp.asarray(mask)
  perturbed = src + jnp.where(mask[..., None], 0.0, 100.0)
  for pre_norm in (False, True):
    model = transformer_lib.Transformer(num_heads=4, enc_layers=2, dec_layers=2,
                                        dim_feedforward=64, dropout=0.1, pre_norm=pre_norm)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), src, mask, pos, query_embed)
    run = jax.jit(lambda s: model.apply(variables, s, mask, pos, query_embed,
                                        capture_intermediates=True, mutable=["intermediates"]))
    hs, inter = run(src)
    hs_perturbed, inter_perturbed = run(perturbed)
    np.testing.assert_allclose(hs, hs_perturbed, atol=1e-5)
    for name in ("encoder_layer_0", "encoder_layer_1"):
      memory = inter["intermediates"][name]["__call__"][0]
      memory_perturbed = inter_perturbed["intermediates"][name]["__call__"][0]
      np.testing.assert_allclose(np.asarray(memory)[np.asarray(mask)],
                                 np.asarray(memory_perturbed)[np.asarray(mask)], atol=1e-5)
      assert not np.allclose(memory, memory_perturbed)  # the perturbation did reach the padding


def test_dropout_and_fully_padded_image(tiny_variables):
  model = build_model(_tiny_config(dropout=0.1))
  images, pixel_mask = _inputs(batch=2, height=32, width=32)
  pixel_mask = pixel_mask.at[1].set(False)  # an all-padding image must not give NaN
  apply = jax.jit(model.apply, static_argnames="train")
  eval_a = apply(tiny_variables, images, pixel_mask, train=False)
  eval_b = apply(tiny_variables, images, pixel_mask, train=False)
  np.testing.assert_array_equal(eval_a["pred_logits"], eval_b["pred_logits"])
  key = jax.random.PRNGKey(5)
  train_a = apply(tiny_variables, images, pixel_mask, train=True, rngs={"dropout": key})
  train_b = apply(tiny_variables, images, pixel_mask, train=True, rngs={"dropout": key})
  train_c = apply(tiny_variables, images, pixel_mask, train=True,
                  rngs={"dropout": jax.random.PRNGKey(6)})
  for out in (eval_a, train_a, train_c):
    assert np.isfinite(out["pred_logits"]).all() and np.isfinite(out["pred_boxes"]).all()
  np.testing.assert_array_equal(train_a["pred_logits"], train_b["pred_logits"])
  assert not np.allclose(train_a["pred_logits"], eval_a["pred_logits"])
  assert not np.allclose(train_a["pred_logits"], train_c["pred_logits"])


def test_jit_traces_once_per_input_shape(tiny_variables):
  model = build_model(_tiny_config())
  variables = tiny_variables

  @jax.jit
  @chex.assert_max_traces(n=2)
  def forward(variables, images, pixel_mask):
    return model.apply(variables, images, pixel_mask)["pred_boxes"]

  chex.clear_trace_counter()
  for seed in range(3):  # new values, same shape: no retrace
    forward(variables, *_inputs(batch=1, height=32, width=32, seed=seed))
  for seed in range(2):  # one new shape: exactly one more trace
    forward(variables, *_inputs(batch=1, height=64, width=32, seed=seed))
  with pytest.raises(AssertionError):
    forward(variables, *_inputs(batch=1, height=32, width=64))


# --------------------------------------------------------------------------------------------
# Errors, labels, initialisation.
# --------------------------------------------------------------------------------------------


def test_bad_inputs_raise_value_error():
  model = build_model(_tiny_config())
  images, pixel_mask = _inputs(batch=1, height=32, width=32)
  init = lambda x, m: model.init(jax.random.PRNGKey(0), x, m)  # noqa: E731
  with pytest.raises(ValueError, match="images must be"):
    jax.eval_shape(init, images[0], pixel_mask)
  with pytest.raises(ValueError, match="images must be"):
    jax.eval_shape(init, jnp.zeros((1, 32, 32, 4)), pixel_mask)
  with pytest.raises(ValueError, match="images must be"):  # channels first
    jax.eval_shape(init, jnp.zeros((1, 3, 32, 32)), jnp.ones((1, 3, 32), bool))
  with pytest.raises(ValueError, match="pixel_mask must be"):
    jax.eval_shape(init, images, pixel_mask[:, :16])
  with pytest.raises(ValueError, match="pixel_mask must be"):
    jax.eval_shape(init, images, pixel_mask.astype(jnp.float32))
  jax.eval_shape(init, images, pixel_mask.astype(jnp.int32))  # 0/1 integers are fine


@pytest.mark.parametrize("field,value,match", [
    ("backbone", "resnet152", "resnet18"),
    ("train_backbone_from", "layer5", "train_backbone_from"),
    ("position_embedding", "rope", "position_embedding"),
    ("dtype", "float16", "dtype"),
    ("dilation", True, "dilation"),
    ("num_heads", 5, "num_heads"),
])
def test_bad_config_raises_value_error(field, value, match):
  with pytest.raises(ValueError, match=match):
    build_model(_tiny_config(**{field: value}))


@pytest.mark.parametrize("train_from,frozen", [
    ("stem", []), ("layer1", ["stem"]), ("layer2", ["stem", "layer1"]),
    ("layer3", ["stem", "layer1", "layer2"]), ("layer4", ["stem", "layer1", "layer2", "layer3"]),
    ("none", ["stem", "layer1", "layer2", "layer3", "layer4"])])
def test_param_labels(train_from, frozen):
  config = _tiny_config(train_backbone_from=train_from, position_embedding="learned")
  model = build_model(config)
  images, pixel_mask = _inputs(batch=1, height=32, width=32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, pixel_mask)["params"]
  labels = param_labels(params, config)
  assert jax.tree.structure(labels) == jax.tree.structure(params)
  for path, label in flax.traverse_util.flatten_dict(labels, sep="/").items():
    top, *rest = path.split("/")
    if top != "backbone":
      assert label == "transformer", path
      continue
    stage = "stem" if rest[0] == "conv1" else rest[0].split("_")[0]
    assert label == ("frozen" if stage in frozen else "backbone"), path
  with pytest.raises(ValueError, match="train_backbone_from"):
    param_labels(params, _tiny_config(train_backbone_from="layer0"))


def test_initialisation_follows_official_code():
  d, ffn = 256, 2048
  model = transformer_lib.Transformer(num_heads=8, enc_layers=1, dec_layers=1,
                                      dim_feedforward=ffn, dropout=0.0)
  src = jnp.zeros((1, 4, d))
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), src, jnp.ones((1, 4), bool), src,
                                      jnp.zeros((3, d))))()["params"]
  fused_limit = math.sqrt(6 / (d + 3 * d))  # xavier on the fused [3D, D] in_proj
  for layer, attn in (("encoder_layer_0", "self_attn"), ("decoder_layer_0", "self_attn"),
                      ("decoder_layer_0", "cross_attn")):
    for name in ("query", "key", "value"):
      kernel = np.asarray(params[layer][attn][name]["kernel"])
      assert np.abs(kernel).max() <= fused_limit
      assert abs(kernel.std() / (fused_limit / math.sqrt(3)) - 1) < 0.03
      assert not np.any(params[layer][attn][name]["bias"])
    out_kernel = np.asarray(params[layer][attn]["out"]["kernel"])
    assert np.abs(out_kernel).max() <= math.sqrt(6 / (2 * d))
    assert out_kernel.std() > 1.3 * fused_limit / math.sqrt(3)  # its own [D, D] fan, not fused
    assert not np.any(params[layer][attn]["out"]["bias"])
  linear1 = params["encoder_layer_0"]["linear1"]
  assert np.abs(linear1["kernel"]).max() <= math.sqrt(6 / (d + ffn))
  assert abs(np.asarray(linear1["kernel"]).std() / math.sqrt(2 / (d + ffn)) - 1) < 0.03
  bias = np.asarray(linear1["bias"])  # PyTorch default bias: U(+-1/sqrt(fan_in))
  assert np.abs(bias).max() <= 1 / math.sqrt(d) and bias.std() > 0.5 / math.sqrt(3 * d)
  norm = params["decoder_norm"]
  assert np.all(np.asarray(norm["scale"]) == 1) and not np.any(norm["bias"])


def test_heads_and_backbone_initialisation(tiny_variables):
  params = tiny_variables["params"]
  query = np.asarray(params["query_embed"]["embedding"])  # [10, 32]
  assert abs(query.std() - 1) < 0.15  # N(0, 1)
  for name, fan_in in (("class_embed", 32), ("input_proj", 512)):
    kernel, bias = np.asarray(params[name]["kernel"]), np.asarray(params[name]["bias"])
    assert np.abs(kernel).max() <= 1 / math.sqrt(fan_in)
    assert kernel.std() > 0.8 / math.sqrt(3 * fan_in)
    assert np.abs(bias).max() <= 1 / math.sqrt(fan_in) and np.any(bias)
  conv = np.asarray(params["backbone"]["layer3_0"]["conv2"]["kernel"])  # [3, 3, 256, 256]
  assert abs(conv.std() / math.sqrt(2 / (9 * 256)) - 1) < 0.05  # kaiming normal, fan_out
  for leaf_path, value in flax.traverse_util.flatten_dict(tiny_variables["batch_stats"]).items():
    expected = 1.0 if leaf_path[-1] in ("scale", "var") else 0.0
    assert np.all(np.asarray(value) == expected), leaf_path


def test_class_prior_prob_starts_every_sigmoid_score_there(tiny_variables):
  config = _tiny_config(class_prior_prob=0.01, aux_loss=True)
  model = build_model(config)
  images, pixel_mask = _inputs(batch=2, height=32, width=32)
  variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), images, pixel_mask))()
  bias = np.asarray(variables["params"]["class_embed"]["bias"])
  np.testing.assert_allclose(bias, -math.log(99), rtol=1e-6)  # sigmoid(bias) = 0.01
  # The same tree and the same kernels: only the class bias differs from the default init.
  default = flax.traverse_util.flatten_dict(tiny_variables["params"], sep="/")
  prior = flax.traverse_util.flatten_dict(variables["params"], sep="/")
  assert default.keys() == prior.keys()
  for path in default:
    if path != "class_embed/bias":
      np.testing.assert_array_equal(default[path], prior[path], err_msg=path)
  # The scores at init: sigmoid(hidden @ W - log 99), close to 0.01 when the kernel term is small.
  out = model.apply(variables, images, pixel_mask)
  scores = jax.nn.sigmoid(out["pred_logits"])
  assert abs(float(jnp.median(scores)) - 0.01) < 0.01
  for bad in (-0.1, 1.0):
    with pytest.raises(ValueError, match="class_prior_prob"):
      build_model(_tiny_config(class_prior_prob=bad))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_backbone_width_scales_every_conv(arch):
  """`backbone_width` w: every conv of the standard (w = 64) ResNet with its channels times w/64
  (the image's 3 input channels aside), same layout and output grid."""
  images = jnp.zeros((1, 64, 64, 3))
  shapes = {}
  for width in (64, 32):
    module = resnet.ResNet(arch, width=width)
    variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), images)
    shapes[width] = {k: v.shape for k, v in
                     flax.traverse_util.flatten_dict(variables["params"], sep="/").items()}
    features = jax.eval_shape(module.apply, variables, images)
    assert features.shape == (1, 2, 2, resnet.backbone_channels(arch, width))
  assert shapes[64].keys() == shapes[32].keys()
  for name, shape in shapes[64].items():
    if name.endswith("kernel"):
      in_channels = 3 if name == "conv1/kernel" else shape[2] // 2
      assert shapes[32][name] == shape[:2] + (in_channels, shape[3] // 2), name
    else:
      assert shapes[32][name] == (shape[0] // 2,), name


def test_backbone_width_is_checked_and_not_exported(tmp_path):
  from detr_jax import export  # pylint: disable=g-import-not-at-top
  config = tiny_test.get_config()
  for bad, norm in ((12, "frozen_bn"), (48, "group_norm")):
    config.model.backbone_width, config.model.backbone_norm = bad, norm
    with pytest.raises(ValueError, match=f"backbone_width={bad}"):
      build_model(config.model)
  config.model.backbone_width, config.model.backbone_norm = 32, "frozen_bn"
  model = build_model(config.model)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)),
                         jnp.ones((1, 64, 64), bool))
  assert variables["params"]["backbone"]["conv1"]["kernel"].shape == (7, 7, 3, 32)
  with pytest.raises(ValueError, match="backbone_width=32"):
    export.export(variables, config.model, "official", str(tmp_path / "out.pth"), {})
