"""Padding-mask downsampling and the two DETR position embeddings (sine and learned).

All functions take and return channels-last arrays; the mask is True on real (unpadded) pixels,
the opposite of the official code's padding mask, so "valid" below means not padded.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LEARNED_MAX_SIZE = 50  # rows/columns of the official learned embedding tables


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source indices of PyTorch `F.interpolate(mode="nearest")` along one axis.

  PyTorch computes floor(i * scale) with scale = in / out in float32 (and shortcuts for
  out == in and out == 2 * in); reproducing its float32 arithmetic keeps the rare cases where
  i * in / out lands on an integer identical to torch. `jax.image.resize` samples at
  floor((i + 0.5) * scale) instead, which shifts the mask by one cell.

  Args:
    in_size: input length.
    out_size: output length.

  Returns:
    int32 numpy array [out_size].
  """
  if out_size == in_size:
    return np.arange(out_size, dtype=np.int32)
  if out_size == 2 * in_size:
    return np.arange(out_size, dtype=np.int32) // 2
  scale = np.float32(in_size) / np.float32(out_size)
  index = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(index, in_size - 1).astype(np.int32)


def downsample_mask(pixel_mask: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Nearest downsampling of a pixel mask to the feature map, as DETR's `F.interpolate`.

  Args:
    pixel_mask: bool [B, H, W], True on real pixels.
    size: (h, w) of the feature map (static).

  Returns:
    bool [B, h, w].
  """
  rows = nearest_indices(pixel_mask.shape[1], size[0])
  cols = nearest_indices(pixel_mask.shape[2], size[1])
  return pixel_mask[:, rows][:, :, cols].astype(bool)


def _sine_features(angle: jax.Array, num_pos_feats: int, temperature: float) -> jax.Array:
  """[..., num_pos_feats]: sin on even and cos on odd features of angle / temperature^(2i/F)."""
  dim_t = np.arange(num_pos_feats, dtype=np.float32)
  dim_t = jnp.asarray(temperature ** (2 * (dim_t // 2) / num_pos_feats), jnp.float32)
  angles = angle[..., None] / dim_t
  stacked = jnp.stack([jnp.sin(angles[..., 0::2]), jnp.cos(angles[..., 1::2])], axis=-1)
  return stacked.reshape(*angles.shape[:-1], -1)


def sine_position_embedding(mask: jax.Array, num_pos_feats: int, temperature: float = 10000.,
                            scale: float = 2 * math.pi) -> jax.Array:
  """DETR's `PositionEmbeddingSine(normalize=True)`.

  Args:
    mask: bool [B, h, w], True on real positions.
    num_pos_feats: features per axis (hidden_dim // 2).
    temperature: frequency base.
    scale: range of the normalised coordinates.

  Returns:
    float32 [B, h, w, 2 * num_pos_feats]: concat(pos_y, pos_x), each with sin on even and cos on
    odd features, interleaved.
  """
  valid = mask.astype(jnp.float32)
  y_embed = jnp.cumsum(valid, axis=1)  # [B, h, w]
  x_embed = jnp.cumsum(valid, axis=2)
  eps = 1e-6
  y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
  x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
  return jnp.concatenate([_sine_features(y_embed, num_pos_feats, temperature),
                          _sine_features(x_embed, num_pos_feats, temperature)], axis=-1)


def sine_point_embedding(points: jax.Array, num_pos_feats: int, temperature: float = 10000.,
                         scale: float = 2 * math.pi) -> jax.Array:
  """The sine embedding of points, in the feature layout of `sine_position_embedding`.

  Args:
    points: float [..., 2], (x, y) in [0, 1] of the image.
    num_pos_feats: features per axis.
    temperature: frequency base.
    scale: range of the coordinates.

  Returns:
    float32 [..., 2 * num_pos_feats]: concat(pos_y, pos_x). A feature cell's own position, as
    `sine_position_embedding` encodes it, is the point ((j + 1) / w, (i + 1) / h).
  """
  points = points.astype(jnp.float32) * scale
  return jnp.concatenate([_sine_features(points[..., 1], num_pos_feats, temperature),
                          _sine_features(points[..., 0], num_pos_feats, temperature)], axis=-1)


class LearnedPositionEmbedding(nn.Module):
  """DETR's `PositionEmbeddingLearned`: 50-entry row and column tables, concat(x, y).

  Attributes:
    num_pos_feats: features per axis (hidden_dim // 2).
  """
  num_pos_feats: int

  @nn.compact
  def __call__(self, mask: jax.Array) -> jax.Array:
    """Args: mask bool [B, h, w]. Returns: float32 [B, h, w, 2 * num_pos_feats]."""
    batch, height, width = mask.shape
    if height > LEARNED_MAX_SIZE or width > LEARNED_MAX_SIZE:
      raise ValueError(
          f"The learned position embedding covers at most {LEARNED_MAX_SIZE}x{LEARNED_MAX_SIZE} "
          f"feature cells, got {height}x{width}; use smaller images or "
          "config.model.position_embedding='sine'.")
    init = nn.initializers.uniform(scale=1.0)  # torch nn.init.uniform_: U[0, 1)
    row_embed = nn.Embed(LEARNED_MAX_SIZE, self.num_pos_feats, embedding_init=init,
                         name="row_embed")
    col_embed = nn.Embed(LEARNED_MAX_SIZE, self.num_pos_feats, embedding_init=init,
                         name="col_embed")
    x_emb = col_embed(jnp.arange(width))  # [w, F]
    y_emb = row_embed(jnp.arange(height))  # [h, F]
    pos = jnp.concatenate([
        jnp.broadcast_to(x_emb[None, :, :], (height, width, self.num_pos_feats)),
        jnp.broadcast_to(y_emb[:, None, :], (height, width, self.num_pos_feats)),
    ], axis=-1)
    return jnp.broadcast_to(pos[None], (batch, height, width, 2 * self.num_pos_feats))
