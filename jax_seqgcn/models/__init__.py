"""Learner networks (Flax linen) and a name -> module registry.

Every learner is called as `module.apply(variables, x, train=...)` with x [B, H, W, C] float32 NHWC
and returns `(outputs, embedding, stage_features)`: outputs [B, num_classes] logits (DeepPrior:
[B, 3J] coordinates), embedding [B, D] (the features the samplers use) and a tuple of exactly 4
NHWC feature maps (for Learning Loss). BatchNorm nets keep statistics in 'batch_stats' (apply with
`mutable=['batch_stats']` when train=True); `small_cnn` has none. No learner uses dropout.

Each learner has a smallest image size (`min_image_size`: small_cnn 4, deepprior 32, resnet18 and
vgg11 1). `check_input_shape(name, image_shape)`, or `get_learner(..., image_shape=...)`, checks a
dataset's [H, W, C] against it before any training; the modules also check it when applied.

Kernels per platform. Every learner has a `platform` attribute, the platform of the devices it
runs on, which picks its kernels (`jax_seqgcn.models.conv`):
  * "cpu": kernels written for XLA:CPU — im2col convolutions in training passes (fast inside
    the epoch's loop), the custom-gradient conv+ReLU+pool block (`conv_pool`), the reshape
    max-pool and the closed-form-gradient BatchNorm (`batchnorm`);
  * "gpu", "cuda", "rocm", "tpu" (any other platform): plain Flax/XLA — `lax.conv_general_dilated`,
    `flax.linen.max_pool`, `flax.linen.BatchNorm`, autodiff gradients, no custom derivative rules.
The default None means "not bound yet": `training.fit`, `make_train_step` and the
`training.inference` passes bind the platform of their mesh's devices (`bind_platform`) before
they trace the learner, so it is part of their jit cache keys; a learner applied directly with
None uses the CPU kernels. An explicit `platform` (e.g. `get_learner(..., platform="gpu")`) is
kept as given, on any devices. Variables are named and shaped the same on every platform, and
values agree to float rounding, so checkpoints move between platforms.
"""

from __future__ import annotations

from typing import Optional, Sequence

from flax import linen as nn

from jax_seqgcn.models import conv
from jax_seqgcn.models.deepprior import DeepPrior
from jax_seqgcn.models.resnet import BasicBlock, ResNet, ResNet18
from jax_seqgcn.models.layers import check_image_size, torch_bias_init, torch_kernel_init
from jax_seqgcn.models.small_cnn import SmallCNN
from jax_seqgcn.models.vgg import VGG, VGG11

LEARNERS: dict[str, type[nn.Module]] = {
    "resnet18": ResNet18,
    "vgg11": VGG11,
    "deepprior": DeepPrior,
    "small_cnn": SmallCNN,
}


def _check_name(name: str) -> None:
  if name not in LEARNERS:
    raise ValueError(f"Unknown learner {name!r}; valid names: {sorted(LEARNERS)}")


def min_image_size(name: str, **kwargs) -> int:
  """Smallest image height and width the learner `name` takes (small_cnn 4, deepprior 32).

  Args:
    name: one of `LEARNERS`.
    **kwargs: module attributes that change the architecture (e.g. `stages` for deepprior).
  Returns:
    The minimum size in pixels; resnet18 and vgg11 take any non-empty image (1).
  """
  _check_name(name)
  return LEARNERS[name](**kwargs).min_image_size


def check_input_shape(name: str, image_shape: Sequence[int], **kwargs) -> None:
  """Checks that [H, W, C] images fit the learner `name`, before any data reaches it.

  Call it once the dataset is known and before building or training the learner: a too small
  image otherwise fails deep inside Flax (ZeroDivisionError) when the learner is first run.

  Args:
    name: one of `LEARNERS`.
    image_shape: [H, W, C] of one image (e.g. `dataset.train_images.shape[1:]`).
    **kwargs: module attributes that change the architecture (e.g. `stages` for deepprior).
  Raises:
    ValueError: unknown name, a shape that is not [H, W, C] with C >= 1, or images smaller than
      the learner's minimum; the message names the learner and the minimum size.
  """
  image_shape = tuple(image_shape)
  if len(image_shape) != 3:
    raise ValueError(f"learner {name!r} takes images of shape [H, W, C]; got {image_shape}")
  if image_shape[-1] < 1:
    raise ValueError(f"learner {name!r} needs at least one channel; got shape {image_shape}")
  check_image_size(image_shape, min_image_size(name, **kwargs), name)


def get_learner(name: str, *, num_classes: int, channels: int = 3,
                image_shape: Sequence[int] | None = None, platform: Optional[str] = None,
                **kwargs) -> nn.Module:
  """Builds a learner from `LEARNERS` by name.

  Args:
    name: one of `LEARNERS` ("resnet18", "vgg11", "deepprior", "small_cnn").
    num_classes: output width. For "deepprior" this is 3 * J (e.g. 48 for ICVL's 16 joints) and
      must be divisible by 3.
    channels: input channels C of x [B, H, W, C]; checked at call time.
    image_shape: optional [H, W, C] of the images; if given, checked now with
      `check_input_shape` (and C against `channels`) instead of failing when first applied.
    platform: the platform whose kernels it uses ("cpu", "gpu", "cuda", "rocm", "tpu"); None
      (default) lets `training.fit`/`inference` bind their mesh's (see the module docstring).
    **kwargs: further module attributes (e.g. `conv_features=(16, 32)` for small_cnn).
  Returns:
    An unbound `nn.Module` following the common learner interface.
  Raises:
    ValueError: unknown name, a deepprior output width not divisible by 3, or (with
      `image_shape`) images the learner cannot take.
  """
  _check_name(name)
  conv.check_platform(platform)
  if image_shape is not None:
    check_input_shape(name, image_shape, **kwargs)
    if image_shape[-1] != channels:
      raise ValueError(f"learner {name!r} built for {channels} channels, but the images have "
                       f"shape {tuple(image_shape)}")
  if name == "deepprior":
    if num_classes % 3:
      raise ValueError(f"deepprior outputs 3 coordinates per joint; num_classes={num_classes} "
                       "is not divisible by 3")
    return DeepPrior(num_joints=num_classes // 3, in_channels=channels, platform=platform,
                     **kwargs)
  return LEARNERS[name](num_classes=num_classes, in_channels=channels, platform=platform,
                        **kwargs)


def bind_platform(model: nn.Module, platform: str) -> nn.Module:
  """The learner with its kernels bound to `platform`, if they are not bound yet.

  Args:
    model: a learner (any unbound Flax module).
    platform: the platform of the devices the learner will run on, e.g.
      `mesh.devices.flat[0].platform` ("cpu", "gpu", "tpu").
  Returns:
    `model.clone(platform=platform)` when `model.platform` is None; otherwise `model` itself
    (an explicit platform is kept, and a module without a `platform` attribute is left alone).
  """
  if getattr(model, "platform", "") is None:
    return model.clone(platform=conv.check_platform(platform))
  return model


__all__ = [
    "BasicBlock",
    "DeepPrior",
    "LEARNERS",
    "ResNet",
    "ResNet18",
    "SmallCNN",
    "VGG",
    "VGG11",
    "bind_platform",
    "check_input_shape",
    "get_learner",
    "min_image_size",
    "torch_bias_init",
    "torch_kernel_init",
]
