"""Torchvision-layout ResNet backbone with frozen BatchNorm, as used by DETR.

The layout (module names, strides on the 3x3 conv of Bottleneck v1.5, explicit PyTorch padding) and
the initialisation follow torchvision's `resnet.py`, so a torchvision or DETR state_dict maps 1:1 on
this module tree (see `detr_jax.convert`). BatchNorm is torchvision's `FrozenBatchNorm2d` as in
DETR: its four tensors live in the "batch_stats" collection and are constants.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax.models import conv as conv_lib

# name -> (block type, blocks per stage)
RESNET_ARCHS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}
_EXPANSION = {"basic": 1, "bottleneck": 4}
_STAGE_WIDTHS = (64, 128, 256, 512)
FROZEN_BN_EPS = 1e-5

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"), i.e. std sqrt(2 / fan_out).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def check_backbone_name(name: str) -> None:
  """Raises ValueError if `name` is not a supported ResNet."""
  if name not in RESNET_ARCHS:
    raise ValueError(
        f"Unknown backbone {name!r}; config.model.backbone must be one of {sorted(RESNET_ARCHS)}.")


def backbone_channels(name: str, width: int = 64, stages: int = 4) -> int:
  """Number of channels of the last stage of ResNet `name` (512 or 2048 at the standard width
  with its 4 stages; half that with 3)."""
  check_backbone_name(name)
  check_stages(stages)
  block, _ = RESNET_ARCHS[name]
  return _STAGE_WIDTHS[stages - 1] * width // 64 * _EXPANSION[block]


def check_stages(stages: int, dilation: bool = False) -> None:
  """Raises ValueError unless `stages` (config.model.backbone_stages) is 3 or 4, and 4 with DC5
  (`dilation`, which dilates layer4)."""
  if stages not in (3, 4):
    raise ValueError(f"config.model.backbone_stages={stages}: use 4 (torchvision's ResNet, "
                     "stride 32) or 3 (up to layer3, stride 16).")
  if dilation and stages != 4:
    raise ValueError("config.model.dilation (DC5) dilates layer4, which "
                     f"config.model.backbone_stages={stages} does not build: use one.")


class FrozenBatchNorm(nn.Module):
  """BatchNorm with fixed statistics and affine (torchvision `FrozenBatchNorm2d`).

  y = x * scale' + bias' with scale' = scale * rsqrt(var + eps), bias' = bias - mean * scale',
  computed in float32 in the same order as torchvision so converted weights match to round-off.
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.variable("batch_stats", "scale", jnp.ones, (features,), jnp.float32).value
    bias = self.variable("batch_stats", "bias", jnp.zeros, (features,), jnp.float32).value
    mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32).value
    var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32).value
    # Constants by design: no gradient may reach them even if a caller differentiates them.
    scale, bias, mean, var = (jax.lax.stop_gradient(v) for v in (scale, bias, mean, var))
    folded_scale = scale * jax.lax.rsqrt(var + FROZEN_BN_EPS)
    folded_bias = bias - mean * folded_scale
    return x * folded_scale.astype(self.dtype) + folded_bias.astype(self.dtype)


BACKBONE_NORMS = ("frozen_bn", "group_norm")
GROUP_NORM_GROUPS = 32


def norm_layer(kind: str, dtype: Any, name: str, groups: int = GROUP_NORM_GROUPS) -> nn.Module:
  """The backbone's normalisation: "frozen_bn" (torchvision `FrozenBatchNorm2d`, the official
  DETR's and the only one published weights load into) or "group_norm" (GroupNorm with `groups`
  groups, 32 by default as in Wu & He, trained, for a backbone trained from scratch: frozen
  BatchNorm at its identity init is no normalisation at all)."""
  if kind == "frozen_bn":
    return FrozenBatchNorm(dtype, name=name)
  if kind == "group_norm":
    return nn.GroupNorm(num_groups=groups, epsilon=FROZEN_BN_EPS, dtype=dtype,
                        param_dtype=jnp.float32, name=name)
  raise ValueError(f"Unknown config.model.backbone_norm {kind!r}; use one of {BACKBONE_NORMS}.")


def _conv(features: int, kernel: int, stride: int = 1, dilation: int = 1, name: str = "",
          dtype: Any = jnp.float32, implementation: str = "auto") -> nn.Conv:
  # PyTorch padding (dilation * (k - 1) // 2 on each side), never "SAME": odd input sizes must give
  # torchvision's output shapes (SAME pads asymmetrically when the stride is 2).
  pad = dilation * (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad),) * 2,
                 kernel_dilation=(dilation, dilation), use_bias=False, kernel_init=_conv_init,
                 dtype=dtype, param_dtype=jnp.float32, name=name,
                 conv_general_dilated=conv_lib.conv_general_dilated(implementation))


class BasicBlock(nn.Module):
  """ResNet-18/34 block: two 3x3 convs."""
  width: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32
  conv_implementation: str = "auto"  # see detr_jax.models.conv
  norm: str = "frozen_bn"  # see norm_layer
  norm_groups: int = GROUP_NORM_GROUPS  # group_norm only

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    identity = x
    conv = functools.partial(_conv, dtype=self.dtype, implementation=self.conv_implementation)
    norm = functools.partial(norm_layer, self.norm, self.dtype, groups=self.norm_groups)
    y = conv(self.width, 3, self.stride, self.dilation, "conv1")(x)
    y = nn.relu(norm("bn1")(y))
    y = conv(self.width, 3, 1, self.dilation, "conv2")(y)
    y = norm("bn2")(y)
    if self.downsample:
      identity = conv(self.width, 1, self.stride, 1, "downsample_conv")(x)
      identity = norm("downsample_bn")(identity)
    return nn.relu(y + identity)


class Bottleneck(nn.Module):
  """ResNet-50/101 block, v1.5: the stride sits on the 3x3 conv (torchvision)."""
  width: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32
  conv_implementation: str = "auto"  # see detr_jax.models.conv
  norm: str = "frozen_bn"  # see norm_layer
  norm_groups: int = GROUP_NORM_GROUPS  # group_norm only

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    identity = x
    conv = functools.partial(_conv, dtype=self.dtype, implementation=self.conv_implementation)
    norm = functools.partial(norm_layer, self.norm, self.dtype, groups=self.norm_groups)
    y = conv(self.width, 1, name="conv1")(x)
    y = nn.relu(norm("bn1")(y))
    y = conv(self.width, 3, self.stride, self.dilation, "conv2")(y)
    y = nn.relu(norm("bn2")(y))
    y = conv(self.width * 4, 1, name="conv3")(y)
    y = norm("bn3")(y)
    if self.downsample:
      identity = conv(self.width * 4, 1, self.stride, 1, "downsample_conv")(x)
      identity = norm("downsample_bn")(identity)
    return nn.relu(y + identity)


class ResNet(nn.Module):
  """ResNet body up to layer4 (no pooling/fc), returning the stride-32 (DC5: 16) feature map.

  Attributes:
    arch: one of RESNET_ARCHS.
    dilation: DC5; layer4 uses dilation 2 instead of stride 2, as torchvision's
      `replace_stride_with_dilation=[False, False, True]`.
    stages: 4 (torchvision's ResNet) or 3: the body ends after layer3 and returns its
      stride-16 map (layer4 is not built). A finer grid at less compute than DC5, for small
      images and backbones trained from scratch; no published DETR has it.
    dtype: compute dtype.
    conv_implementation: "auto" | "xla" | "dot", see `detr_jax.models.conv`.
    norm: "frozen_bn" | "group_norm", see `norm_layer`.
    norm_groups: GroupNorm's group count (group_norm only); must divide `width`.
    width: channels of the stem and layer1 (torchvision: 64); the stages double it. Other
      widths have no published weights: a smaller backbone trained from scratch.
  """
  arch: str = "resnet50"
  dilation: bool = False
  dtype: Any = jnp.float32
  conv_implementation: str = "auto"
  norm: str = "frozen_bn"
  width: int = 64
  norm_groups: int = GROUP_NORM_GROUPS
  stages: int = 4

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """Args: images [B, H, W, 3]. Returns: features [B, h, w, backbone_channels(...)]."""
    check_backbone_name(self.arch)
    check_stages(self.stages, self.dilation)
    block_type, stage_sizes = RESNET_ARCHS[self.arch]
    if block_type == "basic" and self.dilation:
      raise ValueError(f"config.model.dilation (DC5) needs a Bottleneck ResNet (resnet50/101); "
                       f"torchvision's BasicBlock ({self.arch}) does not support dilation.")
    block_cls = BasicBlock if block_type == "basic" else Bottleneck
    expansion = _EXPANSION[block_type]

    x = images.astype(self.dtype)
    x = nn.Conv(self.width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False,
                kernel_init=_conv_init, dtype=self.dtype, param_dtype=jnp.float32,
                conv_general_dilated=conv_lib.conv_general_dilated(self.conv_implementation),
                name="conv1")(x)
    x = nn.relu(norm_layer(self.norm, self.dtype, "bn1", self.norm_groups)(x))
    x = conv_lib.max_pool(self.conv_implementation)(x)  # 3x3/2, pads with -inf

    in_channels = self.width
    current_dilation = 1
    widths = [w * self.width // 64 for w in _STAGE_WIDTHS]
    for stage, (width, num_blocks) in enumerate(zip(widths[:self.stages],
                                                    stage_sizes[:self.stages])):
      stride = 1 if stage == 0 else 2
      previous_dilation = current_dilation
      if self.dilation and stage == 3:
        # torchvision `_make_layer(dilate=True)`: the first block keeps the previous dilation.
        current_dilation *= stride
        stride = 1
      for j in range(num_blocks):
        first = j == 0
        x = block_cls(
            width=width,
            stride=stride if first else 1,
            dilation=previous_dilation if first else current_dilation,
            downsample=first and (stride != 1 or in_channels != width * expansion),
            dtype=self.dtype,
            conv_implementation=self.conv_implementation,
            norm=self.norm,
            norm_groups=self.norm_groups,
            name=f"layer{stage + 1}_{j}")(x)
        in_channels = width * expansion
    return x


def feature_stride(dilation: bool, stages: int = 4) -> int:
  """Total stride of the backbone output (32, or 16 for DC5 or 3 stages)."""
  return 16 if dilation or stages == 3 else 32


def stage_of(module_name: str) -> str:
  """Maps a top-level backbone submodule name to its stage ("stem", "layer1".."layer4")."""
  if module_name in ("conv1", "bn1"):
    return "stem"
  stage = module_name.split("_")[0]
  if stage not in ("layer1", "layer2", "layer3", "layer4"):
    raise ValueError(f"Not a ResNet backbone module: {module_name!r}.")
  return stage


def stage_names() -> Sequence[str]:
  """Backbone stages in forward order."""
  return ("stem", "layer1", "layer2", "layer3", "layer4")
