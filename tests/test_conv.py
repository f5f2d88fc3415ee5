"""im2col convolution equals XLA's, in value and gradient; the per-platform kernel choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_seqgcn.models import conv


@pytest.mark.parametrize("k, stride, padding, size", [(3, 1, 1, 7), (3, 2, 1, 8), (1, 2, 0, 8),
                                                      (5, 1, 2, 9), (3, 1, 0, 6), (3, 2, 1, 7)])
def test_im2col_equals_xla_conv(k, stride, padding, size):
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  w = jax.random.normal(jax.random.key(1), (k, k, 3, 5))
  expected = conv.xla_conv(x, w, stride=stride, padding=padding)
  np.testing.assert_allclose(conv.im2col_conv(x, w, stride=stride, padding=padding), expected,
                             atol=2e-5)

  def loss(fn, x, w):
    return jnp.sum(jnp.sin(fn(x, w, stride=stride, padding=padding)))
  for argnum in (0, 1):
    np.testing.assert_allclose(jax.grad(loss, argnum + 1)(conv.im2col_conv, x, w),
                               jax.grad(loss, argnum + 1)(conv.xla_conv, x, w), atol=1e-4)


def test_conv_impl_for_each_platform():
  # CPU: im2col in training passes (inside the epoch loop), XLA's convolution in evaluation.
  assert conv.conv_impl("cpu", train=True) == "im2col"
  assert conv.conv_impl("cpu", train=False) == "xla"
  assert conv.conv_impl(None, train=True) == "im2col"  # an unbound module: CPU kernels
  assert conv.conv_impl(None, train=False) == "xla"
  for platform in ("gpu", "cuda", "rocm", "tpu"):  # accelerators: XLA's convolution always
    assert conv.conv_impl(platform, train=True) == "xla"
    assert conv.conv_impl(platform, train=False) == "xla"
    assert conv.uses_cpu_kernels(platform) is False
  assert conv.uses_cpu_kernels("cpu") is True and conv.uses_cpu_kernels(None) is True
  assert conv.check_platform(None) == "cpu" and conv.check_platform("tpu") == "tpu"
  for bad in ("", 3):
    with pytest.raises(ValueError, match="platform must be"):
      conv.check_platform(bad)
  with pytest.raises(ValueError, match="conv impl"):
    conv.Conv2D(4, impl="auto").init(jax.random.key(0), jnp.zeros((1, 5, 5, 2)))


def test_conv2d_outputs_and_gradients_do_not_depend_on_impl():
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
  modules = [conv.Conv2D(5, 3, stride=2, padding=1, impl=impl) for impl in conv.IMPLS]
  variables = modules[0].init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, modules[1].init(jax.random.key(1), x)) == jax.tree.map(
      jnp.shape, variables)
  results = [jax.value_and_grad(lambda v, x, m=m: jnp.sum(jnp.sin(m.apply(v, x))),
                                argnums=(0, 1))(variables, x) for m in modules]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), *results)


@pytest.mark.parametrize("size, window, ceil_mode", [((8, 8), 2, False), ((7, 9), 2, False),
                                                      ((7, 9), 2, True), ((12, 10), 4, False),
                                                      ((5, 6), 3, True), ((1, 1), 2, True)])
def test_max_pool_equals_flax(size, window, ceil_mode):
  import flax.linen as nn
  x = jax.random.normal(jax.random.key(0), (2,) + size + (3,))
  padding = "SAME" if ceil_mode else "VALID"  # SAME pads only at the end for these sizes
  expected = nn.max_pool(x, (window, window), strides=(window, window), padding=padding)
  got = conv.max_pool(x, window, ceil_mode=ceil_mode)
  np.testing.assert_array_equal(got, expected)
  # The accelerator kernel (Flax's own reduce_window) gives the same values.
  np.testing.assert_array_equal(conv.max_pool(x, window, ceil_mode=ceil_mode, platform="gpu"),
                                expected)
  np.testing.assert_array_equal(conv.xla_max_pool(x, window, ceil_mode=ceil_mode), expected)
  # Without ties (random normals) the gradient is select_and_scatter's: 1 at each window's max.
  g = jax.grad(lambda x: jnp.sum(conv.max_pool(x, window, ceil_mode=ceil_mode) ** 2))(x)
  g_flax = jax.grad(lambda x: jnp.sum(nn.max_pool(x, (window, window),
                                                  strides=(window, window),
                                                  padding=padding) ** 2))(x)
  np.testing.assert_allclose(g, g_flax, rtol=1e-6)


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_ceil_mode_pads_after_the_last_window_as_torch(platform):
  # 5 rows with window 4: torch's ceil mode pools rows 0-3 and row 4 alone (Flax's "SAME"
  # would pad one row before and two after).
  x = np.random.default_rng(0).normal(size=(1, 5, 6, 2)).astype(np.float32)
  expected = np.full((1, 2, 2, 2), -np.inf, np.float32)
  for i in range(2):
    for j in range(2):
      expected[0, i, j] = x[0, 4 * i:4 * i + 4, 4 * j:4 * j + 4].max(axis=(0, 1))
  got = conv.max_pool(jnp.asarray(x), 4, ceil_mode=True, platform=platform)
  np.testing.assert_array_equal(got, expected)


def test_relu_is_jax_relu_without_a_custom_rule():
  x = jnp.array([-2.0, -0.0, 0.0, 0.5, jnp.inf, -jnp.inf, jnp.nan])
  np.testing.assert_array_equal(conv.relu(x), jax.nn.relu(x))
  grad = jax.vmap(jax.grad(conv.relu))(x[:6])
  np.testing.assert_array_equal(grad, jax.vmap(jax.grad(jax.nn.relu))(x[:6]))
  assert "custom" not in str(jax.make_jaxpr(jax.grad(conv.relu))(1.0))


def test_max_pool_after_relu_has_select_and_scatter_gradients():
  # After a ReLU, tied window maxima are zeros whose ReLU gradient is 0, so splitting the
  # gradient among ties (ours) or giving it to one input (select_and_scatter, torch) agree.
  import flax.linen as nn
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 4)) - 1.0  # many all-zero windows
  w = jax.random.normal(jax.random.key(2), (2, 3, 3, 4))
  flax_pool = lambda h: nn.max_pool(h, (2, 2), strides=(2, 2), padding="VALID")
  grads = [jax.grad(lambda x: jnp.sum(w * pool(nn.relu(x))))(x)
           for pool in (lambda h: conv.max_pool(h, 2), flax_pool)]
  assert np.mean(np.asarray(flax_pool(nn.relu(x))) == 0) > 0.1
  np.testing.assert_allclose(grads[0], grads[1], rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_patch_matmul_equals_matmul_in_value_and_gradient(dtype):
  patches = jax.random.normal(jax.random.key(2), (3, 5, 4, 18)).astype(dtype)
  weights = jax.random.normal(jax.random.key(3), (18, 7)).astype(dtype)
  cotangent = jax.random.normal(jax.random.key(4), (3, 5, 4, 7)).astype(dtype)
  ours, ours_vjp = jax.vjp(conv.patch_matmul, patches, weights)
  plain, plain_vjp = jax.vjp(jnp.matmul, patches, weights)
  tol = 1e-5 if dtype == jnp.float32 else 5e-2
  np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(plain, np.float32),
                             rtol=tol, atol=tol)
  for got, want in zip(ours_vjp(cotangent), plain_vjp(cotangent)):
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol * 10)
  # The weight gradient by hand: sum over every pixel of patch (x) output gradient.
  by_hand = np.einsum("bhwk,bhwo->ko", np.asarray(patches, np.float64),
                      np.asarray(cotangent, np.float64))
  np.testing.assert_allclose(np.asarray(ours_vjp(cotangent)[1], np.float64), by_hand,
                             rtol=tol, atol=tol * 10)


def test_patch_matmul_has_second_derivatives():
  patches = jax.random.normal(jax.random.key(5), (6, 4))
  weights = jax.random.normal(jax.random.key(6), (4, 3))
  def loss(w):
    return jnp.sum(jnp.tanh(conv.patch_matmul(patches, w)))
  def plain(w):
    return jnp.sum(jnp.tanh(patches @ w))
  np.testing.assert_allclose(jax.jacrev(jax.grad(loss))(weights),
                             jax.jacrev(jax.grad(plain))(weights), rtol=1e-5, atol=1e-5)
