"""Convolution kernels for `flax.linen.Conv`: 1x1 convolutions (and kernels larger than their
map) as matrix products.

A 1x1 convolution is a matrix product over the channel axis; with stride s it is the product on
every s-th row and column. ResNet-50 spends most of its FLOPs in 1x1 convolutions, and XLA:CPU
computes their gradients slowly: on a 2-core CPU, a 512 -> 2048 1x1 convolution on 2 x 64 x 64
took 1.55 s for the forward pass and both gradients through `lax.conv_general_dilated`, 0.63 s as
`lax.dot_general` (same forward values). Accelerators map both forms onto the same matrix units,
so `"auto"` keeps XLA's own convolution there.

`conv_general_dilated(implementation)` returns the function to hand to `nn.Conv`
(`conv_general_dilated=`): the parameter tree, initialisation and dtype handling stay those of
`nn.Conv`, so converted checkpoints and parity are unaffected.

The kernels XLA:CPU runs the remaining (3x3, 7x7) convolutions with are a compile option of the
whole program, not of a module: `compiler_options(library, platform)` gives the `compiler_options`
of `jax.jit` for `config.model.conv_library`. Recent jaxlib hands CPU convolutions to YNNPACK,
whose weight gradients are slow here: a 3x3 128 -> 128 convolution on 2 x 64 x 64 took 45 ms for
the weight gradient under YNNPACK and 16 ms with XLA's own (Eigen) convolution, the forward pass
8 ms either way. `"eigen"` keeps YNNPACK for matrix products and gives convolutions to Eigen.

The stem's 3x3 stride-2 max pooling has the same problem: XLA:CPU differentiates
`lax.reduce_window` with `select_and_scatter`, which took 79 ms for the forward pass and gradient
of a pooling of 16 x 64 x 64 x 64 here (the shapes demo's stem), against 9 ms for `max_pool_3x3_s2`
below (nine strided slices; the same outputs, and the gradient routed to the same element).
`max_pool(implementation)` picks it with the 1x1 kernels.
"""

import functools
from typing import Any, Callable, Optional

from absl import logging
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

CONV_IMPLEMENTATIONS = ("auto", "xla", "dot")
CONV_LIBRARIES = ("auto", "eigen", "xla_default")
# XLA:CPU's list of operations it gives to YNNPACK; the matrix products only.
_YNN_OPTION = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
_CHANNELS_LAST = ("NHWC", "HWIO", "NHWC")


def resolve_implementation(implementation: str) -> str:
  """Returns "xla" or "dot" for a `config.model.conv_implementation` value."""
  if implementation not in CONV_IMPLEMENTATIONS:
    raise ValueError(f"Unknown config.model.conv_implementation {implementation!r}; use one of "
                     f"{CONV_IMPLEMENTATIONS}.")
  if implementation == "auto":
    return "dot" if jax.default_backend() == "cpu" else "xla"
  return implementation


def _is_zero_padding(padding) -> bool:
  if isinstance(padding, str):  # "SAME" and "VALID" add nothing around a 1x1 kernel
    return padding in ("SAME", "VALID")
  return all(lo == 0 and hi == 0 for lo, hi in padding)


def pointwise_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                   rhs_dilation=None, dimension_numbers=None,
                                   feature_group_count=1, batch_group_count=1, precision=None,
                                   preferred_element_type=None):
  """`lax.conv_general_dilated` with 2-D 1x1 kernels computed as a strided slice and a dot, and
  kernels larger than their input map (a 3x3 kernel on a 2 x 2 map) as a dot over the patches.

  Anything else (other kernels, input or kernel dilation, groups, layouts other than NHWC/HWIO)
  goes to `lax.conv_general_dilated` unchanged. (Kernel dilation does not matter for 1x1.)
  """
  plain = (
      lhs.ndim == 4 and dimension_numbers is not None
      and (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
           == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _CHANNELS_LAST))
      and all(d == 1 for d in (lhs_dilation or (1, 1)))
      and feature_group_count == 1 and batch_group_count == 1)
  pointwise = plain and rhs.shape[:2] == (1, 1) and _is_zero_padding(padding)
  small_map = (plain and all(d == 1 for d in (rhs_dilation or (1, 1)))
               and (lhs.shape[1] < rhs.shape[0] or lhs.shape[2] < rhs.shape[1]))
  if small_map:
    return _patch_conv(lhs, rhs, tuple(window_strides), padding, precision,
                       preferred_element_type)
  if not pointwise:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
  stride_h, stride_w = window_strides
  if (stride_h, stride_w) != (1, 1):
    lhs = lhs[:, ::stride_h, ::stride_w, :]  # the pixels a 1x1 kernel with this stride reads
  kernel = rhs.reshape(rhs.shape[-2:])  # [in, out]
  return _channel_matmul(lhs, kernel, precision, preferred_element_type)


def _patch_conv(lhs, rhs, window_strides, padding, precision, preferred_element_type):
  """A 2-D NHWC/HWIO convolution as one matrix product over its patches (im2col).

  For a map smaller than the kernel. XLA:CPU computes a 3x3 convolution of 512 channels over a
  2 x 2 map (ResNet's layer4 on a 64-px image) at about 2 GFLOP/s: 70 ms for a batch of 8 on a
  2-core CPU, against 4 ms over a 4 x 4 map, four times the work. The patches of such a map are
  few: the kh * kw strided views of the padded input, side by side on the channel axis, times
  the kernel as a [kh * kw * in, out] matrix. The same products, summed in another order.
  """
  kh, kw, cin, cout = rhs.shape
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), window_strides, padding)
  (top, bottom), (left, right) = padding
  x = lax.pad(lhs, jnp.zeros((), lhs.dtype),
              ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
  views = _window_views(x, (kh, kw), window_strides)
  patches = jnp.concatenate(views, axis=-1)  # [B, out_h, out_w, kh * kw * in], (i, j, in) order
  return _channel_matmul(patches, rhs.reshape(kh * kw * cin, cout), precision,
                         preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _channel_matmul(x, kernel, precision, preferred_element_type):
  """x [..., in] @ kernel [in, out], with a kernel gradient that transposes the smaller operand.

  XLA:CPU's matrix product wants the contracted axis minor in its left operand, so the kernel
  gradient (a sum over every pixel) copies one of its two operands into pixel-minor layout.
  Autodiff's rule puts the output gradient first: for a 128 -> 512 convolution that transposes
  the 512-channel gradient. Here the operand with fewer channels goes first, and the small
  [in, out] result is transposed instead. The products and sums are the same.
  """
  return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=preferred_element_type)


def _channel_matmul_fwd(x, kernel, precision, preferred_element_type):
  return _channel_matmul(x, kernel, precision, preferred_element_type), (x, kernel)


def _channel_matmul_bwd(precision, preferred_element_type, residuals, g):
  x, kernel = residuals
  dx = lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())), precision=precision,
                       preferred_element_type=preferred_element_type).astype(x.dtype)
  axes = tuple(range(x.ndim - 1))
  if x.shape[-1] <= g.shape[-1]:
    dw = lax.dot_general(x, g, ((axes, axes), ((), ())), precision=precision,
                         preferred_element_type=preferred_element_type)
  else:
    dw = lax.dot_general(g, x, ((axes, axes), ((), ())), precision=precision,
                         preferred_element_type=preferred_element_type).T
  return dx, dw.astype(kernel.dtype)


_channel_matmul.defvjp(_channel_matmul_fwd, _channel_matmul_bwd)


def conv_general_dilated(implementation: str) -> Optional[Callable]:
  """The `conv_general_dilated` argument of `nn.Conv` for an implementation name.

  Returns None (nn.Conv's own `lax.conv_general_dilated`) for "xla", the pointwise-as-dot kernel
  for "dot"; "auto" picks per platform (see `resolve_implementation`).
  """
  if resolve_implementation(implementation) == "dot":
    return pointwise_conv_general_dilated
  return None


def max_pool(implementation: str) -> Callable:
  """The stem's max pooling (3x3, stride 2, padding 1, padded with -inf) for an implementation:
  `nn.max_pool` for "xla", `max_pool_3x3_s2` for "dot"; "auto" picks per platform."""
  if resolve_implementation(implementation) == "dot":
    return max_pool_3x3_s2
  return lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _window_views(padded, window, strides):
  """The kh * kw strided views [B, out_h, out_w, C] of a window over an already padded
  [B, H, W, C] map (no dilation), in row-major window order: view (i, j) holds the element at
  offset (i, j) of every window."""
  (kh, kw), (stride_h, stride_w) = window, strides
  out_h = (padded.shape[1] - kh) // stride_h + 1
  out_w = (padded.shape[2] - kw) // stride_w + 1
  return [padded[:, i:i + stride_h * (out_h - 1) + 1:stride_h,
                 j:j + stride_w * (out_w - 1) + 1:stride_w]
          for i in range(kh) for j in range(kw)]


def _pool_windows(x):
  """The nine strided views [B, h, w, C] of a 3x3 stride-2 pooling of x [B, H, W, C] padded by 1
  with -inf, in row-major window order; and the padded input's shape."""
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  return _window_views(padded, (3, 3), (2, 2)), padded.shape


@jax.custom_vjp
def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """`nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))` on [B, H, W, C], as the
  maximum of nine strided slices. Its gradient goes to the first maximum of each window in
  row-major order, as XLA's `select_and_scatter` (and PyTorch's max_pool2d) do, computed with
  masks and interior-padded adds instead."""
  views, _ = _pool_windows(x)
  return functools.reduce(jnp.maximum, views)


def _max_pool_fwd(x):
  return max_pool_3x3_s2(x), x


def _max_pool_bwd(x, g):
  views, padded_shape = _pool_windows(x)
  out = functools.reduce(jnp.maximum, views)
  taken = jnp.zeros(out.shape, bool)
  grad = jnp.zeros(padded_shape, g.dtype)
  out_h, out_w = out.shape[1:3]
  for k, view in enumerate(views):
    i, j = divmod(k, 3)
    first = (view == out) & ~taken
    taken = taken | first
    # The transpose of the strided slice: g's pixels back at rows i, i + 2, ... (interior pad 1).
    pads = ((0, 0, 0), (i, padded_shape[1] - i - (2 * out_h - 1), 1),
            (j, padded_shape[2] - j - (2 * out_w - 1), 1), (0, 0, 0))
    grad = grad + lax.pad(jnp.where(first, g, 0), jnp.zeros((), g.dtype), pads)
  return (grad[:, 1:-1, 1:-1, :],)


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)


def resolve_library(library: str, platform: str) -> str:
  """Returns "eigen" or "xla_default" for a `config.model.conv_library` value on `platform`."""
  if library not in CONV_LIBRARIES:
    raise ValueError(f"Unknown config.model.conv_library {library!r}; use one of "
                     f"{CONV_LIBRARIES}.")
  if library == "auto":
    return "eigen" if platform == "cpu" else "xla_default"
  return library


@functools.lru_cache(maxsize=None)
def _cpu_option_supported() -> bool:
  """Whether this jaxlib's CPU compiler knows the YNNPACK option (older ones do not)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=_YNN_OPTION).lower(
        np.float32(0)).compile()
    return True
  except Exception as e:  # pylint: disable=broad-except
    logging.info("XLA:CPU has no %s (%s); convolutions keep XLA's default kernels.",
                 next(iter(_YNN_OPTION)), str(e).splitlines()[0][:200])
    return False


def compiler_options(library: str, platform: str) -> Optional[dict[str, Any]]:
  """`jax.jit(..., compiler_options=)` for `config.model.conv_library` on `platform`.

  None (XLA's defaults) except for "eigen" on CPU, where the option exists. Values are the same
  up to float32 round-off: only the kernels change.
  """
  if resolve_library(library, platform) == "eigen" and platform == "cpu" and (
      _cpu_option_supported()):
    return dict(_YNN_OPTION)
  return None


def program_compiler_options(model, mesh) -> Optional[dict[str, Any]]:
  """`compiler_options` for a program of `model` (a `DETR`) on `mesh`'s devices' platform."""
  return compiler_options(model.conv_library, mesh.devices.flat[0].platform)
