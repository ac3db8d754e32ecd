"""Convolution kernels for `flax.linen.Conv`: 1x1 convolutions as matrix products.

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
"""

import functools
from typing import Any, Callable, Optional

from absl import logging
import jax
from jax import lax
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
  """`lax.conv_general_dilated` with 2-D 1x1 kernels computed as a strided slice and a dot.

  Anything else (larger kernels, padding, input dilation, groups, layouts other than NHWC/HWIO)
  goes to `lax.conv_general_dilated` unchanged. (Kernel dilation does not matter for 1x1.)
  """
  pointwise = (
      lhs.ndim == 4 and dimension_numbers is not None
      and (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
           == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _CHANNELS_LAST))
      and rhs.shape[:2] == (1, 1)
      and _is_zero_padding(padding)
      and all(d == 1 for d in (lhs_dilation or (1, 1)))
      and feature_group_count == 1 and batch_group_count == 1)
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
