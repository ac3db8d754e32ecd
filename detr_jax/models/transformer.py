"""DETR encoder-decoder transformer (official `models/transformer.py`) in flax.linen.

Layouts are batch-major ([batch, tokens, dim]) instead of the official sequence-major; the maths,
the post-/pre-norm orderings, the dropouts and the initialisation are the official ones:
xavier_uniform on every weight matrix, where the query/key/value kernels use the fan of the fused
[3D, D] `in_proj_weight` (limit sqrt(6 / 4D), not sqrt(6 / 2D)); attention biases zero; FFN
biases keep PyTorch's default U(+-1/sqrt(fan_in)).
"""

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm default (flax's default is 1e-6)


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's default Linear/Conv bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# PyTorch's default Linear/Conv weight init, kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _fused_in_proj_init(key, shape, dtype=jnp.float32):
  # One [D, D] slice of xavier_uniform on the fused [3D, D] in_proj: fan_in D, fan_out 3D.
  d_model = shape[0]
  limit = math.sqrt(6.0 / (d_model + 3 * d_model))
  return jax.random.uniform(key, shape, dtype, -limit, limit)


def _large_negative(dtype) -> jax.Array:
  # Finite, so that a fully padded row gives a uniform softmax instead of NaN.
  return jnp.asarray(-0.7 * float(jnp.finfo(dtype).max), dtype)


class MultiHeadAttention(nn.Module):
  """torch.nn.MultiheadAttention with separate q/k/v/out projections and a key padding mask.

  Attributes:
    num_heads: number of heads; hidden size must be divisible by it.
    dropout_rate: dropout on the attention weights (training only).
    attention_implementation: passed to `jax.nn.dot_product_attention` (None: XLA, "cudnn").
    dtype: compute dtype.
  """
  num_heads: int
  dropout_rate: float = 0.0
  attention_implementation: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array,
               key_mask: Optional[jax.Array], train: bool, return_weights: bool = False,
               attn_mask: Optional[jax.Array] = None):
    """Attends `query` [B, T, D] over `key`/`value` [B, S, D]; key_mask bool [B, S] (True: valid);
    attn_mask bool [T, S] (True: query t may attend to key s), e.g. Group DETR's group mask.

    Returns:
      [B, T, D]; with `return_weights`, also the attention weights averaged over the heads,
      float32 [B, T, S] (computed explicitly, so only when asked).
    """
    d_model = query.shape[-1]
    head_dim = d_model // self.num_heads

    def project(x, name, kernel_init):
      dense = nn.Dense(d_model, kernel_init=kernel_init, bias_init=nn.initializers.zeros,
                       dtype=self.dtype, param_dtype=jnp.float32, name=name)
      return dense(x).reshape(*x.shape[:-1], self.num_heads, head_dim)  # [B, L, N, H]

    q = project(query, "query", _fused_in_proj_init)
    k = project(key, "key", _fused_in_proj_init)
    v = project(value, "value", _fused_in_proj_init)
    mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, S]
    if attn_mask is not None:
      pair = attn_mask[None, None]  # [1, 1, T, S]
      mask = pair if mask is None else mask & pair

    mean_weights = None
    if (train and self.dropout_rate > 0.0) or return_weights:
      # Attention dropout and the returned weights need the weights themselves, which
      # dot_product_attention hides.
      logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
      logits = logits / math.sqrt(head_dim)
      if mask is not None:
        logits = jnp.where(mask, logits, _large_negative(jnp.float32))
      probs = jax.nn.softmax(logits, axis=-1)
      mean_weights = probs.mean(axis=1)  # [B, T, S]
      weights = probs.astype(self.dtype)
      if train and self.dropout_rate > 0.0:
        weights = nn.Dropout(self.dropout_rate, deterministic=False)(weights)
      out = jnp.einsum("bnts,bsnh->btnh", weights, v)
    else:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask,
                                         implementation=self.attention_implementation)
    out = out.reshape(*out.shape[:-2], d_model)
    out = nn.Dense(d_model, kernel_init=nn.initializers.xavier_uniform(),
                   bias_init=nn.initializers.zeros, dtype=self.dtype, param_dtype=jnp.float32,
                   name="out")(out)
    return (out, mean_weights) if return_weights else out


class _LayerBase(nn.Module):
  """Shared hyperparameters and sub-blocks of the encoder and decoder layers."""
  num_heads: int
  dim_feedforward: int
  dropout: float = 0.1
  pre_norm: bool = False
  attention_implementation: Optional[str] = None
  dtype: Any = jnp.float32

  def _norm(self, name):
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, param_dtype=jnp.float32,
                        name=name)

  def _attention(self, name):
    return MultiHeadAttention(self.num_heads, self.dropout, self.attention_implementation,
                              self.dtype, name=name)

  def _dropout(self, x, train):
    return nn.Dropout(self.dropout, deterministic=not train)(x)

  def _ffn(self, x, train):
    d_model = x.shape[-1]
    h = nn.Dense(self.dim_feedforward, kernel_init=nn.initializers.xavier_uniform(),
                 bias_init=torch_bias_init(d_model), dtype=self.dtype, param_dtype=jnp.float32,
                 name="linear1")(x)
    h = self._dropout(nn.relu(h), train)
    return nn.Dense(d_model, kernel_init=nn.initializers.xavier_uniform(),
                    bias_init=torch_bias_init(self.dim_feedforward), dtype=self.dtype,
                    param_dtype=jnp.float32, name="linear2")(h)


class EncoderLayer(_LayerBase):
  """Official `TransformerEncoderLayer` (post-norm, or pre-norm with `pre_norm`)."""

  @nn.compact
  def __call__(self, src, mask, pos, train):
    """src, pos [B, S, D]; mask bool [B, S] True on real positions. Returns [B, S, D]."""
    norm1, norm2 = self._norm("norm1"), self._norm("norm2")
    attn = self._attention("self_attn")
    if self.pre_norm:
      src2 = norm1(src)
      q = src2 + pos
      src = src + self._dropout(attn(q, q, src2, mask, train), train)
      return src + self._dropout(self._ffn(norm2(src), train), train)
    q = src + pos
    src = norm1(src + self._dropout(attn(q, q, src, mask, train), train))
    return norm2(src + self._dropout(self._ffn(src, train), train))


class DecoderLayer(_LayerBase):
  """Official `TransformerDecoderLayer` (post-norm, or pre-norm with `pre_norm`)."""

  @nn.compact
  def __call__(self, tgt, memory, memory_mask, pos, query_pos, train, capture_attention=False,
               query_mask=None):
    """tgt, query_pos [B, Q, D]; memory, pos [B, S, D]; memory_mask bool [B, S]; query_mask
    bool [Q, Q] or None: which queries each query's self-attention may see.

    Returns:
      [B, Q, D]; with `capture_attention`, also the cross-attention weights (mean over heads,
      float32 [B, Q, S]).
    """
    norm1, norm2, norm3 = self._norm("norm1"), self._norm("norm2"), self._norm("norm3")
    self_attn, cross_attn = self._attention("self_attn"), self._attention("cross_attn")
    memory_key = memory + pos
    weights = None

    def attend_memory(query):
      nonlocal weights
      out = cross_attn(query, memory_key, memory, memory_mask, train,
                       return_weights=capture_attention)
      if capture_attention:
        out, weights = out
      return out

    if self.pre_norm:
      tgt2 = norm1(tgt)
      q = tgt2 + query_pos
      tgt = tgt + self._dropout(self_attn(q, q, tgt2, None, train, attn_mask=query_mask), train)
      tgt2 = norm2(tgt)
      tgt = tgt + self._dropout(attend_memory(tgt2 + query_pos), train)
      tgt = tgt + self._dropout(self._ffn(norm3(tgt), train), train)
    else:
      q = tgt + query_pos
      tgt = norm1(tgt + self._dropout(self_attn(q, q, tgt, None, train, attn_mask=query_mask),
                                      train))
      tgt = norm2(tgt + self._dropout(attend_memory(tgt + query_pos), train))
      tgt = norm3(tgt + self._dropout(self._ffn(tgt, train), train))
    return (tgt, weights) if capture_attention else tgt


class Transformer(nn.Module):
  """Official DETR `Transformer` with `return_intermediate_dec=True`.

  Attributes:
    num_heads, enc_layers, dec_layers, dim_feedforward, dropout, pre_norm: as config.model.
    attention_implementation: see MultiHeadAttention.
    dtype: compute dtype.
  """
  num_heads: int = 8
  enc_layers: int = 6
  dec_layers: int = 6
  dim_feedforward: int = 2048
  dropout: float = 0.1
  pre_norm: bool = False
  attention_implementation: Optional[str] = None
  dtype: Any = jnp.float32

  def encode(self, src, mask, pos, train):
    """Runs the encoder. src, pos [B, S, D]; mask bool [B, S]. Returns memory [B, S, D]."""
    for i in range(self.enc_layers):
      src = EncoderLayer(self.num_heads, self.dim_feedforward, self.dropout, self.pre_norm,
                         self.attention_implementation, self.dtype,
                         name=f"encoder_layer_{i}")(src, mask, pos, train)
    if self.pre_norm:  # official: encoder_norm = LayerNorm if normalize_before else None
      src = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, param_dtype=jnp.float32,
                         name="encoder_norm")(src)
    return src

  @nn.compact
  def __call__(self, src: jax.Array, mask: jax.Array, pos: jax.Array, query_embed: jax.Array,
               train: bool = False, capture_attention: bool = False,
               query_mask: Optional[jax.Array] = None,
               query_content: Optional[jax.Array] = None,
               query_update: Optional[Callable[[int, jax.Array], jax.Array]] = None):
    """Encodes the flattened feature map and decodes the object queries.

    Args:
      src: [B, S, D] projected features (S = h * w, row-major).
      mask: bool [B, S], True on real (unpadded) positions.
      pos: [B, S, D] position embedding.
      query_embed: [Q, D] learned query positions, or [B, Q, D] per image.
      train: enables dropout (needs the "dropout" rng).
      capture_attention: also return the last layer's cross-attention weights.
      query_mask: bool [Q, Q] or None, the decoder self-attention mask (Group DETR).
      query_content: [B, Q, D] or None: the decoder's input (official: zeros, i.e. None).
      query_update: None (official: every layer gets `query_embed`), or a function called with
        (i, layer i's normed output [B, Q, D]) after every decoder layer i; for i < dec_layers - 1
        it returns the query position [B, Q, D] of layer i + 1 (box refinement, see DETR).

    Returns:
      [dec_layers, B, Q, D]: every decoder layer's output after the shared decoder_norm; with
      `capture_attention`, also the last decoder layer's cross-attention weights over the
      positions (mean over heads, float32 [B, Q, S]).
    """
    memory = self.encode(src, mask, pos, train)
    if query_embed.ndim == 2:
      query_embed = jnp.broadcast_to(query_embed[None], (src.shape[0],) + query_embed.shape)
    query_pos = query_embed.astype(self.dtype)
    tgt = (jnp.zeros_like(query_pos) if query_content is None
           else query_content.astype(self.dtype))
    decoder_norm = nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype,
                                param_dtype=jnp.float32, name="decoder_norm")
    outputs = []
    weights = None
    for i in range(self.dec_layers):
      last = i == self.dec_layers - 1
      tgt = DecoderLayer(self.num_heads, self.dim_feedforward, self.dropout, self.pre_norm,
                         self.attention_implementation, self.dtype,
                         name=f"decoder_layer_{i}")(tgt, memory, mask, pos, query_pos, train,
                                                    capture_attention and last, query_mask)
      if capture_attention and last:
        tgt, weights = tgt
      outputs.append(decoder_norm(tgt))  # the un-normed tgt feeds the next layer
      if query_update is not None:
        new_pos = query_update(i, outputs[-1])
        if not last:
          query_pos = new_pos.astype(self.dtype)
    return (jnp.stack(outputs), weights) if capture_attention else jnp.stack(outputs)
