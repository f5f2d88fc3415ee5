"""VAAL's beta-VAE and latent discriminator (Sinha et al. 2019), as the reference builds them.

The reference's `VAE(z_dim, nc, f_filt)` takes 32x32 images (CIFAR/SVHN: z_dim 32, nc 3,
f_filt 4) or 28x28 images (Fashion-MNIST: z_dim 28, nc 1, f_filt 3); `f_filt` is the kernel of
the last encoder and first decoder convolution, chosen so that both sizes meet at 2x2 / 4x4.
Here the image side picks `f_filt` (28 -> 3, 32 -> 4) and the image channels set nc. With
`width` 1.0 and c = (128, 256, 512, 1024):

    encoder (convs without bias, each + BatchNorm + ReLU):
      conv4x4/2 pad 1 (nc -> c1)         [B, 28|32, .., nc] -> [B, 14|16, .., c1]
      conv4x4/2 pad 1 (c1 -> c2)         -> [B, 7|8, .., c2]
      conv4x4/2 pad 1 (c2 -> c3)         -> [B, 3|4, .., c3]
      conv f x f/2 pad 1 (c3 -> c4)      -> [B, 2, 2, c4] -> flatten [B, 4 c4]
    fc_mu, fc_logvar: Dense(4 c4 -> latent_dim) each
    decoder:
      Dense(latent_dim -> 16 c4) -> [B, 4, 4, c4]
      convT f x f/2 pad 1 (c4 -> c3) + BN + ReLU     -> [B, 7|8, .., c3]
      convT4x4/2 pad 1 (c3 -> c2) + BN + ReLU        -> [B, 14|16, .., c2]
      convT4x4/2 pad 1 (c2 -> c1) + BN + ReLU        -> [B, 28|32, .., c1]
      convT1x1 (c1 -> nc), with bias                 -> [B, 28|32, .., nc] (no output nonlinearity)

`Discriminator`: Dense(latent -> 512) + ReLU, Dense(512 -> 512) + ReLU, Dense(512 -> 1): logits
(the reference ends in a Sigmoid; `jax.nn.sigmoid(logits)` is its output).

Parameter counts at width 1.0 (hand computation in tests/test_vaal.py): Fashion-MNIST VAE
15,392,441 trainable + 5,632 BatchNorm statistics, CIFAR VAE 22,835,139 + 5,632; discriminator
278,017 (latent 28) and 280,065 (latent 32). `width` scales every channel count and the
discriminator's hidden width (rounded, at least 1) for CPU runs; the FLOPs of the inner layers
fall as width^2 (about 346M multiply-adds per 28x28 image forward at width 1.0).

Initialisation as the reference's `kaiming_init`, including what it misses: encoder convs,
the decoder's Dense and the discriminator's Dense layers get kaiming_normal (std sqrt(2/fan_in))
with zero biases; `fc_mu`/`fc_logvar` keep PyTorch's Linear default (its init loop passes their
names, not the modules) and the transposed convs keep PyTorch's ConvTranspose2d default, whose
fan_in is out_channels * k * k. BatchNorm: scale 1, bias 0, PyTorch momentum 0.1 and eps 1e-5.
"""

from __future__ import annotations

from typing import Optional, Tuple

import chex
import jax
import jax.numpy as jnp
from flax import linen as nn

from jax_seqgcn.models.conv import Conv2D
from jax_seqgcn.models.conv import check_impl
from jax_seqgcn.models.conv import conv_impl
from jax_seqgcn.models.layers import torch_bias_init
from jax_seqgcn.models.layers import torch_dense

# Image side -> kernel of the last encoder conv and first decoder convT (the reference's f_filt).
KERNEL_BY_SIZE = {28: 3, 32: 4}
# The reference's latent size: VAE(28, 1, 3) for Fashion-MNIST, VAE() = z_dim 32 otherwise.
LATENT_BY_SIZE = {28: 28, 32: 32}
ENCODER_CHANNELS = (128, 256, 512, 1024)
DISCRIMINATOR_HIDDEN = 512

# torch.nn.init.kaiming_normal_(w) (a=0, fan_in): N(0, 2 / fan_in), not truncated.
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# torch ConvTranspose2d default: kaiming_uniform(a=sqrt(5)) with fan_in = weight.size(1) * k * k
# = out_channels * k * k, which for a [k, k, in, out] kernel is Flax's "fan_out".
torch_conv_transpose_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")


def scaled(channels: int, width: float) -> int:
  """`channels * width` rounded, at least 1."""
  return max(1, int(round(channels * width)))


def check_image_shape(image_shape) -> Tuple[int, int]:
  """(side, channels) of [H, W, C] images the VAE takes (H = W = 28 or 32), else ValueError."""
  if len(image_shape) != 3:
    raise ValueError(f"VAAL's VAE takes [H, W, C] images, got shape {tuple(image_shape)}")
  height, width, channels = (int(d) for d in image_shape)
  if height != width or height not in KERNEL_BY_SIZE or channels < 1:
    raise ValueError(
        f"VAAL's VAE (the reference's conv encoder/decoder) takes square 28x28 or 32x32 images "
        f"with at least one channel, got {height}x{width}x{channels}; resize or crop the images")
  return height, channels


def default_latent_dim(image_shape) -> int:
  """The reference's latent size for `image_shape` [H, W, C]: 28 for 28x28, 32 for 32x32."""
  return LATENT_BY_SIZE[check_image_shape(image_shape)[0]]


def conv_transpose(x: jax.Array, kernel: jax.Array, *, stride: int, padding: int) -> jax.Array:
  """PyTorch ConvTranspose2d (output (H - 1) stride - 2 padding + k), without the bias.

  Computed by output phase: output pixel stride * m + r only receives the kernel taps
  a = r + padding (mod stride), so each of the stride^2 phases is an ordinary small convolution
  (shifted input slices concatenated, one matrix product), and the phases are interleaved.
  Unlike an input-dilated convolution this does no multiply-adds on inserted zeros, and unlike
  XLA's native convolution it stays fast inside `lax.scan` on CPU (8 gradient steps of a
  64->32 4x4/2 layer on [128, 7, 7, 64]: 0.7 s, vs 15 s with XLA's convolution in the loop).

  Args:
    x: [B, H, W, in] input.
    kernel: [k, k, in, out]; output pixel (stride * i - padding + a, stride * j - padding + b)
      receives x[i, j] @ kernel[a, b] (PyTorch's weight[in, out, a, b]).
    stride: upsampling factor.
    padding: pixels cropped from each side of the full output.
  Returns:
    [B, (H - 1) stride + k - 2 padding, (W - 1) stride + k - 2 padding, out].
  """
  k, _, _, out = kernel.shape
  batch, height, width, _ = x.shape
  out_h, out_w = (height - 1) * stride + k - 2 * padding, (width - 1) * stride + k - 2 * padding
  phase_h, phase_w = -(-out_h // stride), -(-out_w // stride)

  def taps(r):  # (kernel tap a, input offset d): phase r at m reads x[m - d] @ kernel[a]
    return [(a, (a - r - padding) // stride) for a in range((r + padding) % stride, k, stride)]

  offsets = [d for r in range(stride) for _, d in taps(r)]
  lo = max(0, max(offsets))
  x = jnp.pad(x, ((0, 0), (lo, max(0, phase_h - height - min(offsets))),
                  (lo, max(0, phase_w - width - min(offsets))), (0, 0)))
  rows = []
  for ry in range(stride):
    row = []
    for rx in range(stride):
      pairs = [(x[:, lo - dy:lo - dy + phase_h, lo - dx:lo - dx + phase_w], kernel[a, b])
               for a, dy in taps(ry) for b, dx in taps(rx)]
      if not pairs:  # a phase no tap reaches (stride > kernel) stays zero
        row.append(jnp.zeros((batch, phase_h, phase_w, out), x.dtype))
        continue
      patches, weights = zip(*pairs)
      row.append(jnp.concatenate(patches, -1) @ jnp.concatenate(weights, 0))
    rows.append(jnp.stack(row, 3))  # [B, phase_h, phase_w, stride, out]
  y = jnp.stack(rows, 2).reshape(batch, phase_h * stride, phase_w * stride, out)
  return y[:, :out_h, :out_w]


def _xla_conv_transpose(x, kernel, *, stride, padding):
  k = kernel.shape[0]
  pad = k - 1 - padding  # PyTorch's padding crops the full output; as input padding: k - 1 - p.
  return jax.lax.conv_general_dilated(
      x, jnp.flip(kernel, (0, 1)), (1, 1), [(pad, pad), (pad, pad)], lhs_dilation=(stride, stride),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


class ConvTranspose2D(nn.Module):
  """PyTorch-semantics ConvTranspose2d with PyTorch's default initialisation.

  Attributes:
    features: output channels.
    kernel_size: k.
    stride: upsampling factor.
    padding: PyTorch padding (cropped from the full output).
    use_bias: add a bias.
    impl: "im2col" (`conv_transpose`, by output phase: CPU training passes) or "xla"
      (`lax.conv_general_dilated` with input dilation); `conv.conv_impl` picks it.
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  use_bias: bool = False
  impl: str = "im2col"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] -> [B, (H - 1) stride + k - 2 padding, ..., features]."""
    k = self.kernel_size
    kernel = self.param("kernel", torch_conv_transpose_init, (k, k, x.shape[-1], self.features))
    op = conv_transpose if check_impl(self.impl) == "im2col" else _xla_conv_transpose
    y = op(x, kernel, stride=self.stride, padding=self.padding)
    if self.use_bias:
      y = y + self.param("bias", torch_bias_init(self.features * k * k), (self.features,))
    return y


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
  # PyTorch BatchNorm2d: momentum 0.1 (Flax's decay 0.9), eps 1e-5.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class VAE(nn.Module):
  """The reference's VAAL VAE for square 28x28 or 32x32 images (see the module docstring).

  Attributes:
    image_size: 28 (f_filt 3) or 32 (f_filt 4); inputs must be [B, image_size, image_size,
      channels].
    channels: image channels nc (1 for Fashion-MNIST, 3 for CIFAR/SVHN).
    latent_dim: z size (the reference: 28 for Fashion-MNIST, 32 otherwise).
    width: channel multiplier; 1.0 is the reference's 128-256-512-1024.
    platform: the platform whose convolutions it uses ("cpu" or None: im2col and by-phase
      transposed convolutions in training passes, which stay fast inside loops, XLA's own in
      evaluation passes; "gpu", "tpu", ...: XLA's own always; `conv.conv_impl`).
  """
  image_size: int = 32
  channels: int = 3
  latent_dim: int = 32
  width: float = 1.0
  platform: Optional[str] = None

  def _channels(self):
    return tuple(scaled(c, self.width) for c in ENCODER_CHANNELS)

  def _check(self, x):
    chex.assert_rank(x, 4)
    size, channels = check_image_shape(x.shape[1:])
    if (size, channels) != (self.image_size, self.channels):
      raise ValueError(f"this VAE takes {self.image_size}x{self.image_size}x{self.channels} "
                       f"images, got {tuple(x.shape[1:])}")

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, decode: bool = True):
    """Encodes, samples z = mu + exp(logvar / 2) * eps (rng stream "latent"), decodes.

    Args:
      x: [B, image_size, image_size, channels] float32 images.
      train: BatchNorm on batch statistics (and updating 'batch_stats'; apply with
        `mutable=['batch_stats']`) if True, else on the running averages.
      decode: if False, skip the sampling and the decoder (no "latent" rng needed).
    Returns:
      (recon [B, H, W, channels] or None, z [B, latent_dim] or None, mu [B, latent_dim],
       logvar [B, latent_dim]), as the reference's `forward` (recon, z, mu, logvar).
    """
    self._check(x)
    impl = conv_impl(self.platform, train=train)
    k_last = KERNEL_BY_SIZE[self.image_size]
    c = self._channels()
    h = x
    for i, (features, k) in enumerate(zip(c, (4, 4, 4, k_last))):
      h = Conv2D(features, k, stride=2, padding=1, use_bias=False, kernel_init=kaiming_normal,
                 impl=impl, name=f"encoder_conv{i}")(h)
      h = nn.relu(_batch_norm(train, f"encoder_bn{i}")(h))
    h = h.reshape(h.shape[0], -1)  # [B, 2 * 2 * c4]
    mu = torch_dense(self.latent_dim, h.shape[-1], name="fc_mu")(h)
    logvar = torch_dense(self.latent_dim, h.shape[-1], name="fc_logvar")(h)
    if not decode:
      return None, None, mu, logvar
    eps = jax.random.normal(self.make_rng("latent"), mu.shape, mu.dtype)
    z = mu + jnp.exp(0.5 * logvar) * eps
    h = nn.Dense(16 * c[3], kernel_init=kaiming_normal, name="decoder_fc")(z)
    h = h.reshape(h.shape[0], 4, 4, c[3])
    for i, (features, k) in enumerate(zip((c[2], c[1], c[0]), (k_last, 4, 4))):
      h = ConvTranspose2D(features, k, stride=2, padding=1, impl=impl,
                          name=f"decoder_convt{i}")(h)
      h = nn.relu(_batch_norm(train, f"decoder_bn{i}")(h))
    recon = ConvTranspose2D(self.channels, 1, use_bias=True, impl=impl,
                            name="decoder_out")(h)
    return recon, z, mu, logvar


class Discriminator(nn.Module):
  """VAAL's adversary on the latent mean: latent -> 512 -> 512 -> 1 (ReLU), logits out.

  Attributes:
    width: multiplier of the 512 hidden units (1.0 = the reference).
  """
  width: float = 1.0

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    """z: [B, latent_dim] -> [B] logits of "labelled"; `jax.nn.sigmoid` gives the probability."""
    chex.assert_rank(z, 2)
    hidden = scaled(DISCRIMINATOR_HIDDEN, self.width)
    h = nn.relu(nn.Dense(hidden, kernel_init=kaiming_normal, name="fc0")(z))
    h = nn.relu(nn.Dense(hidden, kernel_init=kaiming_normal, name="fc1")(h))
    return nn.Dense(1, kernel_init=kaiming_normal, name="fc2")(h)[:, 0]


def vae_for_images(image_shape, *, latent_dim: int = 0, width: float = 1.0,
                   platform: Optional[str] = None) -> VAE:
  """The `VAE` for [H, W, C] images; `latent_dim` 0 picks the reference's (`default_latent_dim`).

  `platform` is the platform of the devices it runs on (see `VAE`).

  Raises:
    ValueError: images that are not 28x28 or 32x32.
  """
  size, channels = check_image_shape(image_shape)
  return VAE(image_size=size, channels=channels,
             latent_dim=int(latent_dim) or LATENT_BY_SIZE[size], width=float(width),
             platform=platform)

