"""The small CNN learner of the CPU-scale Fashion-MNIST protocol (protocol §9).

Architecture (defaults, 28x28x1 input):

    conv3x3(1->32, pad 1) + ReLU + maxpool2      -> [B, 14, 14, 32]
    conv3x3(32->64, pad 1) + ReLU + maxpool2     -> [B, 7, 7, 64]
    flatten, Dense(64*7*7 -> 128) + ReLU         -> [B, 128]   (the embedding)
    Dense(128 -> num_classes)                    -> [B, num_classes]

Each conv + ReLU + maxpool stage is one `conv_pool.ConvReLUPool` (parameters named and shaped as
a `Conv2D`'s): on CPU a hand-written backward pass that gives each window's gradient to its
first maximum as torch does (small CNN training ~6% faster on our CPU); on GPUs and TPUs
(`platform`) the plain ops, with the same values.

Parameter count (28x28x1, 10 classes), all trainable, no BatchNorm:
    conv1 3*3*1*32 + 32 = 320; conv2 3*3*32*64 + 64 = 18,496;
    fc1 3136*128 + 128 = 401,536; fc2 128*10 + 10 = 1,290;  total 421,642.
Compute per 28x28x1 image: 4,241,152 multiply-adds (conv1 225,792; conv2 3,612,672;
fc1 401,408; fc2 1,280), i.e. ~8.5 MFLOPs counting a multiply-add as 2 FLOPs (bias, ReLU and
pooling add ~0.1 MFLOP). XLA's cost analysis of the jitted forward pass reports 7.89 MFLOPs because
it does not count the taps that fall on the zero padding (3,894,656 multiply-adds on real pixels).

Initialisation as PyTorch's defaults (`layers`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import chex
import jax
from flax import linen as nn

from jax_seqgcn.models.conv_pool import ConvReLUPool
from jax_seqgcn.models.layers import check_image_size, relu, torch_bias_init, torch_dense
from jax_seqgcn.models.layers import torch_kernel_init


def torch_conv_relu_pool(features: int, in_channels: int, kernel_size: int = 3, *,
                         padding: int = 1, window: int = 2, name: str | None = None,
                         platform: Optional[str] = None) -> ConvReLUPool:
  """`maxpool(relu(torch_conv(...)))` as one `ConvReLUPool` (call inside a compact method).

  Args:
    features: output channels.
    in_channels: input channels (for the bias bound, fan_in = in_channels * k * k).
    kernel_size: square kernel size k (stride 1).
    padding: symmetric zero padding in pixels.
    window: max-pool window and stride; odd sizes are floored, as torch `MaxPool2d`.
    name: optional submodule name.
    platform: the kernels' platform, see `ConvReLUPool`.
  Returns:
    A `ConvReLUPool` with PyTorch's Conv2d initialisation; applied to [B, H, W, in_channels]
    (and `train=`) it gives (activation [B, H', W', features], pooled [B, H' // window,
    W' // window, features]).
  """
  return ConvReLUPool(features, kernel_size, padding=padding, window=window,
                      kernel_init=torch_kernel_init,
                      bias_init=torch_bias_init(in_channels * kernel_size * kernel_size),
                      platform=platform, name=name)


class SmallCNN(nn.Module):
  """Two conv+pool stages and a 128-d hidden layer (protocol §9 "small CNN"); no BatchNorm.

  Attributes:
    num_classes: width of the logits.
    conv_features: output channels of the two conv stages (default (32, 64)).
    hidden: width of the hidden Dense layer = embedding dimension D (default 128).
    in_channels: if set, the input's channel count is checked against it.
    platform: the platform whose kernels it uses: "cpu", "gpu", "cuda", "rocm", "tpu", or None
      (unbound: `training.fit`/`inference` bind their mesh's; applied directly, CPU's). See
      `jax_seqgcn.models.conv`; the parameters do not depend on it.
    dropout_rate: dropout before the head only (0: none, the default). Active in training
      and in MC-dropout passes (BALD; `training.mc_dropout_probabilities`); the embedding is
      taken before it.
  """
  num_classes: int = 10
  conv_features: Sequence[int] = (32, 64)
  hidden: int = 128
  in_channels: int | None = None
  platform: Optional[str] = None
  dropout_rate: float = 0.0

  @property
  def min_image_size(self) -> int:
    """Smallest height and width: the two 2x2 max-pools must leave at least one pixel."""
    return 4

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False):
    """Forward pass.

    Args:
      x: [B, H, W, C] float32 images (28x28x1 for Fashion-MNIST; any size works).
      train: training or evaluation pass; the network has no train-time behaviour, only the CPU
        convolution kernel depends on it (`conv.conv_impl`).
    Returns:
      (logits [B, num_classes], embedding [B, hidden], stage_features) where stage_features is
      (conv1 after ReLU [B, H, W, c1], after pool1 [B, H/2, W/2, c1],
       conv2 after ReLU [B, H/2, W/2, c2], after pool2 [B, H/4, W/4, c2]).
    """
    chex.assert_rank(x, 4)
    if self.in_channels is not None:
      chex.assert_axis_dimension(x, 3, self.in_channels)
    check_image_size(x.shape, self.min_image_size, type(self).__name__)
    c1, c2 = self.conv_features
    conv1, pool1 = torch_conv_relu_pool(c1, x.shape[-1], name="conv1",
                                        platform=self.platform)(x, train=train)
    conv2, pool2 = torch_conv_relu_pool(c2, c1, name="conv2", platform=self.platform)(
        pool1, train=train)
    flat = pool2.reshape(pool2.shape[0], -1)
    embedding = relu(torch_dense(self.hidden, flat.shape[-1], name="fc1")(flat))
    head_input = embedding
    if self.dropout_rate:
      head_input = nn.Dropout(self.dropout_rate, deterministic=not train)(embedding)
    logits = torch_dense(self.num_classes, self.hidden, name="head")(head_input)
    return logits, embedding, (conv1, pool1, conv2, pool2)
