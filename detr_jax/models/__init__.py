"""DETR model: `build_model(config.model)` and `param_labels(params, config.model)`.

Variables (flax names; Dense kernels [in, out], Conv kernels HWIO):

  params/backbone/conv1/kernel                          [7, 7, 3, 64]
  params/backbone/layer{1..4}_{j}/conv{1,2,3}/kernel    (conv1, conv2 only for resnet18/34)
  params/backbone/layer{1..4}_0/downsample_conv/kernel  where the block downsamples
  params/input_proj/{kernel [1, 1, C, D], bias}
  params/transformer/encoder_layer_{i}/self_attn/{query,key,value,out}/{kernel [D, D], bias}
  params/transformer/encoder_layer_{i}/{linear1,linear2,norm1,norm2}
  params/transformer/encoder_norm                       (pre_norm only)
  params/transformer/decoder_layer_{i}/{self_attn,cross_attn}/{query,key,value,out}
  params/transformer/decoder_layer_{i}/{linear1,linear2,norm1,norm2,norm3}
  params/transformer/decoder_norm
  params/query_embed/embedding [Q, D]; params/class_embed; params/bbox_embed/layers_{0,1,2}
  params/group_query_embed/embedding [(K - 1) * Q, D]   (Group DETR, num_query_groups K > 1)
  params/one_to_many_query_embed/embedding [Q2, D]      (H-DETR, one_to_many_queries Q2 > 0)
  (these two are training only: `TRAINING_ONLY_PARAMS`)
  with model.query_anchors (Anchor DETR), instead of each `*query_embed/embedding`:
    params/query_embed_anchors [Q, 2] (and group_/one_to_many_ likewise), with
    params/query_pos_mlp/layers_{0,1} shared
  params/denoising_label_embed [C + 1, D]   (DN-DETR, denoising_groups > 0; training only)
  params/position_embedding/{row_embed,col_embed}/embedding [50, D/2]   (learned only)
  batch_stats/backbone/.../{bn1,bn2,bn3,downsample_bn}/{scale,bias,mean,var}  (frozen BatchNorm)
  params/backbone/.../{bn1,bn2,bn3,downsample_bn}/{scale,bias}  instead, trained, with
    model.backbone_norm="group_norm" (GroupNorm, model.group_norm_groups groups, 32 by default)

`detr_jax.convert` maps the official and Hugging Face state_dicts onto this tree.
"""

import math
from typing import Any

import jax
import ml_collections

from detr_jax.models import conv as conv_lib
from detr_jax.models import resnet
from detr_jax.models.detr import BOX_REFINEMENT_NEEDS_ANCHORS
from detr_jax.models.detr import DETR
from detr_jax.models.detr import DTYPES
from detr_jax.models.detr import POSITION_EMBEDDINGS

# Parameters used in training only; inference, export and published weights do without them.
TRAINING_ONLY_PARAMS = ("group_query_embed", "one_to_many_query_embed",
                        "group_query_embed_anchors", "one_to_many_query_embed_anchors",
                        "denoising_label_embed")
# Parameter groups of `param_labels`, the optimizer's keys.
FROZEN, BACKBONE, TRANSFORMER = "frozen", "backbone", "transformer"
TRAIN_BACKBONE_FROM = ("stem", "layer1", "layer2", "layer3", "layer4", "none")
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")

__all__ = ["DETR", "build_model", "param_labels"]


def build_model(model_config: ml_collections.ConfigDict) -> DETR:
  """Builds the DETR module described by `config.model`.

  Args:
    model_config: config.model (fields as in configs/detr_r50_coco.py).

  Returns:
    An unbound flax.linen DETR module.
  """
  cfg = model_config
  resnet.check_backbone_name(cfg.backbone)
  if cfg.get("dilation", False) and cfg.backbone not in ("resnet50", "resnet101"):
    raise ValueError(f"config.model.dilation (DC5) needs resnet50 or resnet101, got "
                     f"{cfg.backbone!r}.")
  position_embedding = cfg.get("position_embedding", "sine")
  if position_embedding not in POSITION_EMBEDDINGS:
    raise ValueError(f"Unknown config.model.position_embedding {position_embedding!r}; "
                     f"use one of {POSITION_EMBEDDINGS}.")
  dtype_name = cfg.get("dtype", "float32")
  if dtype_name not in DTYPES:
    raise ValueError(f"Unknown config.model.dtype {dtype_name!r}; use one of {sorted(DTYPES)}.")
  if cfg.hidden_dim % cfg.num_heads or cfg.hidden_dim % 2:
    raise ValueError(f"config.model.hidden_dim ({cfg.hidden_dim}) must be even and divisible by "
                     f"num_heads ({cfg.num_heads}).")
  implementation = cfg.get("attention_implementation", None)
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"Unknown config.model.attention_implementation {implementation!r}; use one "
                     f"of {ATTENTION_IMPLEMENTATIONS}.")
  conv_implementation = cfg.get("conv_implementation", "auto")
  conv_lib.resolve_implementation(conv_implementation)  # ValueError naming the field
  conv_library = cfg.get("conv_library", "auto")
  conv_lib.resolve_library(conv_library, "cpu")  # ValueError naming the field
  train_from = _train_backbone_index(cfg)  # fail at build time, not when the optimizer is made
  num_query_groups = int(cfg.get("num_query_groups", 1))
  if num_query_groups < 1:
    raise ValueError(f"config.model.num_query_groups={num_query_groups}: use 1 (plain DETR) or "
                     "more (Group DETR).")
  backbone_norm = cfg.get("backbone_norm", "frozen_bn")
  if backbone_norm not in resnet.BACKBONE_NORMS:
    raise ValueError(f"Unknown config.model.backbone_norm {backbone_norm!r}; use one of "
                     f"{resnet.BACKBONE_NORMS}.")
  one_to_many_queries = int(cfg.get("one_to_many_queries", 0))
  if one_to_many_queries < 0:
    raise ValueError(f"config.model.one_to_many_queries={one_to_many_queries}: use 0 (off) or "
                     "more (H-DETR's one-to-many branch).")
  backbone_width = int(cfg.get("backbone_width", 64))
  if backbone_width < 8 or backbone_width % 8:
    raise ValueError(f"config.model.backbone_width={backbone_width}: use a multiple of 8; 64 is "
                     "torchvision's ResNet.")
  backbone_stages = int(cfg.get("backbone_stages", 4))
  resnet.check_stages(backbone_stages, bool(cfg.get("dilation", False)))
  if train_from == TRAIN_BACKBONE_FROM.index("layer4") and backbone_stages != 4:
    raise ValueError("config.model.train_backbone_from='layer4' names a stage that "
                     f"config.model.backbone_stages={backbone_stages} does not build: use 'none' "
                     "to freeze the whole backbone.")
  group_norm_groups = int(cfg.get("group_norm_groups", resnet.GROUP_NORM_GROUPS))
  if backbone_norm == "group_norm" and (group_norm_groups < 1 or
                                        backbone_width % group_norm_groups):
    raise ValueError(f"config.model.backbone_width={backbone_width} with group_norm needs "
                     f"config.model.group_norm_groups={group_norm_groups} to divide it "
                     f"(try {math.gcd(backbone_width, resnet.GROUP_NORM_GROUPS)}).")
  denoising_groups = int(cfg.get("denoising_groups", 0))
  if denoising_groups < 0:
    raise ValueError(f"config.model.denoising_groups={denoising_groups}: use 0 (off) or more "
                     "(DN-DETR's denoising groups).")
  if denoising_groups and not cfg.get("query_anchors", False):
    raise ValueError("config.model.denoising_groups > 0 needs config.model.query_anchors=True "
                     "(denoising queries are anchor points near the targets).")
  if cfg.get("box_refinement", False) and not cfg.get("query_anchors", False):
    raise ValueError(BOX_REFINEMENT_NEEDS_ANCHORS)
  box_noise = float(cfg.get("denoising_box_noise", 0.4))
  label_noise = float(cfg.get("denoising_label_noise", 0.2))
  if box_noise < 0 or not 0 <= label_noise <= 1:
    raise ValueError(f"config.model.denoising_box_noise={box_noise} must be >= 0 and "
                     f"denoising_label_noise={label_noise} in [0, 1].")
  class_prior_prob = float(cfg.get("class_prior_prob", 0.0))
  if not 0 <= class_prior_prob < 1:
    raise ValueError(f"config.model.class_prior_prob={class_prior_prob}: use 0 (PyTorch's "
                     "default init, official) or a probability in (0, 1), e.g. 0.01 with a "
                     "sigmoid label loss.")
  return DETR(
      backbone=cfg.backbone,
      dilation=bool(cfg.get("dilation", False)),
      position_embedding=position_embedding,
      hidden_dim=cfg.hidden_dim,
      num_heads=cfg.num_heads,
      enc_layers=cfg.enc_layers,
      dec_layers=cfg.dec_layers,
      dim_feedforward=cfg.dim_feedforward,
      dropout=float(cfg.dropout),
      pre_norm=bool(cfg.get("pre_norm", False)),
      num_queries=cfg.num_queries,
      num_classes=cfg.num_classes,
      aux_loss=bool(cfg.get("aux_loss", True)),
      attention_implementation=implementation,
      conv_implementation=conv_implementation,
      conv_library=conv_library,
      num_query_groups=num_query_groups,
      one_to_many_queries=one_to_many_queries,
      backbone_norm=backbone_norm,
      query_anchors=bool(cfg.get("query_anchors", False)),
      box_refinement=bool(cfg.get("box_refinement", False)),
      backbone_width=backbone_width,
      backbone_stages=backbone_stages,
      group_norm_groups=group_norm_groups,
      denoising_groups=denoising_groups,
      denoising_box_noise=box_noise,
      denoising_label_noise=label_noise,
      class_prior_prob=class_prior_prob,
      dtype=DTYPES[dtype_name])


def _train_backbone_index(model_config) -> int:
  value = model_config.get("train_backbone_from", "layer2")
  if value not in TRAIN_BACKBONE_FROM:
    raise ValueError(f"Unknown config.model.train_backbone_from {value!r}; use one of "
                     f"{TRAIN_BACKBONE_FROM} (the backbone stages before it are frozen).")
  return TRAIN_BACKBONE_FROM.index(value)


def stop_frozen_gradients(params: Any, labels: Any) -> Any:
  """`params` with `lax.stop_gradient` on every leaf that `labels` marks FROZEN.

  Differentiating through the result traces no backward pass into the frozen stages (official:
  the stem and layer1); their gradients are zeros.
  """
  return jax.tree.map(lambda p, label: jax.lax.stop_gradient(p) if label == FROZEN else p,
                      params, labels)


def param_labels(params: Any, model_config: ml_collections.ConfigDict) -> Any:
  """Labels every parameter "frozen", "backbone" or "transformer" (for optax.multi_transform).

  Backbone stages before `config.model.train_backbone_from` are "frozen", the later ones
  "backbone"; everything outside the backbone (input_proj, transformer, queries, heads, learned
  position embedding) is "transformer".

  Args:
    params: the "params" collection (or any tree with the same top-level layout).
    model_config: config.model.

  Returns:
    A tree with the structure of `params` and string leaves.
  """
  first_trained = _train_backbone_index(model_config)
  stages = resnet.stage_names()

  def label(path, _):
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    if not keys or keys[0] != "backbone":
      return TRANSFORMER
    stage = stages.index(resnet.stage_of(str(keys[1])))
    return FROZEN if stage < first_trained else BACKBONE

  return jax.tree_util.tree_map_with_path(label, params)
