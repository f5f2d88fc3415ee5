"""conv_relu_pool equals the separate ops in value, and torch's max-pool rule in gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_seqgcn.models import conv, conv_pool


def _separate(x, kernel, bias, window, padding, impl):
  fn = conv.im2col_conv if impl == "im2col" else conv.xla_conv
  activation = jax.nn.relu(fn(x, kernel, padding=padding) + bias)
  return activation, conv.max_pool(activation, window)


def _inputs(shape, k, out, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(keys[0], shape), jax.random.normal(keys[1], (k, k, shape[-1], out)),
          jax.random.normal(keys[2], (out,)))


@pytest.mark.parametrize("size, window", [((8, 8), 2), ((7, 9), 2), ((9, 9), 3), ((5, 4), 4)])
def test_max_pool_with_index_values_and_first_argmax(size, window):
  rng = np.random.default_rng(0)
  # Few distinct values, so that many windows tie.
  y = rng.integers(-2, 3, (2,) + size + (3,)).astype(np.float32)
  pooled, index = conv_pool.max_pool_with_index(jnp.asarray(y), window)
  np.testing.assert_array_equal(pooled, conv.max_pool(jnp.asarray(y), window))
  out_h, out_w = size[0] // window, size[1] // window
  for b in range(2):
    for i in range(out_h):
      for j in range(out_w):
        for c in range(3):
          block = y[b, i * window:(i + 1) * window, j * window:(j + 1) * window, c]
          assert index[b, i, j, c] == np.argmax(block.reshape(-1))  # first maximum


def test_max_pool_with_index_propagates_nan_and_rejects_small_maps():
  y = jnp.zeros((1, 2, 2, 1)).at[0, 1, 0, 0].set(jnp.nan)
  pooled, index = conv_pool.max_pool_with_index(y, 2)
  assert np.isnan(pooled[0, 0, 0, 0]) and index[0, 0, 0, 0] == 2
  with pytest.raises(ValueError, match="does not fit a 1x3 map"):
    conv_pool.max_pool_with_index(jnp.zeros((1, 1, 3, 1)), 2)


@pytest.mark.parametrize("impl", ["im2col", "xla"])
@pytest.mark.parametrize("shape, k, padding, window", [((2, 8, 8, 3), 3, 1, 2),
                                                       ((2, 7, 9, 2), 3, 1, 2),
                                                       ((1, 10, 10, 1), 3, 0, 2),
                                                       ((2, 9, 9, 3), 1, 0, 3)])
def test_values_and_gradients_equal_separate_ops(impl, shape, k, padding, window):
  x, kernel, bias = _inputs(shape, k, 4)
  ours = conv_pool.conv_relu_pool(x, kernel, bias, window, padding, impl)
  expected = _separate(x, kernel, bias, window, padding, impl)
  for a, b in zip(ours, expected):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

  # Random real inputs have no ties, where both pooling rules give the same gradient.
  def loss(fn, use_activation, *args):
    activation, pooled = fn(*args, window, padding, impl)
    extra = jnp.sum(jnp.cos(activation)) if use_activation else 0.0
    return jnp.sum(jnp.sin(pooled) * jnp.arange(pooled.size).reshape(pooled.shape)) + extra

  for use_activation in (False, True):
    ours = jax.grad(loss, (2, 3, 4))(conv_pool.conv_relu_pool, use_activation, x, kernel, bias)
    expected = jax.grad(loss, (2, 3, 4))(_separate, use_activation, x, kernel, bias)
    for a, b in zip(ours, expected):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _numpy_reference(x, w, b, g, window):
  """1x1 convolution + bias + ReLU + max-pool and its gradients, torch's first-maximum rule."""
  y = x @ w + b
  batch, height, width, out = y.shape
  pooled = np.zeros((batch, height // window, width // window, out), y.dtype)
  grad_y = np.zeros_like(y)
  for n in range(batch):
    for i in range(height // window):
      for j in range(width // window):
        for c in range(out):
          block = y[n, i * window:(i + 1) * window, j * window:(j + 1) * window, c]
          first = np.argmax(block.reshape(-1))
          pooled[n, i, j, c] = max(block.max(), 0)
          if block.max() > 0:
            grad_y[n, i * window + first // window, j * window + first % window, c] = g[n, i, j, c]
  grad_x = grad_y @ w.T
  grad_w = np.einsum("nhwc,nhwo->co", x, grad_y)
  return pooled, grad_x, grad_w, grad_y.sum(axis=(0, 1, 2))


@pytest.mark.parametrize("impl", ["im2col", "xla"])
def test_tied_maxima_give_the_gradient_to_the_first_one(impl):
  rng = np.random.default_rng(1)
  # Integer inputs and weights: exact sums, so ties are real ties; odd sizes drop a row/column.
  x = rng.integers(-1, 2, (2, 7, 9, 3)).astype(np.float32)
  w = rng.integers(-1, 2, (3, 4)).astype(np.float32)
  b = np.array([0.0, 1.0, -1.0, 2.0], np.float32)
  g = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
  pooled, vjp = jax.vjp(lambda x, w, b: conv_pool.conv_relu_pool(x, w, b, 2, 0, impl)[1],
                        jnp.asarray(x), jnp.asarray(w).reshape(1, 1, 3, 4), jnp.asarray(b))
  grad_x, grad_w, grad_b = vjp(jnp.asarray(g))
  expected = _numpy_reference(x, w, b, g, 2)
  np.testing.assert_allclose(pooled, expected[0])
  np.testing.assert_allclose(grad_x, expected[1], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(grad_w.reshape(3, 4), expected[2], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad_b, expected[3], rtol=1e-5, atol=1e-5)
  # The same case through jnp.max, which splits the gradient among ties: a different gradient.
  _, split_vjp = jax.vjp(lambda x: _separate(x, jnp.asarray(w).reshape(1, 1, 3, 4), b, 2, 0,
                                             impl)[1], jnp.asarray(x))
  assert not np.allclose(split_vjp(jnp.asarray(g))[0], grad_x)


def test_bfloat16_keeps_its_dtype():
  x, kernel, bias = (a.astype(jnp.bfloat16) for a in _inputs((2, 8, 8, 3), 3, 4))
  outputs, vjp = jax.vjp(lambda *a: conv_pool.conv_relu_pool(*a, 2, 1, "im2col"), x, kernel, bias)
  assert all(o.dtype == jnp.bfloat16 for o in outputs)
  grads = vjp(tuple(jnp.ones_like(o) for o in outputs))
  assert [g.dtype for g in grads] == [jnp.bfloat16] * 3


def test_module_has_conv2d_parameters_and_rejects_auto_in_the_function():
  x = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))
  block = conv_pool.ConvReLUPool(5, name="conv1")
  params = block.init(jax.random.key(0), x)["params"]
  reference = conv.Conv2D(5, padding=1).init(jax.random.key(0), x)["params"]
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, reference)
  activation, pooled = block.apply({"params": params}, x)
  assert activation.shape == (2, 8, 8, 5) and pooled.shape == (2, 4, 4, 5)
  # The accelerator block: the same parameters and values, from the plain ops.
  plain = conv_pool.ConvReLUPool(5, name="conv1", platform="gpu")
  assert jax.tree.map(jnp.shape, plain.init(jax.random.key(0), x)["params"]) == jax.tree.map(
      jnp.shape, params)
  for train in (False, True):
    for got, want in zip(plain.apply({"params": params}, x, train=train), (activation, pooled)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="impl 'im2col' or 'xla'"):
    conv_pool.conv_relu_pool(x, params["kernel"], params["bias"], 2, 1, "auto")


def test_accelerator_block_has_no_custom_rule_and_the_cpu_block_does():
  x = jax.random.normal(jax.random.key(4), (2, 8, 8, 3))
  params = conv_pool.ConvReLUPool(4).init(jax.random.key(0), x)["params"]

  def jaxpr(platform):
    block = conv_pool.ConvReLUPool(4, platform=platform)
    return str(jax.make_jaxpr(lambda p: block.apply({"params": p}, x, train=True))(params))

  assert "custom_vjp_call" in jaxpr("cpu") and "custom_vjp_call" in jaxpr(None)
  plain = jaxpr("gpu")
  assert "custom_" not in plain and "reduce_window_max" in plain
  assert "conv_general_dilated" in plain


def test_small_cnn_trains_the_same_with_either_convolution_and_on_either_platform():
  from jax_seqgcn import models
  x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  variables = models.get_learner("small_cnn", num_classes=10, channels=1).init(
      jax.random.key(1), x)

  def grads(platform, train):
    model = models.get_learner("small_cnn", num_classes=10, channels=1, platform=platform)

    def loss(params):
      logits, _, stages = model.apply({"params": params}, x, train=train)
      return jnp.sum(logits ** 2) + sum(jnp.mean(s) for s in stages)
    return jax.jit(jax.grad(loss))(variables["params"])

  expected = grads("cpu", True)  # im2col convolutions, the custom VJP
  for platform, train in (("cpu", False), ("gpu", True)):  # XLA's convolution; plain ops
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
                 grads(platform, train), expected)
