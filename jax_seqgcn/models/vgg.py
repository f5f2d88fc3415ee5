"""VGG-11 with BatchNorm, the alternative learner (paper supp. B.4), CIFAR-sized.

    cfg 64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M
    each number: conv3x3(pad 1, with bias) + BN + ReLU;  M: 2x2 max-pool, stride 2
    global average pool -> embedding [B, 512] -> Dense head -> logits [B, num_classes]

Spatial sizes: 32x32 input -> 16, 8, 4, 2, 1 after the five pools. For 28x28 input the pools use
"SAME" padding (= torch `ceil_mode=True`; padded cells are -inf, so never chosen), giving
14, 7, 4, 2, 1 instead of flooring 7 -> 3 -> 1 -> 0. On even sizes SAME and VALID pooling agree, so
CIFAR results are those of the usual floor-mode VGG. The embedding is the mean over the remaining
spatial positions (1x1 for both input sizes), so other sizes work too.

Trainable parameters for 10 classes, RGB: 9,231,114 (convs 9,220,480, BN 5,504, head 5,130);
1-channel stem: 9,229,962.

Differences from the reference repository's `vgg11()`, which follow docs/protocol.md on purpose: the
reference has no BatchNorm, a dropout MLP head (512-512-512-10) and normal(0, sqrt(2/fan_out))
conv init; here BN is used, the head is one Dense layer, there is no dropout, and all kernels use
torch's default init.

Kernels by `platform` (`jax_seqgcn.models.conv`): on CPU im2col convolutions in training passes,
the closed-form-gradient BatchNorm and the reshape max-pool; on GPUs and TPUs XLA's
convolution, Flax's BatchNorm and Flax's `reduce_window` max-pool.
"""

from __future__ import annotations

from typing import Optional, Sequence

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

from jax_seqgcn.models.conv import conv_impl, max_pool
from jax_seqgcn.models.layers import batch_norm
from jax_seqgcn.models.layers import check_image_size, relu, torch_conv, torch_dense

VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
  """VGG with BatchNorm from a cfg of channel counts and "M" (max-pool) markers; default VGG-11.

  Attributes:
    num_classes: width of the logits.
    cfg: layer configuration (default `VGG11_CFG`); must contain at least 4 "M" entries.
    in_channels: if set, the input's channel count is checked against it.
    platform: the platform whose kernels it uses: "cpu", "gpu", "cuda", "rocm", "tpu", or None
      (unbound: `training.fit`/`inference` bind their mesh's; applied directly, CPU's). See
      `jax_seqgcn.models.conv`; the variables do not depend on it.
    dropout_rate: dropout before the head only (0: none, the default). Active in training
      and in MC-dropout passes (BALD; `training.mc_dropout_probabilities`); the embedding is
      taken before it.
  """
  num_classes: int = 10
  cfg: Sequence[int | str] = VGG11_CFG
  in_channels: int | None = None
  platform: Optional[str] = None
  dropout_rate: float = 0.0

  @property
  def min_image_size(self) -> int:
    """Smallest height and width: "SAME" (ceil-mode) max-pools keep >= 1 pixel of any input."""
    return 1

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool):
    """Forward pass.

    Args:
      x: [B, H, W, C] float32, already normalised (32x32x3 or 28x28x1).
      train: BatchNorm mode; with train=True apply with `mutable=['batch_stats']`.
    Returns:
      (logits [B, num_classes], embedding [B, 512], stage_features) where stage_features are the
      outputs of the first four max-pools: for 32x32 input [B, 16, 16, 64], [B, 8, 8, 128],
      [B, 4, 4, 256], [B, 2, 2, 512] (for 28x28: 14, 7, 4, 2).
    """
    chex.assert_rank(x, 4)
    if self.in_channels is not None:
      chex.assert_axis_dimension(x, 3, self.in_channels)
    check_image_size(x.shape, self.min_image_size, type(self).__name__)
    pooled = []
    conv_index = 0
    for layer in self.cfg:
      if layer == "M":
        x = max_pool(x, 2, ceil_mode=True, platform=self.platform)  # a partial last window
        pooled.append(x)
      else:
        conv_index += 1
        x = torch_conv(int(layer), x.shape[-1], 3, padding=1, name=f"conv{conv_index}",
                       impl=conv_impl(self.platform, train=train))(x)
        x = relu(batch_norm(train, f"bn{conv_index}", platform=self.platform)(x))
    embedding = jnp.mean(x, axis=(1, 2))
    head_input = embedding
    if self.dropout_rate:
      head_input = nn.Dropout(self.dropout_rate, deterministic=not train)(embedding)
    logits = torch_dense(self.num_classes, embedding.shape[-1], name="head")(head_input)
    return logits, embedding, tuple(pooled[:4])


class VGG11(VGG):
  """VGG-11 with BatchNorm: `VGG` with its default cfg `VGG11_CFG`."""
