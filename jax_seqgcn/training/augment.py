"""On-device input preprocessing: random crop + flip augmentation, scaling, normalisation.

Everything here is a pure function of a PRNG key and a batch of raw images, meant to run
inside `jax.jit` (the training epoch in `training/fit.py` calls it once per step), so the
labelled images can stay on device as uint8 and never round-trip through the host.

Per dataset (protocol §2):
  * CIFAR-10 / CIFAR-100: random crop 32 from the image zero-padded by 4 pixels on each
    side and a random horizontal flip (training only), then pixels / 255 and
    `(x - mean) / std` with CIFAR-10's statistics (the reference uses them for CIFAR-100
    too).
  * SVHN, Fashion-MNIST, own npz data, own image folders ("folder"): pixels / 255, no
    augmentation, no normalisation.

Scaling follows torchvision's `ToTensor`: integer images are divided by 255, floating
images are used as they are (so npz data already in [0, 1] or normalised depth crops pass
through unchanged) unless `scale` is given explicitly.
"""

import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


class PreprocessSpec(NamedTuple):
  """Static (hashable) description of a dataset's input pipeline.

  Attributes:
    augment: whether training batches get a random padded crop + horizontal flip.
    mean: per-channel mean subtracted after scaling, or None for no normalisation.
    std: per-channel std divided by after subtracting `mean` (None iff `mean` is None).
    pad: zero padding (pixels, each side) before the random crop; the crop has the
      original image size.
    scale: multiplier applied to the raw pixels; None = 1/255 for integer images and
      1.0 for floating images (torchvision `ToTensor` semantics).
  """
  augment: bool = False
  mean: Optional[tuple] = None
  std: Optional[tuple] = None
  pad: int = 4
  scale: Optional[float] = None


_CIFAR = PreprocessSpec(augment=True, mean=CIFAR10_MEAN, std=CIFAR10_STD)
_PLAIN = PreprocessSpec()

PREPROCESSING = {
    "cifar10": _CIFAR,
    "cifar100": _CIFAR,  # CIFAR-10 statistics on purpose, as the reference (protocol §2).
    "svhn_cropped": _PLAIN,
    "fashion_mnist": _PLAIN,
    "npz": _PLAIN,
    "folder": _PLAIN,  # own image files (`jax-seqgcn select --images`), like own npz data
}


def preprocessing_for(dataset_name: str) -> PreprocessSpec:
  """The `PreprocessSpec` of a dataset name (a key of `PREPROCESSING`).

  Raises:
    ValueError: for an unknown name (the message lists the known ones).
  """
  try:
    return PREPROCESSING[dataset_name]
  except KeyError:
    raise ValueError(
        f"Unknown dataset {dataset_name!r} for preprocessing; known: "
        f"{sorted(PREPROCESSING)}. Pass a PreprocessSpec for other data.") from None


def crop_flip_params(key: jax.Array, batch_size: int, *, pad: int = 4):
  """Draws per-example crop offsets and flip decisions.

  Args:
    key: PRNG key.
    batch_size: static int B.
    pad: static int, padding on each side; offsets are uniform in [0, 2 * pad]
      (torchvision `RandomCrop(size, padding=pad)`).
  Returns:
    offsets: [B, 2] int32 (row, column) of the crop's top-left corner in the padded image.
    flips: [B] bool, True = flip horizontally.
  """
  offset_key, flip_key = jax.random.split(key)
  offsets = jax.random.randint(offset_key, (batch_size, 2), 0, 2 * pad + 1, dtype=jnp.int32)
  flips = jax.random.bernoulli(flip_key, 0.5, (batch_size,))
  return offsets, flips


def crop_and_flip(images: jax.Array, offsets: jax.Array, flips: jax.Array, *,
                  pad: int = 4) -> jax.Array:
  """Deterministic padded crop + horizontal flip, per example.

  The crop is taken from the image zero-padded by `pad` pixels on each side (zeros in raw
  pixel units, as torchvision pads the PIL image before `ToTensor`); the flip is applied
  to the crop.

  Args:
    images: [B, H, W, C] images of any dtype.
    offsets: [B, 2] int (row, column) in [0, 2 * pad].
    flips: [B] bool.
    pad: static int.
  Returns:
    [B, H, W, C] array of the dtype of `images`.
  """
  _, height, width, channels = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def one(image, offset, flip):
    crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))
    return jnp.where(flip, crop[:, ::-1, :], crop)

  return jax.vmap(one)(padded, offsets, flips)


def _scale_for(dtype, scale: Optional[float]) -> float:
  if scale is not None:
    return float(scale)
  return 1.0 / 255.0 if jnp.issubdtype(dtype, jnp.integer) else 1.0


def normalise(images: jax.Array, *, mean: Optional[Sequence[float]] = None,
              std: Optional[Sequence[float]] = None,
              scale: Optional[float] = None) -> jax.Array:
  """Scales raw pixels and standardises channels.

  Args:
    images: [B, H, W, C] raw images (uint8 in [0, 255], or float).
    mean, std: per-channel statistics of the scaled images ([C] each), or None.
    scale: see `PreprocessSpec.scale`.
  Returns:
    [B, H, W, C] float32: `images * scale`, then `(x - mean) / std` if `mean` is given.
  """
  if (mean is None) != (std is None):
    raise ValueError("mean and std must be given together.")
  x = images.astype(jnp.float32) * _scale_for(images.dtype, scale)
  if mean is not None:
    if len(mean) != images.shape[-1] or len(std) != images.shape[-1]:
      raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries but images have "
                       f"{images.shape[-1]} channels.")
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return x


def preprocess(key: Optional[jax.Array], images: jax.Array, *, augment: bool,
               mean: Optional[Sequence[float]] = None,
               std: Optional[Sequence[float]] = None, pad: int = 4,
               scale: Optional[float] = None) -> jax.Array:
  """Augments (optionally) and normalises a batch; jit-friendly.

  Args:
    key: PRNG key for the per-example crops and flips (unused, may be None, when
      `augment` is False).
    images: [B, H, W, C] raw images, uint8 (or float, see `PreprocessSpec.scale`).
    augment: static bool; random padded crop + horizontal flip per example.
    mean, std: per-channel statistics ([C] each) or None.
    pad: static int, crop padding.
    scale: see `PreprocessSpec.scale`.
  Returns:
    [B, H, W, C] float32 network input.
  """
  if images.ndim != 4:
    raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}.")
  if augment:
    if key is None:
      raise ValueError("augment=True needs a PRNG key.")
    offsets, flips = crop_flip_params(key, images.shape[0], pad=pad)
    images = crop_and_flip(images, offsets, flips, pad=pad)
  return normalise(images, mean=mean, std=std, scale=scale)


def apply_spec(key: Optional[jax.Array], images: jax.Array, spec: PreprocessSpec, *,
               train: bool) -> jax.Array:
  """`preprocess` driven by a `PreprocessSpec`; augments only when `train` is True.

  Args:
    key: PRNG key (may be None when no augmentation happens).
    images: [B, H, W, C] raw images.
    spec: the dataset's `PreprocessSpec`.
    train: static bool; evaluation and feature extraction pass False.
  Returns:
    [B, H, W, C] float32.
  """
  return preprocess(key, images, augment=bool(train and spec.augment), mean=spec.mean,
                    std=spec.std, pad=spec.pad, scale=spec.scale)


def as_spec(preprocessing) -> PreprocessSpec:
  """Accepts a `PreprocessSpec`, a dataset name, or None (= plain scaling); returns a spec."""
  if preprocessing is None:
    return _PLAIN
  if isinstance(preprocessing, str):
    return preprocessing_for(preprocessing)
  if isinstance(preprocessing, PreprocessSpec):
    # Tuples keep the spec hashable: it is a static argument of the jitted functions.
    as_tuple = lambda v: None if v is None else tuple(float(x) for x in v)
    return preprocessing._replace(mean=as_tuple(preprocessing.mean),
                                  std=as_tuple(preprocessing.std))
  raise TypeError(f"preprocessing must be a PreprocessSpec, a dataset name or None, "
                  f"got {type(preprocessing).__name__}.")



@functools.partial(jax.jit, static_argnames="spec")
def _eval_preprocess(images, spec):
  return apply_spec(None, images, spec, train=False)


def preprocess_all(images, indices, preprocessing=None, *, batch_size: int = 1024) -> np.ndarray:
  """Eval-mode preprocessing (no augmentation) of `images[indices]`, on the host.

  Args:
    images: [N, H, W, C] raw images (host array).
    indices: [M] ints into `images`.
    preprocessing: `PreprocessSpec`, dataset name or None (see `as_spec`).
    batch_size: rows per jitted call (fixed shape: one compile).
  Returns:
    [M, H, W, C] float32 NumPy array.
  """
  spec = as_spec(preprocessing)
  indices = np.asarray(indices, np.int64).reshape(-1)
  out = np.empty((indices.size,) + tuple(images.shape[1:]), np.float32)
  for start in range(0, indices.size, batch_size):
    chunk = indices[start:start + batch_size]
    padded = np.concatenate([chunk, np.full(batch_size - chunk.size, chunk[0])])
    out[start:start + chunk.size] = np.asarray(_eval_preprocess(images[padded], spec))[:chunk.size]
  return out
