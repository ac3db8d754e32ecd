"""PyTorch references for the converter tests: random HF DETR models, the official key layout and a
torchvision-style ResNet.

The name mappings here are written out independently of `detr_jax.convert` (string rules from the
official `models/detr.py` / transformers' `modeling_detr.py` names), so the tests compare two
separate derivations of the same layout.
"""

import numpy as np
import torch
from torch import nn
from transformers import DetrConfig
from transformers import DetrForObjectDetection

_BN_BUFFERS = ("weight", "bias", "running_mean", "running_var")

# configs/tiny_test.py's architecture: ResNet-18, width 32, 2 + 2 layers, 10 queries.
TINY_HF_KWARGS = dict(
    d_model=32, encoder_attention_heads=4, decoder_attention_heads=4, encoder_layers=2,
    decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10, num_labels=5,
    backbone_config=dict(model_type="resnet", layer_type="basic", depths=[2, 2, 2, 2],
                         hidden_sizes=[64, 128, 256, 512], out_features=["stage4"]))


def randomize_frozen_batchnorm(module: nn.Module, generator: torch.Generator) -> None:
  """Gives every frozen BatchNorm buffer non-trivial values, so the BN conversion matters."""
  with torch.no_grad():
    for name, buffer in module.named_buffers():
      field = name.rsplit(".", 1)[-1]
      if field not in _BN_BUFFERS or not buffer.is_floating_point():
        continue
      noise = torch.rand(buffer.shape, generator=generator)
      if field in ("weight", "running_var"):
        buffer.copy_(0.5 + noise)  # positive
      else:
        buffer.copy_(0.2 * (noise - 0.5))


def random_hf_detr(seed: int = 0, **config_kwargs) -> DetrForObjectDetection:
  """A randomly initialised transformers DETR (own ResNet backbone, no timm) in eval mode."""
  torch.manual_seed(seed)
  config = DetrConfig(use_timm_backbone=False, auxiliary_loss=False, **config_kwargs)
  model = DetrForObjectDetection(config).eval()
  randomize_frozen_batchnorm(model, torch.Generator().manual_seed(seed + 1))
  return model


def numpy_state_dict(model: nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _hf_backbone_to_torchvision(name: str) -> str:
  """transformers ResNet name (after `...model.`) -> torchvision name."""
  parts = name.split(".")
  if parts[:2] == ["embedder", "embedder"]:
    module = {"convolution": "conv1", "normalization": "bn1"}[parts[2]]
    return f"{module}.{parts[3]}"
  # encoder.stages.S.layers.J.(layer.K.|shortcut.)(convolution|normalization).FIELD
  stage, block = int(parts[2]) + 1, parts[4]
  if parts[5] == "shortcut":
    module = {"convolution": "downsample.0", "normalization": "downsample.1"}[parts[6]]
  else:
    index = int(parts[6]) + 1
    module = {"convolution": f"conv{index}", "normalization": f"bn{index}"}[parts[7]]
  return f"layer{stage}.{block}.{module}.{parts[-1]}"


_HF_TO_OFFICIAL = (  # applied in order to the transformer / head names
    ("model.encoder.layers.", "transformer.encoder.layers."),
    ("model.decoder.layers.", "transformer.decoder.layers."),
    ("model.decoder.layernorm.", "transformer.decoder.norm."),
    (".o_proj.", ".out_proj."),
    (".encoder_attn.", ".multihead_attn."),
    (".mlp.fc1.", ".linear1."),
    (".mlp.fc2.", ".linear2."),
    ("model.input_projection.", "input_proj."),
    ("model.query_position_embeddings.", "query_embed."),
    ("class_labels_classifier.", "class_embed."),
    ("bbox_predictor.", "bbox_embed."),
)


def hf_to_official(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """transformers 5.x DetrForObjectDetection names -> official facebookresearch/detr names."""
  official = {}
  qkv = {}
  for key, value in state_dict.items():
    if key.startswith("model.backbone.model."):
      official["backbone.0.body." + _hf_backbone_to_torchvision(key[21:])] = value
      continue
    name = key
    for old, new in _HF_TO_OFFICIAL:
      name = name.replace(old, new)
    if ".decoder.layers." in name:
      name = (name.replace(".self_attn_layer_norm.", ".norm1.")
              .replace(".encoder_attn_layer_norm.", ".norm2.")
              .replace(".final_layer_norm.", ".norm3."))
    else:
      name = (name.replace(".self_attn_layer_norm.", ".norm1.")
              .replace(".final_layer_norm.", ".norm2."))
    for proj in ("q_proj", "k_proj", "v_proj"):
      if f".{proj}." in name:
        attention, field = name.split(f".{proj}.")
        qkv.setdefault((attention, field), {})[proj] = value
        break
    else:
      official[name] = value
  for (attention, field), parts in qkv.items():
    official[f"{attention}.in_proj_{field}"] = np.concatenate(
        [parts["q_proj"], parts["k_proj"], parts["v_proj"]], axis=0)
  return official


def hf_to_published_names(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """transformers 5.x names -> names as stored in the published facebook/detr-resnet-* files.

  Those files use a timm (torchvision-named) backbone under `model.backbone.conv_encoder.model.`
  and the transformers 4.x names `out_proj`, `fc1`, `fc2`.
  """
  published = {}
  for key, value in state_dict.items():
    if key.startswith("model.backbone.model."):
      key = "model.backbone.conv_encoder.model." + _hf_backbone_to_torchvision(key[21:])
    else:
      key = key.replace(".o_proj.", ".out_proj.").replace(".mlp.fc", ".fc")
    published[key] = value
  return published


def official_shapes(blocks=(3, 4, 6, 3), num_classes=91, num_queries=100, hidden_dim=256,
                    dim_feedforward=2048, enc_layers=6, dec_layers=6) -> dict[str, tuple]:
  """Names and shapes of an official DETR (Bottleneck ResNet) checkpoint.

  Derived from the module names of the official `models/backbone.py`, `models/transformer.py` and
  `models/detr.py`.
  """
  shapes = {"backbone.0.body.conv1.weight": (64, 3, 7, 7)}
  bn = lambda prefix, c: {f"{prefix}.{f}": (c,) for f in _BN_BUFFERS}  # noqa: E731
  shapes.update(bn("backbone.0.body.bn1", 64))
  in_channels = 64
  for stage, (width, num_blocks) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
    for j in range(num_blocks):
      prefix = f"backbone.0.body.layer{stage}.{j}"
      convs = ((width, in_channels, 1), (width, width, 3), (4 * width, width, 1))
      for k, (out_c, in_c, size) in enumerate(convs, start=1):
        shapes[f"{prefix}.conv{k}.weight"] = (out_c, in_c, size, size)
        shapes.update(bn(f"{prefix}.bn{k}", out_c))
      if j == 0:
        shapes[f"{prefix}.downsample.0.weight"] = (4 * width, in_channels, 1, 1)
        shapes.update(bn(f"{prefix}.downsample.1", 4 * width))
      in_channels = 4 * width
  d, f = hidden_dim, dim_feedforward
  attention = {"in_proj_weight": (3 * d, d), "in_proj_bias": (3 * d,),
               "out_proj.weight": (d, d), "out_proj.bias": (d,)}
  ffn = {"linear1.weight": (f, d), "linear1.bias": (f,), "linear2.weight": (d, f),
         "linear2.bias": (d,)}
  for i in range(enc_layers):
    prefix = f"transformer.encoder.layers.{i}"
    shapes.update({f"{prefix}.self_attn.{k}": s for k, s in attention.items()})
    shapes.update({f"{prefix}.{k}": s for k, s in ffn.items()})
    shapes.update({f"{prefix}.norm{n}.{w}": (d,) for n in (1, 2) for w in ("weight", "bias")})
  for i in range(dec_layers):
    prefix = f"transformer.decoder.layers.{i}"
    for module in ("self_attn", "multihead_attn"):
      shapes.update({f"{prefix}.{module}.{k}": s for k, s in attention.items()})
    shapes.update({f"{prefix}.{k}": s for k, s in ffn.items()})
    shapes.update({f"{prefix}.norm{n}.{w}": (d,) for n in (1, 2, 3) for w in ("weight", "bias")})
  shapes.update({"transformer.decoder.norm.weight": (d,), "transformer.decoder.norm.bias": (d,),
                 "class_embed.weight": (num_classes + 1, d), "class_embed.bias": (num_classes + 1,),
                 "query_embed.weight": (num_queries, d),
                 "input_proj.weight": (d, in_channels, 1, 1), "input_proj.bias": (d,)})
  for layer, (out_f, in_f) in enumerate(((d, d), (d, d), (4, d))):
    shapes[f"bbox_embed.layers.{layer}.weight"] = (out_f, in_f)
    shapes[f"bbox_embed.layers.{layer}.bias"] = (out_f,)
  return shapes


class FrozenBatchNorm2d(nn.Module):
  """torchvision.ops.FrozenBatchNorm2d (eps 1e-5)."""

  def __init__(self, channels: int):
    super().__init__()
    for field in _BN_BUFFERS:
      init = torch.ones if field in ("weight", "running_var") else torch.zeros
      self.register_buffer(field, init(channels))

  def forward(self, x):
    scale = self.weight * (self.running_var + 1e-5).rsqrt()
    bias = self.bias - self.running_mean * scale
    return x * scale[None, :, None, None] + bias[None, :, None, None]


def _conv(in_c, out_c, size, stride=1, dilation=1):
  return nn.Conv2d(in_c, out_c, size, stride, padding=dilation * (size // 2), dilation=dilation,
                   bias=False)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, in_c, width, stride, downsample, dilation=1):
    super().__init__()
    del dilation  # torchvision's BasicBlock does not support dilation
    self.conv1, self.bn1 = _conv(in_c, width, 3, stride), FrozenBatchNorm2d(width)
    self.conv2, self.bn2 = _conv(width, width, 3), FrozenBatchNorm2d(width)
    self.downsample = downsample

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return torch.relu(y + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, in_c, width, stride, downsample, dilation=1):
    super().__init__()
    self.conv1, self.bn1 = _conv(in_c, width, 1), FrozenBatchNorm2d(width)
    self.conv2, self.bn2 = _conv(width, width, 3, stride, dilation), FrozenBatchNorm2d(width)
    self.conv3, self.bn3 = _conv(width, 4 * width, 1), FrozenBatchNorm2d(4 * width)
    self.downsample = downsample

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = torch.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return torch.relu(y + (self.downsample(x) if self.downsample is not None else x))


class TorchvisionResNet(nn.Module):
  """torchvision.models.resnet.ResNet (names and forward), with frozen BN, up to layer4.

  `dilate_last` is torchvision's replace_stride_with_dilation=[False, False, True] (DETR DC5).
  """

  def __init__(self, block, blocks, dilate_last=False, num_classes=1000):
    super().__init__()
    self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False), FrozenBatchNorm2d(64)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    self.in_c, self.dilation = 64, 1
    for stage, (width, num_blocks) in enumerate(zip((64, 128, 256, 512), blocks)):
      stride = 1 if stage == 0 else 2
      dilate = dilate_last and stage == 3
      setattr(self, f"layer{stage + 1}", self._make_layer(block, width, num_blocks, stride, dilate))
    self.fc = nn.Linear(512 * block.expansion, num_classes)  # unused by DETR, present in files

  def _make_layer(self, block, width, num_blocks, stride, dilate):
    previous_dilation = self.dilation
    if dilate:
      self.dilation *= stride
      stride = 1
    downsample = None
    if stride != 1 or self.in_c != width * block.expansion:
      downsample = nn.Sequential(_conv(self.in_c, width * block.expansion, 1, stride),
                                 FrozenBatchNorm2d(width * block.expansion))
    layers = [block(self.in_c, width, stride, downsample, previous_dilation)]
    self.in_c = width * block.expansion
    layers += [block(self.in_c, width, 1, None, self.dilation) for _ in range(1, num_blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    return self.layer4(self.layer3(self.layer2(self.layer1(x))))


# ------------------------------------------------------------------ shared test inputs
def padded_batch():
  """Two images, 96x128 and 80x112, padded bottom/right to 96x128: (images, pixel_mask)."""
  rng = np.random.default_rng(0)
  images = np.zeros((2, 96, 128, 3), np.float32)
  pixel_mask = np.zeros((2, 96, 128), bool)
  for i, (h, w) in enumerate(((96, 128), (80, 112))):
    images[i, :h, :w] = rng.normal(size=(h, w, 3))
    pixel_mask[i, :h, :w] = True
  return images, pixel_mask


def flat_tree(tree, prefix=""):
  """A nested dict of arrays -> {"a/b/c": numpy array}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flat_tree(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = np.asarray(value)
  return out
