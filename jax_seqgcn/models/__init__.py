"""Learner networks (Flax linen) and a name -> module registry.

Every learner is called as `module.apply(variables, x, train=...)` with x [B, H, W, C] float32 NHWC
and returns `(outputs, embedding, stage_features)`: outputs [B, num_classes] logits (DeepPrior:
[B, 3J] coordinates), embedding [B, D] (the features the samplers use) and a tuple of exactly 4
NHWC feature maps (for Learning Loss). BatchNorm nets keep statistics in 'batch_stats' (apply with
`mutable=['batch_stats']` when train=True); `small_cnn` has none. No learner uses dropout.
"""

from __future__ import annotations

from flax import linen as nn

from jax_seqgcn.models.deepprior import DeepPrior
from jax_seqgcn.models.resnet import BasicBlock, ResNet, ResNet18
from jax_seqgcn.models.small_cnn import SmallCNN, torch_bias_init, torch_kernel_init
from jax_seqgcn.models.vgg import VGG, VGG11

LEARNERS: dict[str, type[nn.Module]] = {
    "resnet18": ResNet18,
    "vgg11": VGG11,
    "deepprior": DeepPrior,
    "small_cnn": SmallCNN,
}


def get_learner(name: str, *, num_classes: int, channels: int = 3, **kwargs) -> nn.Module:
  """Builds a learner from `LEARNERS` by name.

  Args:
    name: one of `LEARNERS` ("resnet18", "vgg11", "deepprior", "small_cnn").
    num_classes: output width. For "deepprior" this is 3 * J (e.g. 48 for ICVL's 16 joints) and
      must be divisible by 3.
    channels: input channels C of x [B, H, W, C]; checked at call time.
    **kwargs: further module attributes (e.g. `conv_features=(16, 32)` for small_cnn).
  Returns:
    An unbound `nn.Module` following the common learner interface.
  Raises:
    ValueError: unknown name, or a deepprior output width not divisible by 3.
  """
  if name not in LEARNERS:
    raise ValueError(f"Unknown learner {name!r}; valid names: {sorted(LEARNERS)}")
  if name == "deepprior":
    if num_classes % 3:
      raise ValueError(f"deepprior outputs 3 coordinates per joint; num_classes={num_classes} "
                       "is not divisible by 3")
    return DeepPrior(num_joints=num_classes // 3, in_channels=channels, **kwargs)
  return LEARNERS[name](num_classes=num_classes, in_channels=channels, **kwargs)


__all__ = [
    "BasicBlock",
    "DeepPrior",
    "LEARNERS",
    "ResNet",
    "ResNet18",
    "SmallCNN",
    "VGG",
    "VGG11",
    "get_learner",
    "torch_bias_init",
    "torch_kernel_init",
]
