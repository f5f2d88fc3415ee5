"""VAAL (Sinha et al. 2019): variational adversarial active learning, as the reference runs it.

A beta-VAE (`models.vae.VAE`) learns a latent space of labelled and unlabelled images while a
discriminator (`models.vae.Discriminator`) learns to tell their latent means apart; the VAE is
also trained to fool it. The `budget` unlabelled nodes the discriminator finds least likely to
be labelled are picked. Training follows the reference's `train_vaal`:

* iterations = int(num_nodes * epochs / batch_size) (the reference: (labelled + subset) *
  EPOCHV / BATCH with EPOCHV = 100, BATCH = 128), at least 1;
* each iteration draws a labelled and an unlabelled batch, takes a VAE step, draws new batches,
  takes a second VAE step and then one discriminator step on those same second batches;
* VAE loss = vae_loss(labelled) + vae_loss(unlabelled) + adversary_weight * (BCE(D(mu_l), 1) +
  BCE(D(mu_u), 1)), with vae_loss = mean squared error + beta * KLD and KLD summed (not
  averaged) over the batch and latent axes, as the reference;
* discriminator loss = BCE(D(mu_l), 1) + BCE(D(mu_u), 0), mu from the VAE without gradient;
* Adam(5e-4) for both, PyTorch-default betas and eps.

BCE is computed from logits (the reference applies BCELoss to sigmoid outputs, whose log it
clamps at -100); the two agree wherever the sigmoid does not saturate.

Labelled and unlabelled batches go through the VAE separately (as the reference), so BatchNorm
normalises each set by its own batch statistics during training. Batches are drawn on device:
`batch_size` distinct nodes uniformly at random per draw (a set smaller than the batch is used
whole and repeated to fill it); the reference cycles through its sets in a fixed order.

Compilation: the pool size N changes every query, so the training step does not see N. A small
jitted draw gathers the batches of `CHUNK` iterations from the on-device images; one jitted
`lax.scan` runs those iterations (a trailing partial chunk skips its extra iterations). Every
query of a run therefore shares one compile of the training program (~20 s of CPU time on a
loaded 2-core machine); only the draw (a few seconds) is compiled per N. Scoring runs one jitted batch function.

Scoring deviates on purpose: the reference never calls `vae.eval()`, so it scores the subset in
train mode, each node normalised by the statistics of whichever 127 other nodes share its
sequential batch (the last batch of a 5,000 subset has 8 nodes). We score with the running
averages (eval mode), so a node's score does not depend on the pool's order or batching. The
discriminator has no BatchNorm or dropout, so its mode does not matter. Picks are ordered by the
discriminator's logit (the reference sorts sigmoid probabilities, which tie once they saturate).

Precision: the VAE and the discriminator are networks trained on images, like the learner, so
their training and their scoring pass keep the backend's default matmul precision (on TPU,
bfloat16 passes) instead of the selection stage's HIGHEST (`jax_seqgcn.selection`): scoring
at HIGHEST would not make the logits backend-independent, since the weights were trained at
the default. The pick itself (`top_unlabelled` on the logits) involves no matrix product.
"""

import functools
from typing import Any, Dict, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_seqgcn import checks
from jax_seqgcn.models import vae as vae_lib
from jax_seqgcn.samplers import base
from jax_seqgcn.training import progress

# Defaults are the reference's (config.py EPOCHV and BATCH, train_vaal's constants).
OPTIONS = dict(vaal_epochs=100, vaal_batch_size=128, vaal_width=1.0, vaal_latent_dim=0,
               vaal_learning_rate=5e-4, vaal_beta=1.0, vaal_adversary_weight=1.0)
# Upper bounds on options (option -> (bound, why)): larger values ran out of memory or ran for
# days in a probe, so `check_options` refuses them up front (library, experiments, select).
LIMITS = {
    "vaal_epochs": (10 ** 4, "the iterations (and time) grow with epochs x pool size"),
    "vaal_batch_size": (65536, "two batches of images go through the VAE per step"),
    "vaal_latent_dim": (65536, "the VAE's latent layers grow with it"),
    "vaal_width": (8, "the VAE's compute grows as the square of its channel multiplier"),
}
# Iterations per compiled scan call. Draws are keyed per chunk: changing it changes the batches.
CHUNK = 16
# Losses go to `training.progress.report` every this many chunks (one host sync each).
REPORT_CHUNKS = 8
EVAL_BATCH = 256  # nodes per scoring batch; eval-mode BatchNorm makes scores independent of it
LOG_KEYS = ("vae_loss", "reconstruction", "kld", "adversarial", "discriminator_loss")


class VAALResult(NamedTuple):
  """Output of `train_vaal`.

  Attributes:
    logits: [N] discriminator logits of "labelled" for every node (eval-mode VAE, after
      training); the sampler picks the unlabelled nodes with the lowest.
    probabilities: [N] sigmoid(logits).
    logs: per-iteration training losses, NumPy [iterations] each: "vae_loss" (the total VAE
      loss), "reconstruction" (MSE labelled + unlabelled), "kld" (KLD labelled + unlabelled,
      before beta), "adversarial" (the VAE's BCE towards "labelled", both sets), each averaged
      over the iteration's two VAE steps, and "discriminator_loss".
    variables: {"vae": {"params", "batch_stats"}, "discriminator": {"params"}} after training.
  """
  logits: np.ndarray
  probabilities: np.ndarray
  logs: Dict[str, np.ndarray]
  variables: Any


class VAALState(NamedTuple):
  """Training state: the VAE's parameters, BatchNorm statistics and Adam state, and the
  discriminator's parameters and Adam state."""
  vae_params: Any
  batch_stats: Any
  vae_opt: Any
  disc_params: Any
  disc_opt: Any


def num_iterations(num_nodes: int, epochs: float, batch_size: int) -> int:
  """The reference's schedule: int(num_nodes * epochs / batch_size), at least 1."""
  return max(1, int(num_nodes * epochs / batch_size))


def check_options(options) -> None:
  """Raises ValueError (every problem in one message) for VAAL options that cannot train.

  Epochs, width and learning rate must be finite and > 0, the batch size an int >= 1, the
  latent size an int >= 0 (0: the reference's for the image size), beta and adversary_weight
  finite and >= 0 (0 switches the term off: a plain autoencoder, or no adversarial VAE term).
  Epochs, batch size, latent size and width are also at most their `LIMITS` bound. Bools are
  refused (True is not 1).
  """
  get = lambda name: options.get(name, OPTIONS[name])
  problems = []
  if not checks.is_int(get("vaal_batch_size")) or get("vaal_batch_size") < 1:
    problems.append(f"vaal_batch_size must be an int >= 1, got {get('vaal_batch_size')!r}")
  if not checks.is_int(get("vaal_latent_dim")) or get("vaal_latent_dim") < 0:
    problems.append(f"vaal_latent_dim must be an int >= 0 (0: 28 for 28x28 images, 32 for "
                    f"32x32), got {get('vaal_latent_dim')!r}")
  for name in ("vaal_epochs", "vaal_width", "vaal_learning_rate"):
    if not checks.is_finite_real(get(name)) or get(name) <= 0:
      problems.append(f"{name} must be a finite number > 0, got {get(name)!r}")
  for name in ("vaal_beta", "vaal_adversary_weight"):
    if not checks.is_finite_real(get(name)) or get(name) < 0:
      problems.append(f"{name} must be a finite number >= 0, got {get(name)!r}")
  for name, (bound, why) in LIMITS.items():
    # Only values that passed the checks above (a bad type is already one problem).
    if checks.is_finite_real(get(name)) and get(name) > bound:
      problems.append(f"{name} must be <= {bound}, got {get(name)!r}: {why}")
  if problems:
    raise ValueError("bad VAAL option(s): " + "; ".join(problems))


def _models(image_shape, width, latent_dim, platform=None):
  vae = vae_lib.vae_for_images(image_shape, latent_dim=latent_dim, width=width,
                               platform=platform)
  return vae, vae_lib.Discriminator(width=width)


def _rbg_keys(key, shape):
  """"rbg" keys of `shape` drawn from any `key`. XLA:CPU compiles each threefry draw in a
  program slowly (the VAE's init: 39 s with threefry keys, 8 s with rbg on a loaded machine)."""
  data = jax.random.bits(key, tuple(shape) + (4,), jnp.uint32)
  return jax.random.wrap_key_data(data, impl="rbg")


@functools.partial(jax.jit, static_argnames=("image_shape", "width", "latent_dim"))
def init_state(key, *, image_shape, width, latent_dim) -> VAALState:
  """The initial `VAALState` of `train_vaal` (jitted; image_shape [H, W, C], width and
  latent_dim static), initialised as the reference (see `models.vae`)."""
  vae, discriminator = _models(image_shape, width, latent_dim)
  vae_key, latent_key, disc_key = _rbg_keys(key, (3,))
  vae_vars = vae.init({"params": vae_key, "latent": latent_key},
                      jnp.zeros((2,) + image_shape), train=False)
  disc_params = discriminator.init(disc_key, jnp.zeros((1, vae.latent_dim)))["params"]
  # Adam's state does not depend on the learning rate, which stays a traced argument.
  tx = optax.adam(1.0)
  return VAALState(vae_vars["params"], vae_vars["batch_stats"], tx.init(vae_vars["params"]),
                   disc_params, tx.init(disc_params))


@functools.partial(jax.jit, static_argnames=("batch_size",))
def draw_chunk(key, chunk_index, images, labelled_mask, *, batch_size):
  """The batches and noise keys of `CHUNK` iterations (jitted; batch_size static).

  Each draw takes `batch_size` distinct members of the labelled and of the unlabelled set (a set
  smaller than the batch whole, repeated to fill it); chunk `chunk_index` draws from
  fold_in(key, chunk_index).

  Returns:
    batches [CHUNK, 2 VAE steps, 2 sets (labelled, unlabelled), batch_size, H, W, C] and
    noise_keys [CHUNK, 2, 2] rbg keys for the reparameterisation noise.
  """
  num_nodes = labelled_mask.shape[0]
  draw_key, noise_key = jax.random.split(jax.random.fold_in(key, chunk_index))
  members = jnp.stack([labelled_mask, ~labelled_mask])  # [2 sets, N]
  counts = jnp.sum(members, axis=1)
  # `batch_size` distinct members per draw: the largest of i.i.d. uniform priorities.
  priorities = jnp.where(members, jax.random.uniform(draw_key, (CHUNK, 2, 2, num_nodes)), -1.0)
  _, nodes = jax.lax.top_k(priorities, min(batch_size, num_nodes))
  # A set smaller than the batch: all its members, repeated to fill the batch.
  slot = jnp.arange(batch_size)[:, None] % jnp.minimum(counts, nodes.shape[-1])  # [B, 2 sets]
  nodes = jnp.take_along_axis(nodes, slot.T[None, None], axis=-1)
  return images[nodes], _rbg_keys(noise_key, (CHUNK, 2, 2))


def _bce_with_logits(logits, target: float):
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, target)))


def train_chunk(state, batches, noise_keys, active, learning_rate, beta, adversary_weight, *,
                width, latent_dim, platform):
  """`CHUNK` VAAL iterations (those with `active` False leave the state alone).

  The training program `train_vaal` compiles once (through `train_chunk_jit`), traceable.

  Args:
    state: `VAALState`.
    batches, noise_keys: from `draw_chunk`.
    active: [CHUNK] bool.
    learning_rate, beta, adversary_weight: float32 scalars.
    width, latent_dim: static VAE options.
    platform: the devices' platform, for the VAE's convolutions (`models.conv.conv_impl`).
  Returns:
    (state, logs [CHUNK, len(LOG_KEYS)]), logs zero for inactive iterations.
  """
  vae, discriminator = _models(batches.shape[4:], width, latent_dim, platform)
  tx = optax.adam(learning_rate)
  batch_size = batches.shape[3]

  def forward(params, stats, sets, set_keys=None):
    """The labelled then the unlabelled batch through the train-mode VAE, one after the other
    (as the reference: BatchNorm statistics per set, running averages updated in that order).
    A scan over the two sets keeps a single copy of the network in the compiled program."""

    def one_set(stats, inputs):
      x, set_key = inputs
      outputs, updates = vae.apply(
          {"params": params, "batch_stats": stats}, x, train=True, decode=set_key is not None,
          rngs={} if set_key is None else {"latent": set_key}, mutable=["batch_stats"])
      return updates["batch_stats"], outputs

    stats, outputs = jax.lax.scan(one_set, stats, (sets, set_keys))
    return outputs, stats

  def vae_loss_fn(params, stats, disc_params, sets, set_keys):
    (recon, _, mu, logvar), stats = forward(params, stats, sets, set_keys)
    mse = jnp.mean(jnp.square(recon - sets), axis=(1, 2, 3, 4))  # [2 sets]
    kld = -0.5 * jnp.sum(1.0 + logvar - jnp.square(mu) - jnp.exp(logvar), axis=(1, 2))
    # D(mu) -> "labelled" for both sets (equal sizes, so one mean = the two BCEs / 2).
    adversarial = 2.0 * _bce_with_logits(
        discriminator.apply({"params": disc_params}, mu.reshape(-1, mu.shape[-1])), 1.0)
    total = jnp.sum(mse + beta * kld) + adversary_weight * adversarial
    return total, (stats, jnp.stack([total, jnp.sum(mse), jnp.sum(kld), adversarial]))

  def vae_step(carry, inputs):
    params, stats, opt, disc_params = carry
    sets, set_keys = inputs
    grads, (stats, logs) = jax.grad(vae_loss_fn, has_aux=True)(params, stats, disc_params, sets,
                                                               set_keys)
    updates, opt = tx.update(grads, opt, params)
    return (optax.apply_updates(params, updates), stats, opt, disc_params), logs

  def disc_loss_fn(params, mu):
    logits = discriminator.apply({"params": params}, mu.reshape(-1, mu.shape[-1]))
    return (_bce_with_logits(logits[:batch_size], 1.0)
            + _bce_with_logits(logits[batch_size:], 0.0))

  def iteration(state, inputs):
    steps, step_keys = inputs
    (params, stats, opt, _), vae_logs = jax.lax.scan(
        vae_step, (state.vae_params, state.batch_stats, state.vae_opt, state.disc_params),
        (steps, step_keys))
    # The discriminator step reuses the second VAE step's batches, through the updated VAE in
    # train mode, so the encoder's running statistics move as in the reference's no_grad pass.
    # Only the encoder runs: the decoder's statistics are never used (scoring needs mu only).
    (_, _, mu, _), stats = forward(params, stats, steps[1])
    disc_loss, grads = jax.value_and_grad(disc_loss_fn)(state.disc_params,
                                                        jax.lax.stop_gradient(mu))
    updates, disc_opt = tx.update(grads, state.disc_opt, state.disc_params)
    disc_params = optax.apply_updates(state.disc_params, updates)
    logs = jnp.concatenate([jnp.mean(vae_logs, axis=0), disc_loss[None]])
    return VAALState(params, stats, opt, disc_params, disc_opt), logs

  def maybe_iteration(state, inputs):
    is_active, inputs = inputs
    return jax.lax.cond(is_active, iteration,
                        lambda s, _: (s, jnp.zeros(len(LOG_KEYS), jnp.float32)), state, inputs)

  return jax.lax.scan(maybe_iteration, state, (active, (batches, noise_keys)))


TRAIN_CHUNK_STATIC_ARGNAMES = ("width", "latent_dim", "platform")
# `train_chunk` compiled (the state donated). `train_vaal` calls it through this module
# attribute, so it can be replaced (e.g. by a wrapper that counts traces).
train_chunk_jit = jax.jit(train_chunk, static_argnames=TRAIN_CHUNK_STATIC_ARGNAMES,
                          donate_argnums=0)


@functools.partial(jax.jit, static_argnames=("width", "latent_dim", "platform"))
def score_batch(variables, images, *, width, latent_dim, platform):
  """[B] eval-mode discriminator logits on mu for images [B, H, W, C] (jitted; `train_vaal`
  scores the pool with it, batch by batch, after training)."""
  # Eval mode: XLA's own convolution, the faster outside loops on CPU too (`conv_impl`).
  vae, discriminator = _models(images.shape[1:], width, latent_dim, platform)
  _, _, mu, _ = vae.apply(variables["vae"], images, train=False, decode=False)
  return discriminator.apply(variables["discriminator"], mu)


def _check_inputs(images, labelled_mask):
  images = checks.numeric(images, "images")
  if images.ndim != 4:
    raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
  vae_lib.check_image_shape(images.shape[1:])
  # Checked in their own precision, then float32 (float16/bfloat16 upcast, as features are).
  images = checks.host_float32(images, "images")
  labelled_mask = np.asarray(base.validate_pool(base.Pool(labelled_mask), 1).labelled_mask)
  if labelled_mask.shape[0] != images.shape[0]:
    raise ValueError(f"labelled_mask has {labelled_mask.shape[0]} nodes but images has "
                     f"{images.shape[0]}")
  if not labelled_mask.any():
    raise ValueError("VAAL needs at least one labelled node (its discriminator learns labelled "
                     "vs unlabelled)")
  return images, labelled_mask


def train_vaal(key: jax.Array, images: jax.Array, labelled_mask: jax.Array, *,
               epochs: float = OPTIONS["vaal_epochs"],
               batch_size: int = OPTIONS["vaal_batch_size"],
               width: float = OPTIONS["vaal_width"],
               latent_dim: int = OPTIONS["vaal_latent_dim"],
               learning_rate: float = OPTIONS["vaal_learning_rate"],
               beta: float = OPTIONS["vaal_beta"],
               adversary_weight: float = OPTIONS["vaal_adversary_weight"]) -> VAALResult:
  """Trains VAAL's VAE and discriminator on the pool and scores every node (module docstring).

  Defaults are the reference's. Compiles once per (image shape, batch_size, width,
  latent_dim) for training and scoring, plus a small batch draw per pool size.

  Args:
    key: PRNG key (initialisation, batch draws, reparameterisation noise).
    images: [N, H, W, C] float32 preprocessed images, H = W = 28 or 32.
    labelled_mask: [N] bool with at least one labelled and one unlabelled node.
    epochs: passes over the N nodes that set the number of iterations (`num_iterations`).
    batch_size: nodes per labelled and per unlabelled batch.
    width: channel multiplier of the VAE and the discriminator (1.0: the reference).
    latent_dim: z size; 0 picks the reference's (28 for 28x28 images, 32 for 32x32).
    learning_rate: Adam learning rate of both networks.
    beta: weight of the KL term.
    adversary_weight: weight of the VAE's adversarial term.
  Returns:
    `VAALResult` (logits and probabilities [N], logs [iterations] each, variables).
  Raises:
    ValueError: bad options, images of another size or with NaN/inf, a mask without both kinds
      of node.
    FloatingPointError: training diverged (non-finite losses or discriminator outputs).
  """
  check_options(dict(vaal_epochs=epochs, vaal_batch_size=batch_size, vaal_width=width,
                     vaal_latent_dim=latent_dim, vaal_learning_rate=learning_rate,
                     vaal_beta=beta, vaal_adversary_weight=adversary_weight))
  images, labelled_mask = _check_inputs(images, labelled_mask)
  num_nodes = images.shape[0]
  iterations = num_iterations(num_nodes, epochs, batch_size)
  static = dict(width=float(width), latent_dim=int(latent_dim))
  init_key, draw_key = jax.random.split(key)
  state = init_state(init_key, image_shape=images.shape[1:], **static)
  device_images, device_mask = jnp.asarray(images), jnp.asarray(labelled_mask)
  # The VAE's kernels follow the devices it runs on (`models.conv`), bound before tracing.
  platform = next(iter(device_images.devices())).platform
  hyper = (jnp.float32(learning_rate), jnp.float32(beta), jnp.float32(adversary_weight))
  chunk_logs = []
  num_chunks = -(-iterations // CHUNK)
  reported = 0  # iterations already reported (`progress.report`, every REPORT_CHUNKS chunks)
  for chunk_index in range(num_chunks):
    batches, noise_keys = draw_chunk(draw_key, chunk_index, device_images, device_mask,
                                     batch_size=int(batch_size))
    active = np.arange(CHUNK) < iterations - chunk_index * CHUNK
    state, logs = train_chunk_jit(state, batches, noise_keys, active, *hyper, **static,
                                  platform=platform)
    chunk_logs.append(logs)
    if (chunk_index + 1) % REPORT_CHUNKS == 0 or chunk_index == num_chunks - 1:
      done = min(iterations, (chunk_index + 1) * CHUNK)
      recent = np.concatenate([np.asarray(c) for c in chunk_logs[reported // CHUNK:]])
      recent = recent[:done - reported]
      progress.report("vaal", {name: recent[:, i] for i, name in enumerate(LOG_KEYS)},
                      first_step=reported, total_steps=iterations)
      reported = done
  logs = np.concatenate([np.asarray(chunk) for chunk in chunk_logs])[:iterations]
  variables = {"vae": {"params": state.vae_params, "batch_stats": state.batch_stats},
               "discriminator": {"params": state.disc_params}}
  padded = np.zeros((-(-num_nodes // EVAL_BATCH) * EVAL_BATCH,) + images.shape[1:], np.float32)
  padded[:num_nodes] = images
  logits = np.concatenate([
      np.asarray(score_batch(variables, padded[start:start + EVAL_BATCH], **static,
                             platform=platform))
      for start in range(0, num_nodes, EVAL_BATCH)])[:num_nodes]
  if not (np.isfinite(logits).all() and np.isfinite(logs).all()):
    raise FloatingPointError(
        f"VAAL diverged: non-finite losses or discriminator outputs after {iterations} "
        f"iterations at learning_rate {learning_rate}; try a smaller vaal_learning_rate")
  probabilities = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
  return VAALResult(logits, probabilities.astype(np.float32),
                    {name: logs[:, i] for i, name in enumerate(LOG_KEYS)}, variables)


@base.register("VAAL", needs=("images",), options=OPTIONS, check=check_options,
               description="beta-VAE + latent discriminator (Sinha et al. 2019); picks the "
                           "unlabelled images it finds least likely labelled")
def _vaal(key, pool: base.Pool, budget: int, **options) -> jax.Array:
  result = train_vaal(key, pool.images, pool.labelled_mask,
                      **{name[len("vaal_"):]: value for name, value in options.items()})
  return base.top_unlabelled(-jnp.asarray(result.logits), jnp.asarray(pool.labelled_mask),
                             budget)


def vaal(key: jax.Array, images: jax.Array, labelled_mask: jax.Array, budget: int,
         **options) -> jax.Array:
  """VAAL on an images array: train (`train_vaal`), pick the least "labelled" unlabelled nodes.

  Args:
    key: PRNG key.
    images: [N, H, W, C] float32 preprocessed images (28x28 or 32x32).
    labelled_mask: [N] bool, at least one labelled node.
    budget: number of picks.
    **options: `vaal_epochs`, `vaal_batch_size`, `vaal_width`, `vaal_latent_dim`,
      `vaal_learning_rate`, `vaal_beta`, `vaal_adversary_weight` (defaults: `OPTIONS`).
  Returns:
    [budget] int32 indices of unlabelled nodes, lowest discriminator probability first.
  """
  return base.SAMPLERS["VAAL"](key, base.Pool(labelled_mask, images=images), budget, **options)
