"""BatchNorm for mixed precision: a closed-form-gradient layer on CPU, Flax's layer elsewhere.

`flax.linen.BatchNorm` with float32 parameters returns float32 for a bfloat16 input, so every
layer after it would run in float32 again. This layer computes the statistics, the
normalisation and the gradient in float32 (float64 for float64 input) and returns the input's
dtype, which is what `config.train.compute_dtype="bfloat16"` needs. Its gradient is written in
closed form, one pass for the two per-channel sums and one for the input gradient,

    dbias  = sum(dy),   dscale = sum(dy * xhat),
    dx     = scale * inv_std * (dy - (dbias + xhat * dscale) / n),

with xhat = (x - mean) * inv_std and n the number of reduced elements (measured on our 2-core
CPU before `conv.patch_matmul`: ResNet-18 trained at the same 29-30 images/s as with Flax's
autodiff gradient; at `84964c2` it trains at 37 images/s, batch 128, float32,
docs/performance.md). Forward
values are Flax's: mean and E[x^2] in one pass (Flax's `use_fast_variance`), variance
max(0, E[x^2] - mean^2), biased running variance, running averages
`momentum * old + (1 - momentum) * batch`. Variable names and shapes are Flax's (`params`:
scale, bias; `batch_stats`: mean, var), so checkpoints are interchangeable.

Under a data-parallel mesh the reductions run over the global batch (jit partitions them), as
with Flax's BatchNorm without `axis_name`.

Per platform (`jax_seqgcn.models.layers.batch_norm`): `BatchNorm`, with the closed-form
gradient (a `custom_vjp`), is the CPU layer. On GPUs and TPUs the learners use
`flax_batch_norm` instead: `flax.linen.BatchNorm` itself, with autodiff gradients, given
`dtype=x.dtype` so that it too returns the input's dtype (its statistics and normalisation are
computed in at least float32, its variables are float32). Both have the same variables, so a
checkpoint trained on one platform loads on the other, and the same values.
"""

import functools
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch's BatchNorm2d defaults: momentum 0.1 (Flax's decay 0.9), eps 1e-5.
MOMENTUM = 0.9
EPSILON = 1e-5


def _stats(x32: jax.Array, axes: Tuple[int, ...]):
  mean = jnp.mean(x32, axis=axes)
  mean2 = jnp.mean(jnp.square(x32), axis=axes)
  return mean, jnp.maximum(0.0, mean2 - jnp.square(mean))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float):
  """Training-mode BatchNorm over all axes but the last.

  Args:
    x: [..., C] activations (any float dtype).
    scale, bias: [C] float32.
    epsilon: added to the variance.
  Returns:
    (y [..., C] in x's dtype, batch mean [C] float32, biased batch variance [C] float32).
  """
  y, mean, var, _ = _forward(x, scale, bias, epsilon)
  return y, mean, var


def _compute_dtype(x):
  # float32 for float32/bfloat16/float16 inputs; float64 stays float64 (exact tests).
  return jnp.promote_types(x.dtype, jnp.float32)


def _forward(x, scale, bias, epsilon):
  axes = tuple(range(x.ndim - 1))
  x32 = x.astype(_compute_dtype(x))
  mean, var = _stats(x32, axes)
  inv = jax.lax.rsqrt(var + epsilon)
  y = ((x32 - mean) * (inv * scale) + bias).astype(x.dtype)
  return y, mean, var, inv


def _fwd(x, scale, bias, epsilon):
  y, mean, var, inv = _forward(x, scale, bias, epsilon)
  return (y, mean, var), (x, mean, inv, scale, bias)


def _bwd(epsilon, residuals, cotangents):
  del epsilon
  x, mean, inv, scale, bias = residuals
  dy, dmean, dvar = cotangents
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  centred = x.astype(_compute_dtype(x)) - mean
  xhat = centred * inv
  dy32 = dy.astype(centred.dtype)
  dbias = jnp.sum(dy32, axis=axes)
  dscale = jnp.sum(dy32 * xhat, axis=axes)
  dx = (scale * inv) * (dy32 - (dbias + xhat * dscale) / n)
  # The batch statistics are outputs too (for the running averages); their cotangents are
  # zero in training, but keep the gradient exact for any other use.
  dx = dx + dmean / n + dvar * (2.0 / n) * centred
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


batch_norm_train.defvjp(_fwd, _bwd)


class BatchNorm(nn.Module):
  """BatchNorm over the last axis, PyTorch defaults (momentum 0.1 = Flax 0.9, eps 1e-5).

  Attributes:
    use_running_average: normalise with the running statistics (eval) instead of the batch's
      (train, which also updates 'batch_stats' when that collection is mutable).
    momentum: weight of the old running statistics.
    epsilon: added to the variance.
  """
  use_running_average: bool = False
  momentum: float = MOMENTUM
  epsilon: float = EPSILON

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., C] -> [..., C] (same dtype)."""
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    if self.use_running_average:
      inv = jax.lax.rsqrt(ra_var.value + self.epsilon)
      y = (x.astype(_compute_dtype(x)) - ra_mean.value) * (inv * scale) + bias
      return y.astype(x.dtype)
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var
    return y


def flax_batch_norm(x: jax.Array, *, use_running_average: bool, momentum: float = MOMENTUM,
                    epsilon: float = EPSILON, name: str | None = None) -> jax.Array:
  """`flax.linen.BatchNorm` on x [..., C], returning x's dtype (call inside a compact method).

  The GPU/TPU counterpart of `BatchNorm`: the layer is created here, as a child of the
  calling module named `name` (Flax's automatic name "BatchNorm_<n>" when None, as
  `BatchNorm`'s), with `dtype=x.dtype`: Flax computes the statistics and the normalisation in
  at least float32 and casts the result to that dtype, which keeps a bfloat16 network in
  bfloat16. Variables: `params` scale, bias and `batch_stats` mean, var, all [C] float32.
  """
  return nn.BatchNorm(use_running_average=use_running_average, momentum=momentum,
                      epsilon=epsilon, dtype=x.dtype, param_dtype=jnp.float32, name=name)(x)
