"""2-D convolution with a CPU-friendly implementation choice.

XLA:CPU runs convolutions inside a while loop (our `lax.scan` training epochs) several times
slower than at top level (jax-ml/jax#12868; measured here: small CNN 92 vs 825 images/s). Written
as im2col — k x k shifted slices concatenated on the channel axis, then one matrix product — the
same convolution stays fast inside loops, so learners use it on CPU. GPUs and TPUs keep XLA's
native convolution. Parameters are the same as `flax.linen.Conv`'s (`kernel` [k, k, in, out],
`bias` [out]), so checkpoints and parameter counts do not depend on the choice.
"""

import contextlib
import contextvars
import os
from typing import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

IMPLS = ("auto", "xla", "im2col")
# Overrides "auto" process-wide, e.g. for benchmarks: JAX_SEQGCN_CONV_IMPL=xla.
ENV_VAR = "JAX_SEQGCN_CONV_IMPL"
_SCOPE = contextvars.ContextVar("jax_seqgcn_conv_impl", default="auto")


@contextlib.contextmanager
def impl_scope(impl: str) -> Iterator[None]:
  """Within this context (at trace time) "auto" convolutions use `impl`.

  Used by the evaluation forward pass: outside loops XLA's convolution is faster on CPU too
  (small CNN inference: 5,100 vs 1,300 images/s), so only loop bodies need im2col.
  """
  token = _SCOPE.set(impl)
  try:
    yield
  finally:
    _SCOPE.reset(token)


def resolve_impl(impl: str = "auto") -> str:
  """"xla" or "im2col": `impl` itself; for "auto" the env override, else the `impl_scope`,
  else im2col on CPU and XLA on other backends."""
  if impl not in IMPLS:
    raise ValueError(f"conv impl must be one of {IMPLS}, got {impl!r}")
  for choice in (impl, os.environ.get(ENV_VAR, "auto"), _SCOPE.get()):
    if choice != "auto":
      if choice not in IMPLS:
        raise ValueError(f"conv impl must be one of {IMPLS}, got {choice!r}")
      return choice
  return "im2col" if jax.default_backend() == "cpu" else "xla"


def im2col_conv(x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding: int = 0):
  """Convolution as shifted slices + one matmul; equals `lax.conv_general_dilated` (NHWC/HWIO).

  Args:
    x: [B, H, W, C] input.
    kernel: [k, k, C, O] weights.
    stride: spatial stride.
    padding: symmetric zero padding in pixels.
  Returns:
    [B, H', W', O] with H' = (H + 2 padding - k) // stride + 1 (likewise W').
  """
  k = kernel.shape[0]
  if padding:
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  out_h = (x.shape[1] - k) // stride + 1
  out_w = (x.shape[2] - k) // stride + 1
  patches = [x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
             for i in range(k) for j in range(k)]
  patches = patches[0] if len(patches) == 1 else jnp.concatenate(patches, axis=-1)
  return patch_matmul(patches, kernel.reshape(-1, kernel.shape[-1]))


@jax.custom_vjp
def patch_matmul(patches: jax.Array, weights: jax.Array) -> jax.Array:
  """`patches @ weights` with a weight gradient that XLA:CPU runs without a transpose copy.

  The same product and gradients as the plain matmul (tested equal); only the form of the
  weight gradient differs. Autodiff's transpose of the matmul reaches XLA as a dot whose
  output-gradient operand must be transposed first: a strided copy of the whole gradient
  ([pixels, out] -> [out, pixels]), fused with the preceding ReLU/BatchNorm backward, and for
  the 1-channel first layer a very thin dot ([pixels, 9]^T [pixels, 32]) that ran at ~7
  GFLOP/s. Written here as one contraction over the pixel axis of both operands, XLA takes
  both in their natural layout. Measured on our 2-core CPU: small CNN training 3,000 ->
  3,400-3,500 images/s, ResNet-18 32 -> 36.

  Args:
    patches: [..., K] im2col patches (K = k * k * in_channels).
    weights: [K, O].
  Returns:
    [..., O].
  """
  return patches @ weights


def _patch_matmul_fwd(patches, weights):
  return patches @ weights, (patches, weights)


def _patch_matmul_bwd(residuals, grad):
  patches, weights = residuals
  grad_patches = grad @ weights.T
  grad_weights = jax.lax.dot_general(patches.reshape(-1, patches.shape[-1]),
                                     grad.reshape(-1, grad.shape[-1]),
                                     (((0,), (0,)), ((), ())))
  return grad_patches, grad_weights


patch_matmul.defvjp(_patch_matmul_fwd, _patch_matmul_bwd)


def max_pool(x: jax.Array, window: int = 2, *, ceil_mode: bool = False) -> jax.Array:
  """Non-overlapping max-pool (stride = window) as a reshape and a max over the window axes.

  Equals `flax.linen.max_pool(x, (k, k), strides=(k, k))` ("VALID" for `ceil_mode=False`,
  "SAME" for True) in the forward pass, but costs an elementwise pass where XLA:CPU's
  `reduce_window` and the `select_and_scatter` of its gradient took ~30% of the small CNN's
  training step. One deliberate difference: when several inputs of a window tie for the
  maximum, the gradient is split among them (torch and `select_and_scatter` give it all to
  one). VGG-11 and DeepPrior pool after a ReLU, where ties are zeros whose ReLU gradient is 0,
  so their parameter gradients are the same; the small CNN uses `conv_pool.conv_relu_pool`,
  which gives the gradient to the first maximum as torch does.

  Args:
    x: [B, H, W, C].
    window: k, the window and stride.
    ceil_mode: False drops the last H % k rows and W % k columns (torch `MaxPool2d`); True
      keeps them as a partial window (padding with -inf, like "SAME").
  Returns:
    [B, H // k, W // k, C] (ceil division when `ceil_mode`).
  """
  k = int(window)
  batch, height, width, channels = x.shape
  if ceil_mode:
    pad_h, pad_w = -height % k, -width % k
    if pad_h or pad_w:
      x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), constant_values=-jnp.inf)
  else:
    x = x[:, :height - height % k, :width - width % k]
  out_h, out_w = x.shape[1] // k, x.shape[2] // k
  return jnp.max(x.reshape(batch, out_h, k, out_w, k, channels), axis=(2, 4))


def xla_conv(x, kernel, *, stride=1, padding=0):
  """The same convolution through `lax.conv_general_dilated`."""
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride),
                                      [(padding, padding), (padding, padding)],
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Conv2D(nn.Module):
  """Square 2-D convolution with symmetric integer padding (torch `Conv2d` semantics).

  Attributes:
    features: output channels.
    kernel_size: k.
    stride: spatial stride.
    padding: zero padding in pixels on each side.
    use_bias: add a bias.
    kernel_init, bias_init: initialisers.
    impl: "auto" (im2col on CPU, XLA elsewhere), "xla" or "im2col".
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int = 0
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> [B, H', W', features]."""
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features))
    conv = im2col_conv if resolve_impl(self.impl) == "im2col" else xla_conv
    y = conv(x, kernel.astype(x.dtype), stride=self.stride, padding=self.padding)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,)).astype(x.dtype)
    return y
