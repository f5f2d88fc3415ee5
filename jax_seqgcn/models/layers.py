"""Layers shared by the learners: PyTorch-default initialisers, torch-style Conv/Dense, BatchNorm.

The initialisers make CPU-scale results comparable with the reference PyTorch runs:
  * kernels: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)) = `torch_kernel_init`;
  * biases: U(+-1/sqrt(fan_in)) = `torch_bias_init(fan_in)`.
`batch_norm` is BatchNorm with torch's defaults, and `check_image_size` the one-line error every
learner gives for images too small for its pooling.

`torch_conv`, `batch_norm` and `conv.max_pool` take the learner's `platform` (see
`jax_seqgcn.models.conv`): the XLA:CPU kernels on "cpu" (or None), plain Flax/XLA on GPUs and
TPUs, with the same parameters.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from jax_seqgcn.models import conv
from jax_seqgcn.models.batchnorm import BatchNorm
from jax_seqgcn.models.batchnorm import flax_batch_norm
from jax_seqgcn.models.conv import Conv2D
from jax_seqgcn.models.conv import relu  # noqa: F401  (re-exported: plain-op ReLU)

# torch.nn.init.kaiming_uniform_(w, a=sqrt(5)): bound = sqrt(6 / ((1 + 5) * fan_in)) = sqrt(1/fan_in),
# which is variance_scaling's uniform limit sqrt(3 * scale / fan_in) with scale = 1/3.
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> jax.nn.initializers.Initializer:
  """PyTorch's default bias initialiser for Conv/Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  Args:
    fan_in: number of inputs of one output unit (in_features, or in_channels * kh * kw).
  Returns:
    An initializer `(key, shape, dtype) -> array` (shape is the bias shape, e.g. [features]).
  """
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

  return init


def torch_conv(features: int, in_channels: int, kernel_size: int = 3, *, stride: int = 1,
               padding: int = 1, use_bias: bool = True, name: str | None = None,
               impl: str = "im2col") -> Conv2D:
  """An `nn.Conv` with PyTorch's Conv2d default initialisation (call inside a compact method).

  Args:
    features: output channels.
    in_channels: input channels (needed for the bias bound, fan_in = in_channels * k * k).
    kernel_size: square kernel size k.
    stride: spatial stride.
    padding: symmetric zero padding in pixels (torch semantics).
    use_bias: whether the convolution has a bias.
    name: optional submodule name.
    impl: "im2col" or "xla", see `jax_seqgcn.models.conv`; learners pass
      `conv.conv_impl(platform, train=train)` (im2col for CPU training passes, where XLA's
      convolution is slow inside loops; XLA's own otherwise).
  Returns:
    A `Conv2D` (parameters `kernel`, `bias` as `nn.Conv`); applied to [B, H, W, in_channels]
    it gives [B, H', W', features].
  """
  return Conv2D(features, kernel_size, stride=stride, padding=padding, use_bias=use_bias,
                kernel_init=torch_kernel_init,
                bias_init=torch_bias_init(in_channels * kernel_size * kernel_size), impl=impl,
                name=name)


def torch_dense(features: int, in_features: int, *, name: str | None = None) -> nn.Dense:
  """An `nn.Dense` with PyTorch's nn.Linear default initialisation (call inside a compact method).

  Args:
    features: output width.
    in_features: input width (for the bias bound).
    name: optional submodule name.
  Returns:
    The `nn.Dense` module mapping [B, in_features] -> [B, features].
  """
  return nn.Dense(features, kernel_init=torch_kernel_init, bias_init=torch_bias_init(in_features),
                  name=name)


def check_image_size(image_shape: Sequence[int], min_size: int, learner: str) -> None:
  """Raises a ValueError naming `learner` if images are smaller than min_size x min_size.

  Without this check a too small input reaches a layer with no inputs and Flax fails deep inside
  the initialiser (ZeroDivisionError).

  Args:
    image_shape: [..., H, W, C], e.g. a batch shape [B, H, W, C] or one image [H, W, C].
    min_size: smallest height and width the learner takes.
    learner: the learner's name, for the message.
  """
  height, width = image_shape[-3], image_shape[-2]
  if min(height, width) < min_size:
    why = "its pooling would leave no pixel" if min_size > 1 else "images must not be empty"
    raise ValueError(f"learner {learner!r} needs images of at least {min_size}x{min_size} "
                     f"pixels ({why}); got {height}x{width}")


def batch_norm(train: bool, name: str | None = None, *,
               platform: Optional[str] = None) -> Callable[[jax.Array], jax.Array]:
  """BatchNorm with PyTorch's defaults (momentum 0.1 -> Flax 0.9, eps 1e-5), scale 1, bias 0.

  On CPU (`platform` "cpu" or None) `jax_seqgcn.models.batchnorm.BatchNorm`: Flax's layer (same
  variables and values) with a closed-form gradient; on GPUs and TPUs `flax.linen.BatchNorm`
  itself (`batchnorm.flax_batch_norm`). Both keep a bfloat16 input's dtype (mixed precision).

  Args:
    train: if True normalise with batch statistics and update 'batch_stats'; else use the running
      averages.
    name: optional submodule name.
    platform: see `jax_seqgcn.models.conv`.
  Returns:
    A layer over the last axis ([..., C] -> [..., C]) to call once inside a compact method; its
    variables are `params` scale, bias and `batch_stats` mean, var ([C] float32) either way.
  """
  if conv.uses_cpu_kernels(platform):
    return BatchNorm(use_running_average=not train, name=name)
  return lambda x: flax_batch_norm(x, use_running_average=not train, name=name)
