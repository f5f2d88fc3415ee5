"""2-D convolution and max-pooling, with the kernels chosen per platform.

A learner runs on one platform, the `platform` of the devices of its run's mesh, which
`training.fit` and `training.inference` bind into the module (`models.bind_platform`) before
they trace it; the choice is an explicit module attribute, part of the jit cache key, and no
environment variable or trace-time global is read.

* CPU ("cpu"): XLA:CPU runs convolutions inside a while loop (our `lax.fori_loop` training
  epochs) several times slower than at top level (jax-ml/jax#12868; measured here: small CNN
  92 vs 825 images/s). Written as im2col — k x k shifted slices concatenated on the channel
  axis, then one matrix product (`patch_matmul`, with a hand-written weight gradient) — the
  same convolution stays fast inside loops, so training passes (`train=True`) use it.
  Evaluation passes (`train=False`) run at top level, where XLA's own convolution is the
  faster one (small CNN inference: 5,100 vs 1,300 images/s). Max-pooling is the reshape
  `max_pool` (XLA:CPU's `reduce_window` and its `select_and_scatter` gradient were ~30% of the
  small CNN's step).
* Any other platform (GPU "gpu"/"cuda"/"rocm", TPU "tpu"): XLA's native convolution
  (`lax.conv_general_dilated`) and Flax's `reduce_window` max-pool (`xla_max_pool`), in
  training too, with autodiff gradients; none of the CPU kernels.

`conv_impl(platform, train=...)` is that choice. Parameters are the same as
`flax.linen.Conv`'s (`kernel` [k, k, in, out], `bias` [out]) on every platform, so checkpoints
and parameter counts do not depend on it.
"""

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

CPU = "cpu"
# Platforms with XLA's own kernels (what `jax.Device.platform` or JAX_PLATFORMS name them).
ACCELERATOR_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")
IMPLS = ("im2col", "xla")


def check_platform(platform: Optional[str]) -> str:
  """The platform a module was built for: `platform` itself, "cpu" for None (unbound).

  Args:
    platform: None, "cpu", or an accelerator platform such as "gpu", "cuda", "rocm", "tpu"
      (any other non-empty name is taken as an accelerator too: plain Flax/XLA there).
  Raises:
    ValueError: an empty name or not a string.
  """
  if platform is None:
    return CPU
  if not isinstance(platform, str) or not platform:
    raise ValueError(f"platform must be a name such as 'cpu', 'gpu' or 'tpu', got {platform!r}")
  return platform


def uses_cpu_kernels(platform: Optional[str]) -> bool:
  """True for "cpu" (and None): im2col convolutions, custom-gradient blocks, reshape max-pool."""
  return check_platform(platform) == CPU


def conv_impl(platform: Optional[str], *, train: bool) -> str:
  """The convolution for a pass on `platform`: "im2col" or "xla".

  On CPU, "im2col" for training passes (they run inside the epoch's loop, where XLA:CPU's
  convolution is slow) and "xla" for evaluation passes (top level, where it is the faster);
  elsewhere always "xla".
  """
  return "im2col" if uses_cpu_kernels(platform) and train else "xla"


def check_impl(impl: str) -> str:
  if impl not in IMPLS:
    raise ValueError(f"conv impl must be one of {IMPLS}, got {impl!r}")
  return impl


def relu(x: jax.Array) -> jax.Array:
  """max(x, 0) with gradient 0 at 0 (as `jax.nn.relu`) and NaN kept, as plain ops.

  `jax.nn.relu` is a `custom_jvp` function; this is the same function and gradient written
  with `jnp.where`, so the learners' GPU/TPU path is free of custom derivative rules.
  """
  return jnp.where(x <= 0, jnp.zeros((), x.dtype), x)


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


def max_pool(x: jax.Array, window: int = 2, *, ceil_mode: bool = False,
             platform: Optional[str] = None) -> jax.Array:
  """Non-overlapping max-pool (stride = window) with the kernel for `platform`.

  `reshape_max_pool` on CPU (and for None), `xla_max_pool` elsewhere; the same values.

  Args:
    x: [B, H, W, C].
    window: k, the window and stride.
    ceil_mode: False drops the last H % k rows and W % k columns (torch `MaxPool2d`); True
      keeps them as a partial window (padding with -inf at the end, torch `ceil_mode=True`).
    platform: see `conv_impl`.
  Returns:
    [B, H // k, W // k, C] (ceil division when `ceil_mode`).
  """
  if uses_cpu_kernels(platform):
    return reshape_max_pool(x, window, ceil_mode=ceil_mode)
  return xla_max_pool(x, window, ceil_mode=ceil_mode)


def xla_max_pool(x: jax.Array, window: int = 2, *, ceil_mode: bool = False) -> jax.Array:
  """`flax.linen.max_pool` (XLA's `reduce_window`; its gradient, `select_and_scatter`, gives
  each window's gradient to one maximum), with `max_pool`'s arguments and shapes."""
  k = int(window)
  padding = "VALID"
  if ceil_mode:  # -inf padding after the last row/column only, as torch's ceil mode
    padding = ((0, -x.shape[1] % k), (0, -x.shape[2] % k))
  return nn.max_pool(x, (k, k), strides=(k, k), padding=padding)


def reshape_max_pool(x: jax.Array, window: int = 2, *, ceil_mode: bool = False) -> jax.Array:
  """The CPU max-pool: a reshape and a max over the window axes (args as `max_pool`).

  Equals `xla_max_pool` in the forward pass, but costs an elementwise pass where XLA:CPU's
  `reduce_window` and the `select_and_scatter` of its gradient took ~30% of the small CNN's
  training step. One deliberate difference: when several inputs of a window tie for the
  maximum, the gradient is split among them (torch and `select_and_scatter` give it all to
  one). VGG-11 and DeepPrior pool after a ReLU, where ties are zeros whose ReLU gradient is 0,
  so their parameter gradients are the same; the small CNN uses `conv_pool.conv_relu_pool`,
  which gives the gradient to the first maximum as torch does.
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
    impl: "im2col" (`im2col_conv`, for CPU training passes) or "xla" (`xla_conv`); learners
      pick it with `conv_impl(platform, train=...)`. The parameters are the same for both.
  """
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: int = 0
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  impl: str = "im2col"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> [B, H', W', features]."""
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features))
    conv = im2col_conv if check_impl(self.impl) == "im2col" else xla_conv
    y = conv(x, kernel.astype(x.dtype), stride=self.stride, padding=self.padding)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,)).astype(x.dtype)
    return y
