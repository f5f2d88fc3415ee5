"""DeepPrior-style regression CNN for 3D hand pose (Oberweger et al., 2015), the paper's ICVL learner.

Input is a 128x128x1 normalised depth crop; output the J x 3 joint coordinates, flattened
joint-major as [x_0, y_0, z_0, x_1, ...] (ICVL: J = 16 -> 48 outputs); the loss (protocol §2, Eq. 2,
mean over joints of the squared error) lives in the training code.

Default architecture (sizes for 128x128 input):

    stage1 conv5x5(1->8)   + BN + ReLU + maxpool4   -> [B, 32, 32, 8]
    stage2 conv5x5(8->16)  + BN + ReLU + maxpool2   -> [B, 16, 16, 16]
    stage3 conv3x3(16->32) + BN + ReLU + maxpool2   -> [B,  8,  8, 32]
    stage4 conv3x3(32->64) + BN + ReLU + maxpool2   -> [B,  4,  4, 64]
    flatten (1024) -> Dense 1024 + ReLU -> Dense 1024 + ReLU = embedding [B, 1024]
    Dense(1024 -> 3J) -> joint coordinates [B, 3J]

It keeps DeepPrior's shape (small 5x5/3x3 conv stack with an early 4x pool, two 1024-wide FC
layers, linear output) but departs from the 2015 net in three documented ways: four conv stages
instead of three so that `stage_features` has the 4 entries the common interface needs; BatchNorm
after each conv (as in DeepPrior++), so convs have no bias; and no PCA "prior" bottleneck or
dropout, the final layer regresses the coordinates directly. Trainable parameters for J = 16:
2,175,080 (about 11 M multiply-adds per image).

Kernels by `platform` (`jax_seqgcn.models.conv`): on CPU im2col convolutions in training passes,
the closed-form-gradient BatchNorm and the reshape max-pool; on GPUs and TPUs XLA's
convolution, Flax's BatchNorm and Flax's `reduce_window` max-pool.
"""

from __future__ import annotations

from typing import Optional, Sequence

import chex
import jax
from flax import linen as nn

from jax_seqgcn.models.conv import conv_impl, max_pool
from jax_seqgcn.models.layers import batch_norm
from jax_seqgcn.models.layers import check_image_size, relu, torch_conv, torch_dense

# (kernel size, output channels, max-pool window) per conv stage.
DEEPPRIOR_STAGES: tuple[tuple[int, int, int], ...] = ((5, 8, 4), (5, 16, 2), (3, 32, 2), (3, 64, 2))


class DeepPrior(nn.Module):
  """DeepPrior-style hand pose regressor: 4 conv+BN+pool stages, 2 FC layers, linear output.

  Attributes:
    num_joints: J; the network outputs 3 * J values (default 16, ICVL).
    stages: exactly 4 (kernel, channels, pool) triples (default `DEEPPRIOR_STAGES`).
    hidden: widths of the hidden FC layers; the last is the embedding dimension (default 1024).
    in_channels: if set, the input's channel count is checked against it (1 for depth).
    platform: the platform whose kernels it uses: "cpu", "gpu", "cuda", "rocm", "tpu", or None
      (unbound: `training.fit`/`inference` bind their mesh's; applied directly, CPU's). See
      `jax_seqgcn.models.conv`; the variables do not depend on it.
  """
  num_joints: int = 16
  stages: Sequence[tuple[int, int, int]] = DEEPPRIOR_STAGES
  hidden: Sequence[int] = (1024, 1024)
  in_channels: int | None = None
  platform: Optional[str] = None

  @property
  def min_image_size(self) -> int:
    """Smallest height and width for which every stage keeps at least one pixel (128: 32)."""
    size = 1
    for kernel, _, pool in reversed(self.stages):
      size *= max(pool, 1)  # VALID max-pool: floor(in / pool) >= size
      size = max(1, size - (2 * (kernel // 2) - kernel + 1))  # conv: out = in + 2 (k // 2) - k + 1
    return size

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool):
    """Forward pass.

    Args:
      x: [B, 128, 128, 1] float32 normalised depth crops (other sizes work if every pool fits).
      train: BatchNorm mode; with train=True apply with `mutable=['batch_stats']`.
    Returns:
      (coordinates [B, 3 * num_joints], embedding [B, hidden[-1]], stage_features) where
      stage_features are the 4 pooled stage outputs, for 128x128 input [B, 32, 32, 8],
      [B, 16, 16, 16], [B, 8, 8, 32], [B, 4, 4, 64].
    """
    chex.assert_rank(x, 4)
    if self.in_channels is not None:
      chex.assert_axis_dimension(x, 3, self.in_channels)
    if len(self.stages) != 4:
      raise ValueError(f"DeepPrior needs exactly 4 stages, got {len(self.stages)}")
    check_image_size(x.shape, self.min_image_size, type(self).__name__)
    stage_outputs = []
    for index, (kernel, channels, pool) in enumerate(self.stages, start=1):
      x = torch_conv(channels, x.shape[-1], kernel, padding=kernel // 2, use_bias=False,
                     name=f"conv{index}", impl=conv_impl(self.platform, train=train))(x)
      x = relu(batch_norm(train, f"bn{index}", platform=self.platform)(x))
      if pool > 1:
        x = max_pool(x, pool, platform=self.platform)
      stage_outputs.append(x)
    x = x.reshape(x.shape[0], -1)
    for index, width in enumerate(self.hidden, start=1):
      x = relu(torch_dense(width, x.shape[-1], name=f"fc{index}")(x))
    coordinates = torch_dense(3 * self.num_joints, x.shape[-1], name="head")(x)
    return coordinates, x, tuple(stage_outputs)
