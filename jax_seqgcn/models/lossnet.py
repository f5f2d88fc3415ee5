"""LossNet: the loss-prediction module of Learning Loss (Yoo & Kweon 2019).

It reads the learner's 4 stage outputs (the third element of every learner's output) and
predicts one scalar per example, trained to rank examples by their true task loss:

    for each stage k:  global average pool [B, H_k, W_k, C_k] -> [B, C_k]
                       Dense(C_k -> hidden) + ReLU                -> [B, hidden]
    concat the 4 results                                          -> [B, 4 * hidden]
    Dense(4 * hidden -> 1)                                        -> [B]   (predicted loss)

The reference (`models/query_models.py`, `LossNet`) pools with `AvgPool2d(feature_size)`, i.e. a
global average over the whole map, and uses hidden = 128. Pooling over whatever spatial size
arrives makes one module fit every learner: ResNet-18 (64, 128, 256, 512 channels), the small
CNN (32, 32, 64, 64), VGG-11, DeepPrior. The channel counts come from the inputs at `init`.
All Dense layers use PyTorch's nn.Linear default initialisation, as the reference.

Parameters (hidden 128): ResNet-18 stages 123,905; small CNN stages 25,601.
"""

from __future__ import annotations

from typing import Sequence

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

from jax_seqgcn.models.layers import torch_dense


class LossNet(nn.Module):
  """Predicted loss from a learner's stage features.

  Attributes:
    hidden: width of each stage's Dense layer (the reference's `interm_dim`, 128).
  """
  hidden: int = 128

  @nn.compact
  def __call__(self, stage_features: Sequence[jax.Array]) -> jax.Array:
    """Forward pass.

    Args:
      stage_features: a sequence of [B, H, W, C_k] feature maps (NHWC; any H, W, C_k per
        stage) or already pooled [B, C_k] arrays.
    Returns:
      [B] float32 predicted losses.
    """
    if not stage_features:
      raise ValueError("LossNet needs at least one stage feature map.")
    batch = stage_features[0].shape[0]
    pooled = []
    for k, features in enumerate(stage_features):
      chex.assert_axis_dimension(features, 0, batch)
      features = features.astype(jnp.float32)
      if features.ndim > 2:
        features = jnp.mean(features, axis=tuple(range(1, features.ndim - 1)))
      channels = features.shape[-1]
      pooled.append(nn.relu(torch_dense(self.hidden, channels, name=f"stage{k}")(features)))
    joined = jnp.concatenate(pooled, axis=-1)
    return torch_dense(1, joined.shape[-1], name="head")(joined)[:, 0]

