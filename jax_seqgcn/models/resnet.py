"""ResNet-18, CIFAR variant (protocol §2), matching the PyTorch reference layer for layer.

    stem   conv3x3(C->64, stride 1, pad 1, no bias) + BN + ReLU        (no max-pool)
    stage1 2 x BasicBlock(64,  stride 1)                               -> [B, 32, 32, 64]
    stage2 2 x BasicBlock(128, first stride 2)                         -> [B, 16, 16, 128]
    stage3 2 x BasicBlock(256, first stride 2)                         -> [B,  8,  8, 256]
    stage4 2 x BasicBlock(512, first stride 2)                         -> [B,  4,  4, 512]
    global average pool -> embedding [B, 512] -> Dense head -> logits [B, num_classes]

Spatial sizes are for 32x32 input; 28x28 input (Fashion-MNIST, 1-channel stem) gives 28, 14, 7, 4.
The reference pools with `avg_pool2d(out, 4)`, which on the 4x4 final map of either input size is a
global average; we take the mean over whatever spatial size remains, so other sizes work too.

Convolutions have no bias and use explicit 1-pixel padding like torch (Flax "SAME" would pad an even
input asymmetrically under stride 2). Projection shortcuts (1x1 conv, no bias, + BN) are used when
the stride is not 1 or the channel count changes. Trainable parameters for 10 classes: 11,173,962
with an RGB stem (identical to the PyTorch reference), 11,172,810 with a 1-channel stem; running
BatchNorm statistics (in 'batch_stats') are not counted.

BatchNorm follows torch defaults (momentum 0.1 in torch = 0.9 here, eps 1e-5). One small difference
remains: Flax updates the running variance with the biased batch variance, torch with the unbiased
one (a factor n/(n-1), n = batch * height * width).

Kernels by `platform` (`jax_seqgcn.models.conv`): on CPU im2col convolutions in training passes
and the closed-form-gradient BatchNorm; on GPUs and TPUs XLA's convolution and Flax's BatchNorm.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

from jax_seqgcn.models import conv as conv_lib
from jax_seqgcn.models.layers import batch_norm, check_image_size, relu, torch_conv, torch_dense


def _layers(platform: Optional[str], train: bool):
  """(conv, bn): `torch_conv` and `batch_norm` with the kernels of `platform` for this pass."""
  return (functools.partial(torch_conv, impl=conv_lib.conv_impl(platform, train=train)),
          functools.partial(batch_norm, train, platform=platform))


class BasicBlock(nn.Module):
  """ResNet basic block: two 3x3 conv+BN with a residual connection.

  Attributes:
    features: output channels.
    stride: stride of the first convolution (and of the projection shortcut).
    platform: the kernels' platform, as `ResNet`'s.
  """
  features: int
  stride: int = 1
  platform: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Applies the block.

    Args:
      x: [B, H, W, C_in] float32.
      train: BatchNorm mode.
    Returns:
      [B, ceil(H / stride), ceil(W / stride), features].
    """
    conv, bn = _layers(self.platform, train)
    in_channels = x.shape[-1]
    out = conv(self.features, in_channels, 3, stride=self.stride, padding=1, use_bias=False,
               name="conv1")(x)
    out = relu(bn("bn1")(out))
    out = conv(self.features, self.features, 3, padding=1, use_bias=False, name="conv2")(out)
    out = bn("bn2")(out)
    shortcut = x
    if self.stride != 1 or in_channels != self.features:
      shortcut = conv(self.features, in_channels, 1, stride=self.stride, padding=0,
                      use_bias=False, name="shortcut_conv")(x)
      shortcut = bn("shortcut_bn")(shortcut)
    return relu(out + shortcut)


class ResNet(nn.Module):
  """CIFAR-style ResNet built from `BasicBlock`s (defaults: ResNet-18).

  Attributes:
    num_classes: width of the logits.
    stage_sizes: blocks per stage (default (2, 2, 2, 2)).
    stage_features: channels per stage (default (64, 128, 256, 512)); the stem has
      stage_features[0] channels and the embedding stage_features[-1] dimensions.
    in_channels: if set, the input's channel count is checked against it (3 for RGB, 1 for
      Fashion-MNIST); the stem itself adapts to the input.
    platform: the platform whose kernels it uses: "cpu", "gpu", "cuda", "rocm", "tpu", or None
      (unbound: `training.fit`/`inference` bind their mesh's; applied directly, CPU's). See
      `jax_seqgcn.models.conv`; the variables do not depend on it.
    dropout_rate: dropout before the head only (0: none, the default). Active in training
      and in MC-dropout passes (BALD; `training.mc_dropout_probabilities`); the embedding is
      taken before it.
  """
  num_classes: int = 10
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  stage_features: Sequence[int] = (64, 128, 256, 512)
  in_channels: int | None = None
  platform: Optional[str] = None
  dropout_rate: float = 0.0

  @property
  def min_image_size(self) -> int:
    """Smallest height and width: padded stride-2 convolutions keep >= 1 pixel of any input."""
    return 1

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool):
    """Forward pass.

    Args:
      x: [B, H, W, C] float32, already normalised (32x32x3 or 28x28x1 in the paper's datasets).
      train: BatchNorm mode; with train=True apply with `mutable=['batch_stats']`.
    Returns:
      (logits [B, num_classes], embedding [B, 512], stage_features) where stage_features holds
      the output of each of the 4 stages: [B, H, W, 64], [B, H/2, W/2, 128], [B, H/4, W/4, 256],
      [B, H/8, W/8, 512] (sizes rounded up).
    """
    chex.assert_rank(x, 4)
    if self.in_channels is not None:
      chex.assert_axis_dimension(x, 3, self.in_channels)
    check_image_size(x.shape, self.min_image_size, type(self).__name__)
    conv, bn = _layers(self.platform, train)
    out = conv(self.stage_features[0], x.shape[-1], 3, padding=1, use_bias=False,
               name="stem_conv")(x)
    out = relu(bn("stem_bn")(out))
    stage_outputs = []
    for stage, (num_blocks, features) in enumerate(zip(self.stage_sizes, self.stage_features)):
      for block in range(num_blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        out = BasicBlock(features, stride, platform=self.platform,
                         name=f"stage{stage + 1}_block{block + 1}")(out, train=train)
      stage_outputs.append(out)
    embedding = jnp.mean(out, axis=(1, 2))
    head_input = embedding
    if self.dropout_rate:
      head_input = nn.Dropout(self.dropout_rate, deterministic=not train)(embedding)
    logits = torch_dense(self.num_classes, embedding.shape[-1], name="head")(head_input)
    return logits, embedding, tuple(stage_outputs)


class ResNet18(ResNet):
  """ResNet-18, CIFAR variant: `ResNet` with its defaults, stages [2, 2, 2, 2] of 64/128/256/512."""
