"""Tests of detr_jax.models.conv: 1x1 convolutions as matrix products, same values and gradients."""

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny_test
from detr_jax.models import build_model
from detr_jax.models import conv

DN = ("NHWC", "HWIO", "NHWC")


def _both(x, w, strides, padding):
  """(reference, pointwise) forward values and gradients of a weighted sum of the output."""
  def reference(x, w):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)

  def pointwise(x, w):
    return conv.pointwise_conv_general_dilated(
        x, w, strides, padding, dimension_numbers=lax.conv_dimension_numbers(x.shape, w.shape, DN))

  results = []
  for fn in (reference, pointwise):
    out = fn(x, w)
    cotangent = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    grads = jax.grad(lambda x, w: jnp.sum(fn(x, w) * cotangent), (0, 1))(x, w)
    results.append((out, *grads))
  return results


@pytest.mark.parametrize("shape,strides,padding,out", [
    ((2, 9, 7, 16), (1, 1), ((0, 0), (0, 0)), 24),
    ((2, 9, 7, 16), (1, 1), ((0, 0), (0, 0)), 8),  # fewer outputs: the other kernel-grad order
    ((2, 9, 7, 16), (2, 2), ((0, 0), (0, 0)), 24),  # odd sizes: output ceil(9/2) x ceil(7/2)
    ((1, 8, 10, 16), (2, 1), "SAME", 24),
    ((1, 8, 10, 16), (1, 1), "VALID", 8),
])
def test_pointwise_equals_xla_convolution(shape, strides, padding, out):
  key_x, key_w = jax.random.split(jax.random.key(0))
  x = jax.random.normal(key_x, shape)
  w = jax.random.normal(key_w, (1, 1, shape[-1], out)) * 0.1
  reference, pointwise = _both(x, w, strides, padding)
  assert reference[0].shape == pointwise[0].shape
  for name, r, p in zip(("forward", "input grad", "kernel grad"), reference, pointwise):
    np.testing.assert_allclose(p, r, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("shape,kernel,strides,padding", [
    ((2, 2, 2, 8), (3, 3), (1, 1), ((1, 1), (1, 1))),  # ResNet's layer4 on a 64-px image
    ((2, 2, 3, 8), (3, 3), (2, 2), ((1, 1), (1, 1))),  # strided, wider than high
    ((1, 1, 1, 8), (3, 3), (1, 1), "SAME"),
    ((2, 2, 5, 8), (3, 3), (1, 1), ((1, 0), (2, 1))),  # uneven padding
    ((1, 4, 3, 2), (5, 5), (2, 2), ((2, 2), (2, 2))),  # a 5x5 kernel, strided, on a 4 x 3 map
    ((1, 2, 2, 8), (3, 3), (1, 1), "VALID"),  # no output pixel at all
])
def test_kernels_larger_than_the_map_are_dots_over_patches(shape, kernel, strides, padding):
  key_x, key_w = jax.random.split(jax.random.key(4))
  x = jax.random.normal(key_x, shape)
  w = jax.random.normal(key_w, (*kernel, shape[-1], 6)) * 0.1
  reference, patches = _both(x, w, strides, padding)
  assert reference[0].shape == patches[0].shape
  for name, r, p in zip(("forward", "input grad", "kernel grad"), reference, patches):
    np.testing.assert_allclose(p, r, rtol=1e-5, atol=1e-5, err_msg=name)
  # It is the product over the patches, not XLA's convolution (whose sums go in another order).
  dn = lax.conv_dimension_numbers(x.shape, w.shape, DN)
  program = jax.jit(lambda x, w: conv.pointwise_conv_general_dilated(
      x, w, strides, padding, dimension_numbers=dn)).lower(x, w).as_text()
  assert "convolution" not in program and "dot_general" in program


def test_other_kernels_are_xla_convolutions_unchanged():
  x = jax.random.normal(jax.random.key(1), (1, 8, 8, 4))
  w = jax.random.normal(jax.random.key(2), (3, 3, 4, 6))
  reference, pointwise = _both(x, w, (2, 2), ((1, 1), (1, 1)))
  for r, p in zip(reference, pointwise):
    np.testing.assert_array_equal(p, r)
  w1 = jax.random.normal(jax.random.key(3), (1, 1, 4, 6))  # 1x1 but padded: not a plain product
  reference, pointwise = _both(x, w1, (1, 1), ((1, 1), (1, 1)))
  for r, p in zip(reference, pointwise):
    np.testing.assert_array_equal(p, r)


def test_resolve_implementation():
  assert conv.resolve_implementation("auto") == ("dot" if jax.default_backend() == "cpu"
                                                  else "xla")
  assert conv.conv_general_dilated("xla") is None
  assert conv.conv_general_dilated("dot") is conv.pointwise_conv_general_dilated
  with pytest.raises(ValueError, match="config.model.conv_implementation"):
    conv.resolve_implementation("im2col")
  model_config = tiny_test.get_config().model
  model_config.conv_implementation = "fast"
  with pytest.raises(ValueError, match="config.model.conv_implementation"):
    build_model(model_config)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_detr_same_variables_and_outputs_with_either_implementation(backbone):
  """The whole model (strided 1x1 downsampling convs, input_proj, and layer4's 3x3 convs on a
  2 x 3 map, dots over patches) under "xla" and "dot"."""
  model_config = tiny_test.get_config().model
  model_config.backbone = backbone
  images = jax.random.normal(jax.random.key(4), (2, 64, 88, 3))
  pixel_mask = jnp.ones((2, 64, 88), bool).at[1, 50:].set(False)
  outputs, trees = [], []
  for implementation in ("xla", "dot"):
    model_config.conv_implementation = implementation
    model = build_model(model_config)
    variables = model.init(jax.random.key(5), images, pixel_mask, train=False)
    trees.append(jax.tree.map(np.asarray, variables))
    out = model.apply(variables, images, pixel_mask, train=False)
    grads = jax.grad(lambda v: jnp.sum(model.apply(v, images, pixel_mask, train=False)[
        "pred_boxes"]))(variables)
    outputs.append((out["pred_logits"], out["pred_boxes"], grads["params"]))
  # Same parameter tree and the same initial values: checkpoints are interchangeable.
  jax.tree.map(np.testing.assert_array_equal, trees[0], trees[1])
  np.testing.assert_allclose(outputs[1][0], outputs[0][0], atol=1e-5)
  np.testing.assert_allclose(outputs[1][1], outputs[0][1], atol=1e-5)
  # Gradients: float32 round-off of sums taken in another order, through up to 50 layers
  # (ResNet-50's stem: 5e-5 of its largest element), within 1e-4 of each tensor's largest or 1e-5.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-3, atol=max(1e-5, 1e-4 * float(np.abs(b).max()))), outputs[1][2],
      outputs[0][2])


def test_resolve_library_and_options():
  assert conv.resolve_library("auto", "cpu") == "eigen"
  assert conv.resolve_library("auto", "tpu") == "xla_default"
  assert conv.compiler_options("auto", "tpu") is None  # accelerators keep XLA's defaults
  assert conv.compiler_options("eigen", "gpu") is None
  assert conv.compiler_options("xla_default", "cpu") is None
  with pytest.raises(ValueError, match="config.model.conv_library"):
    conv.resolve_library("mkl", "cpu")
  model_config = tiny_test.get_config().model
  model_config.conv_library = "mkl"
  with pytest.raises(ValueError, match="config.model.conv_library"):
    build_model(model_config)


def _conv_grads(compiler_options):
  """A 3x3 convolution's forward value and both gradients, and the compiled program's text."""
  x = jax.random.normal(jax.random.key(6), (2, 16, 16, 32))
  w = jax.random.normal(jax.random.key(7), (3, 3, 32, 32)) * 0.1

  def loss(x, w):
    out = lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)
    return jnp.sum(out * jnp.cos(out))

  fn = jax.jit(jax.value_and_grad(loss, (0, 1)), compiler_options=compiler_options)
  return fn(x, w), fn.lower(x, w).compile().as_text()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU compile option")
def test_eigen_library_changes_kernels_not_values():
  options = conv.compiler_options("auto", "cpu")
  if options is None:
    pytest.skip("this jaxlib has no YNNPACK option (its convolutions are XLA's own already)")
  (value, grads), text = _conv_grads(options)
  (ref_value, ref_grads), ref_text = _conv_grads(None)
  # The option reaches the compiler: the forward convolution and both gradients are XLA
  # convolutions of the entry computation, none a YNNPACK fusion.
  def ynn_convolutions(text):
    return [line for line in text.splitlines()
            if "= " in line and "ynn_fusion" in line.split("= ")[0]
            and "conv_general_dilated" in line]
  entry = text[text.index("ENTRY"):]
  assert len([line for line in entry.splitlines() if " convolution(" in line]) == 3
  assert not ynn_convolutions(text)
  if "ynn_fusion" in ref_text:  # this jaxlib's default gives the convolutions to YNNPACK
    assert ynn_convolutions(ref_text)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def _pool_reference(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 9, 7, 2), (2, 1, 5, 4), (1, 2, 2, 1)])
def test_max_pool_equals_nn_max_pool_with_ties(shape):
  """Values and gradients of the stem pooling, on inputs with many equal values in each window
  (integers in 0..2, ReLU zeros): the gradient must go to the same element of each window."""
  key_x, key_g = jax.random.split(jax.random.key(8))
  x = jnp.maximum(jax.random.randint(key_x, shape, -1, 3).astype(jnp.float32), 0.0)
  out, vjp = jax.vjp(conv.max_pool_3x3_s2, x)
  ref, ref_vjp = jax.vjp(_pool_reference, x)
  np.testing.assert_array_equal(out, ref)
  g = jax.random.normal(key_g, ref.shape)
  np.testing.assert_allclose(vjp(g)[0], ref_vjp(g)[0], rtol=1e-6, atol=1e-6)
  # Random (tie-free) inputs, under jit, and the per-implementation choice.
  x = jax.random.normal(key_g, shape)
  np.testing.assert_array_equal(jax.jit(conv.max_pool("dot"))(x), _pool_reference(x))
  np.testing.assert_array_equal(conv.max_pool("xla")(x), _pool_reference(x))
  grad = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(conv.max_pool_3x3_s2(x)))))(x)
  ref_grad = jax.grad(lambda x: jnp.sum(jnp.sin(_pool_reference(x))))(x)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-6, atol=1e-6)


def test_max_pool_gradient_goes_to_one_element_per_window():
  """A constant input: every window is all ties; each output's gradient lands on exactly one
  input, the first in row-major order (the window's top-left real pixel)."""
  x = jnp.ones((1, 4, 4, 1))
  grad = jax.grad(lambda x: jnp.sum(conv.max_pool_3x3_s2(x)))(x)
  assert float(grad.sum()) == 4.0
  expected = np.zeros((4, 4))
  expected[0, 0] = expected[0, 1] = expected[1, 0] = expected[1, 1] = 1.0
  np.testing.assert_array_equal(grad[0, :, :, 0], expected)
