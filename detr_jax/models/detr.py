"""The DETR detector: backbone -> input_proj -> transformer -> class and box heads.

Equal to the official `models/detr.py` (`DETR.forward`) given the same weights: the padding mask is
downsampled with PyTorch's nearest rule, positions use the sine (or learned) embedding, and the
same two heads serve every decoder layer (aux outputs for layers 0..L-2).
"""

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from detr_jax.models import conv as conv_lib
from detr_jax.models import position_encoding
from detr_jax.models import resnet
from detr_jax.models import transformer as transformer_lib

POSITION_EMBEDDINGS = ("sine", "learned")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BOX_REFINEMENT_NEEDS_ANCHORS = (
    "config.model.box_refinement needs config.model.query_anchors=True (the first decoder "
    "layer's references are the anchor points).")


def block_attention_mask(sizes) -> jax.Array:
  """bool [N, N], N = sum(sizes): True where two queries are in the same block of consecutive
  queries of the given sizes (the decoder self-attention mask of query groups)."""
  block = jnp.concatenate([jnp.full((n,), i, jnp.int32) for i, n in enumerate(sizes)])
  return block[:, None] == block[None, :]


def group_attention_mask(num_groups: int, num_queries: int) -> jax.Array:
  """bool [K * Q, K * Q]: True where two queries are in the same group (Group DETR's decoder
  self-attention mask; queries are laid out group after group)."""
  return block_attention_mask([num_queries] * num_groups)


def validate_inputs(images: jax.Array, pixel_mask: jax.Array) -> None:
  """Raises ValueError unless images/pixel_mask have the model's input layout (static shapes)."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be [batch, height, width, 3] (channels last, RGB), got shape "
                     f"{tuple(images.shape)}.")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"images must be a normalised float array, got dtype {images.dtype}.")
  if pixel_mask.ndim != 3 or tuple(pixel_mask.shape) != tuple(images.shape[:3]):
    raise ValueError(f"pixel_mask must be [batch, height, width] = {tuple(images.shape[:3])} "
                     f"(True on real pixels), got shape {tuple(pixel_mask.shape)}.")
  if not (jnp.issubdtype(pixel_mask.dtype, jnp.bool_) or
          jnp.issubdtype(pixel_mask.dtype, jnp.integer)):
    raise ValueError(f"pixel_mask must be bool (or 0/1 integers), got dtype {pixel_mask.dtype}.")


class MLP(nn.Module):
  """Official `MLP`: Linear layers with ReLU between (PyTorch default init)."""
  hidden_dim: int
  output_dim: int
  num_layers: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      features = self.output_dim if i == self.num_layers - 1 else self.hidden_dim
      x = nn.Dense(features, kernel_init=transformer_lib.torch_kernel_init,
                   bias_init=transformer_lib.torch_bias_init(x.shape[-1]), dtype=self.dtype,
                   param_dtype=jnp.float32, name=f"layers_{i}")(x)
      if i < self.num_layers - 1:
        x = nn.relu(x)
    return x


def inverse_sigmoid(x: jax.Array, eps: float = 1e-5) -> jax.Array:
  """log(x / (1 - x)), with x clipped to [0, 1] and both terms to at least eps (Deformable DETR's
  `inverse_sigmoid`)."""
  x = jnp.clip(x, 0.0, 1.0)
  return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1.0 - x, eps))


class DETR(nn.Module):
  """DETR object detector.

  Attributes mirror `config.model` (see configs/detr_r50_coco.py); `dtype` is the compute dtype,
  parameters are always float32.
  """
  backbone: str = "resnet50"
  dilation: bool = False
  position_embedding: str = "sine"
  hidden_dim: int = 256
  num_heads: int = 8
  enc_layers: int = 6
  dec_layers: int = 6
  dim_feedforward: int = 2048
  dropout: float = 0.1
  pre_norm: bool = False
  num_queries: int = 100
  num_classes: int = 91
  aux_loss: bool = True
  attention_implementation: Optional[str] = None
  conv_implementation: str = "auto"
  # Read by the programs' jit (`conv.compiler_options`), not by the module: see models/conv.py.
  conv_library: str = "auto"
  num_query_groups: int = 1
  one_to_many_queries: int = 0
  backbone_norm: str = "frozen_bn"
  group_norm_groups: int = resnet.GROUP_NORM_GROUPS  # backbone_norm="group_norm" only
  query_anchors: bool = False
  box_refinement: bool = False
  backbone_width: int = 64
  backbone_stages: int = 4
  denoising_groups: int = 0
  denoising_box_noise: float = 0.4
  denoising_label_noise: float = 0.2
  # > 0: every class logit's bias starts at -log((1 - p) / p), so each sigmoid score starts near p
  # (Lin et al., "Focal Loss for Dense Object Detection", Sec. 4.1; Deformable DETR's class head).
  # 0: PyTorch's default Linear init (official DETR).
  class_prior_prob: float = 0.0
  dtype: Any = jnp.float32

  def _query_block(self, name: str, count: int, d_model: int, pos_mlp):
    """(positional query embedding [count, D], anchor points [count, 2] or None) of one block.

    Plain DETR: a learned embedding (`name`). With `query_anchors` (Anchor DETR, Wang et al.
    2022, "Anchor DETR: Query Design for Transformer-Based Object Detection"): learned anchor
    points (`name` + "_anchors", initialised uniformly in the image) whose sine embedding, in the
    layout of the feature map's position encoding, goes through a 2-layer MLP (`query_pos_mlp`,
    shared by all blocks); the box head then predicts the centre relative to the anchor.
    """
    if not self.query_anchors:
      return nn.Embed(count, d_model, embedding_init=nn.initializers.normal(1.0),
                      name=name).embedding, None
    anchors = self.param(f"{name}_anchors", nn.initializers.uniform(1.0), (count, 2), jnp.float32)
    anchors = jnp.clip(anchors, 1e-3, 1 - 1e-3)
    embed = position_encoding.sine_point_embedding(anchors, d_model // 2)
    return pos_mlp(embed), anchors

  def _queries(self, d_model: int, train: bool, pos_mlp):
    """(the decoder's query blocks [(embedding, anchors or None)], queries matched one-to-one).

    The one-to-many block, when trained, is the last; the one-to-one queries come first."""
    blocks = [self._query_block("query_embed", self.num_queries, d_model, pos_mlp)]
    extra_queries = (train or self.is_initializing())
    if self.num_query_groups > 1 and extra_queries:
      # Group DETR (Chen et al. 2022): K - 1 more groups of num_queries queries.
      groups = self._query_block("group_query_embed",
                                 (self.num_query_groups - 1) * self.num_queries, d_model,
                                 pos_mlp)
      if train:
        blocks += [tuple(x if x is None else x[i * self.num_queries:(i + 1) * self.num_queries]
                         for x in groups) for i in range(self.num_query_groups - 1)]
    num_one_to_one = sum(embed.shape[0] for embed, _ in blocks)
    if self.one_to_many_queries > 0 and extra_queries:
      # H-DETR (Jia et al. 2023), hybrid matching: queries trained one-to-many.
      block = self._query_block("one_to_many_query_embed", self.one_to_many_queries, d_model,
                                pos_mlp)
      if train:
        blocks.append(block)
    return blocks, num_one_to_one

  def _denoising_queries(self, targets, d_model: int, pos_mlp):
    """DN-DETR's denoising queries (Li et al. 2022, "DN-DETR: Accelerate DETR Training by
    Introducing Query DeNoising"), on anchor points: G groups, each with one query per target
    slot, group after group ([B, G * M]).

    A query's anchor is its target's centre moved by up to `denoising_box_noise` times half the
    box's width and height (uniform, clipped to the image); its content (the decoder input, zero
    for the learned queries) is the embedding of the target's label, replaced by a random class
    with probability `denoising_label_noise`. Padding slots get the no-object embedding. Each
    query learns to reconstruct its own target (`losses.training_loss`), so the decoder and heads
    are trained from the first step on queries placed at objects.

    Returns:
      (content [B, G * M, D], position [B, G * M, D], anchors float32 [B, G * M, 2]); with
      `targets` None (initialisation), the embedding table is made and (None, None, None)
      returned.
    """
    label_embed = self.param("denoising_label_embed", nn.initializers.normal(1.0),
                             (self.num_classes + 1, d_model), jnp.float32)
    if targets is None:
      return None, None, None
    groups = self.denoising_groups
    labels = jnp.tile(targets["labels"].astype(jnp.int32), (1, groups))
    valid = jnp.tile(targets["valid"].astype(bool), (1, groups))
    boxes = jnp.tile(targets["boxes"].astype(jnp.float32), (1, groups, 1))
    key_shift, key_flip, key_label = jax.random.split(self.make_rng("denoising"), 3)
    shift = jax.random.uniform(key_shift, labels.shape + (2,), minval=-1.0, maxval=1.0)
    anchors = boxes[..., :2] + shift * boxes[..., 2:] * (self.denoising_box_noise / 2)
    anchors = jnp.clip(anchors, 1e-3, 1 - 1e-3)
    flip = jax.random.bernoulli(key_flip, self.denoising_label_noise, labels.shape)
    labels = jnp.where(flip, jax.random.randint(key_label, labels.shape, 0, self.num_classes),
                       labels)
    labels = jnp.where(valid, labels, self.num_classes)
    position = pos_mlp(position_encoding.sine_point_embedding(anchors, d_model // 2))
    return jnp.take(label_embed, labels, axis=0), position, anchors

  def _refinement(self, bbox_embed, pos_mlp, anchors, layer_boxes):
    """The decoder's `query_update` for box refinement; appends each layer's boxes to
    `layer_boxes`.

    Deformable DETR's iterative bounding box refinement (Zhu et al. 2021, "Deformable DETR:
    Deformable Transformers for End-to-End Object Detection", Sec. 4.1, `with_box_refine`) with
    the query positions of DAB-DETR (Liu et al. 2022, "DAB-DETR: Dynamic Anchor Boxes are Better
    Queries for DETR"): layer 0 predicts its box relative to the query's anchor point, as without
    refinement; layer i > 0 predicts a correction of layer i - 1's box, box_i = sigmoid(
    bbox_embed(h_i) + inverse_sigmoid(stop_gradient(box_{i-1}))), and its query position is the
    anchor embedding (the sine embedding through `query_pos_mlp`) of box_{i-1}'s centre. The box
    head is shared by all layers, as in DETR.
    """
    d_model = self.hidden_dim
    reference = anchors  # [Q, 2] or [B, Q, 2] in [0, 1]; then [B, Q, 4]

    def update(unused_layer, hidden):
      nonlocal reference
      offset = inverse_sigmoid(reference)
      if offset.shape[-1] == 2:
        offset = jnp.concatenate([offset, jnp.zeros_like(offset)], axis=-1)
      boxes = jax.nn.sigmoid(bbox_embed(hidden).astype(jnp.float32) + offset)
      layer_boxes.append(boxes)
      reference = jax.lax.stop_gradient(boxes)
      return pos_mlp(position_encoding.sine_point_embedding(reference[..., :2], d_model // 2))

    return update

  @nn.compact
  def __call__(self, images: jax.Array, pixel_mask: jax.Array, train: bool = False,
               capture_attention: bool = False,
               targets: Optional[dict[str, jax.Array]] = None) -> dict[str, Any]:
    """Detects objects.

    Args:
      images: float [B, H, W, 3], normalised.
      pixel_mask: bool [B, H, W], True on real pixels (images are padded bottom/right).
      train: enables dropout (needs rngs={"dropout": key}); with num_query_groups K > 1, also
        decodes the K - 1 extra query groups (Group DETR), so outputs have K * Q queries, group
        after group, group 0 first; without `train`, group 0 only. With one_to_many_queries
        Q2 > 0 (H-DETR's one-to-many branch), also decodes Q2 more queries, returned apart as
        "one_to_many" (a dict like the outputs); they and the one-to-one queries do not attend
        to each other. With denoising_groups G > 0 (DN-DETR, needs query_anchors), also decodes
        G * M denoising queries made from `targets`, returned as "denoising"; every group attends
        only within itself.
      capture_attention: also return the decoder's cross-attention (below).
      targets: the batch's padded targets ("labels" [B, M], "boxes" [B, M, 4] cxcywh, "valid"
        [B, M]); read only to make the denoising queries (train, denoising_groups > 0; needs
        rngs={"denoising": key}).

    Returns:
      dict with pred_logits float32 [B, Q, num_classes + 1], pred_boxes float32 [B, Q, 4]
      (cxcywh in [0, 1] of the unpadded image) and aux_outputs (list of dec_layers - 1 such dicts,
      layers 0..L-2; empty without aux_loss). With `capture_attention`, also "attention": the
      last decoder layer's cross-attention weights, mean over heads, float32 [B, Q, h, w] on the
      backbone's feature grid (h, w), and "feature_mask" bool [B, h, w] (True on cells of the
      unpadded image); computed only when asked.
    """
    validate_inputs(images, pixel_mask)
    d_model = self.hidden_dim
    features = resnet.ResNet(self.backbone, self.dilation, self.dtype,
                             self.conv_implementation, self.backbone_norm,
                             self.backbone_width, self.group_norm_groups,
                             self.backbone_stages, name="backbone")(images)
    batch, height, width, channels = features.shape
    mask = position_encoding.downsample_mask(pixel_mask, (height, width))  # [B, h, w]

    if self.position_embedding == "sine":
      pos = position_encoding.sine_position_embedding(mask, d_model // 2)
    elif self.position_embedding == "learned":
      pos = position_encoding.LearnedPositionEmbedding(d_model // 2,
                                                       name="position_embedding")(mask)
    else:
      raise ValueError(f"Unknown position_embedding {self.position_embedding!r}; "
                       f"use one of {POSITION_EMBEDDINGS}.")

    src = nn.Conv(d_model, (1, 1), kernel_init=transformer_lib.torch_kernel_init,
                  bias_init=transformer_lib.torch_bias_init(channels), dtype=self.dtype,
                  param_dtype=jnp.float32, name="input_proj",
                  conv_general_dilated=conv_lib.conv_general_dilated(self.conv_implementation))(
                      features)
    # Training-only queries (Group DETR's extra groups, H-DETR's one-to-many queries) come after
    # the model's own; inference uses those alone, so published weights load unchanged and
    # inference is the plain model (it neither reads nor needs the extra parameters).
    pos_mlp = (MLP(d_model, d_model, 2, self.dtype, name="query_pos_mlp")
               if self.query_anchors else None)
    queries, num_one_to_one = self._queries(d_model, train, pos_mlp)
    blocks = [embed.shape[0] for embed, _ in queries]
    query_embed = jnp.concatenate([embed for embed, _ in queries], axis=0)
    anchors = (jnp.concatenate([anchors for _, anchors in queries], axis=0)  # [Q, 2]
               if self.query_anchors else None)
    query_content = None
    num_denoising = 0
    if self.denoising_groups > 0 and (train or self.is_initializing()):
      if not self.query_anchors:
        raise ValueError("config.model.denoising_groups > 0 needs config.model.query_anchors=True "
                         "(denoising queries are anchor points near the targets).")
      if train and targets is None:
        raise ValueError("config.model.denoising_groups > 0: training needs the targets "
                         "(model.apply(..., train=True, targets=...)).")
      content, position, dn_anchors = self._denoising_queries(
          targets if train else None, d_model, pos_mlp)
      if content is not None:  # the denoising queries come last
        num_learned, num_denoising = query_embed.shape[0], content.shape[1]
        blocks += [num_denoising // self.denoising_groups] * self.denoising_groups
        query_embed = jnp.concatenate(
            [jnp.broadcast_to(query_embed[None], (batch,) + query_embed.shape),
             position.astype(query_embed.dtype)], axis=1)
        query_content = jnp.concatenate(
            [jnp.zeros((batch, num_learned, d_model), content.dtype), content], axis=1)
        anchors = jnp.concatenate(
            [jnp.broadcast_to(anchors[None], (batch,) + anchors.shape), dn_anchors], axis=1)
    query_mask = block_attention_mask(blocks) if len(blocks) > 1 else None
    bbox_embed = MLP(d_model, 4, 3, self.dtype, name="bbox_embed")
    query_update, layer_boxes = None, []
    if self.box_refinement:
      if not self.query_anchors:
        raise ValueError(BOX_REFINEMENT_NEEDS_ANCHORS)
      query_update = self._refinement(bbox_embed, pos_mlp, anchors, layer_boxes)
    hidden = transformer_lib.Transformer(
        num_heads=self.num_heads, enc_layers=self.enc_layers, dec_layers=self.dec_layers,
        dim_feedforward=self.dim_feedforward, dropout=self.dropout, pre_norm=self.pre_norm,
        attention_implementation=self.attention_implementation, dtype=self.dtype,
        name="transformer")(
            src.reshape(batch, height * width, d_model),
            mask.reshape(batch, height * width),
            pos.reshape(batch, height * width, d_model).astype(self.dtype),
            query_embed,
            train,
            capture_attention,
            query_mask,
            query_content,
            query_update)  # [L, B, Q, D] (K * Q queries when training groups)
    if capture_attention:
      hidden, attention = hidden

    if self.class_prior_prob > 0:
      class_bias_init = nn.initializers.constant(
          -math.log((1 - self.class_prior_prob) / self.class_prior_prob))
    else:
      class_bias_init = transformer_lib.torch_bias_init(d_model)
    logits = nn.Dense(self.num_classes + 1, kernel_init=transformer_lib.torch_kernel_init,
                      bias_init=class_bias_init, dtype=self.dtype,
                      param_dtype=jnp.float32, name="class_embed")(hidden)
    logits = logits.astype(jnp.float32)
    if self.box_refinement:  # computed layer by layer in the decoder
      boxes = jnp.stack(layer_boxes)
    else:
      boxes = bbox_embed(hidden).astype(jnp.float32)
      if self.query_anchors:  # the box centre is predicted relative to the query's anchor point
        boxes = boxes.at[..., :2].add(inverse_sigmoid(anchors))  # anchors [Q, 2] or [B, Q, 2]
      boxes = jax.nn.sigmoid(boxes)

    def as_outputs(logits, boxes):
      aux = ([{"pred_logits": logits[i], "pred_boxes": boxes[i]}
              for i in range(self.dec_layers - 1)] if self.aux_loss else [])
      return {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "aux_outputs": aux}

    outputs = as_outputs(logits[:, :, :num_one_to_one], boxes[:, :, :num_one_to_one])
    num_learned = logits.shape[2] - num_denoising
    if num_learned > num_one_to_one:
      outputs["one_to_many"] = as_outputs(logits[:, :, num_one_to_one:num_learned],
                                          boxes[:, :, num_one_to_one:num_learned])
    if num_denoising:
      outputs["denoising"] = as_outputs(logits[:, :, num_learned:], boxes[:, :, num_learned:])
    if capture_attention:
      outputs["attention"] = attention.reshape(batch, -1, height, width)[:, :num_one_to_one]
      outputs["feature_mask"] = mask
    return outputs
