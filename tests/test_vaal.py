"""Tests of VAAL: the reference's VAE/discriminator, the training program and the picks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_seqgcn import samplers
from jax_seqgcn.models import conv
from jax_seqgcn.models import vae as vae_lib
from jax_seqgcn.samplers import vaal

# Every training run in this file shares these static options, so the training program is
# compiled (and traced) once for the whole file; pool sizes vary freely.
FAST = dict(vaal_batch_size=16, vaal_width=0.125, vaal_latent_dim=8)


@pytest.fixture(scope="module", autouse=True)
def one_trace_for_the_whole_file():
  """Every test's training goes through a chunk program that may be traced only once."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(vaal, "train_chunk_jit", jax.jit(
        chex.assert_max_traces(vaal.train_chunk, n=1),
        static_argnames=vaal.TRAIN_CHUNK_STATIC_ARGNAMES, donate_argnums=0))
    yield


def _count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _abstract(module, *args, **kwargs):
  rngs = {"params": jax.random.key(0), "latent": jax.random.key(1)}
  return jax.eval_shape(lambda: module.init_with_output(rngs, *args, **kwargs))


@pytest.mark.parametrize("image_shape, latent, k", [((28, 28, 1), 28, 3), ((32, 32, 3), 32, 4)])
def test_reference_shapes_and_parameter_counts(image_shape, latent, k):
  nc = image_shape[-1]
  model = vae_lib.vae_for_images(image_shape)  # the reference's VAE(28, 1, 3) / VAE()
  assert model.latent_dim == latent
  (recon, z, mu, logvar), variables = _abstract(model, jnp.zeros((5,) + image_shape),
                                                train=False)
  assert recon.shape == (5,) + image_shape
  assert z.shape == mu.shape == logvar.shape == (5, latent)
  # Hand count, layer by layer as in the reference's nn.Sequential (convs without bias).
  encoder = 4 * 4 * nc * 128 + 4 * 4 * 128 * 256 + 4 * 4 * 256 * 512 + k * k * 512 * 1024
  heads = 2 * (1024 * 2 * 2 * latent + latent)
  decoder = ((latent * 1024 * 4 * 4 + 1024 * 4 * 4) + k * k * 1024 * 512 + 4 * 4 * 512 * 256
             + 4 * 4 * 256 * 128 + (128 * nc + nc))
  batch_norm = 2 * (128 + 256 + 512 + 1024) + 2 * (512 + 256 + 128)
  assert _count(variables["params"]) == encoder + heads + decoder + batch_norm
  assert _count(variables["batch_stats"]) == batch_norm  # running mean and var
  assert _count(variables["params"]) == {1: 15_392_441, 3: 22_835_139}[nc]
  logits, disc = _abstract(vae_lib.Discriminator(), jnp.zeros((5, latent)))
  assert logits.shape == (5,)
  assert _count(disc) == (latent * 512 + 512) + (512 * 512 + 512) + (512 + 1)


def test_width_scales_every_layer():
  model = vae_lib.vae_for_images((28, 28, 1), width=0.125, latent_dim=8)
  _, variables = _abstract(model, jnp.zeros((2, 28, 28, 1)), train=True)
  kernels = {name: p["kernel"].shape for name, p in variables["params"].items() if "kernel" in p}
  assert [kernels[f"encoder_conv{i}"][-1] for i in range(4)] == [16, 32, 64, 128]
  assert kernels["encoder_conv3"] == (3, 3, 64, 128)  # the 28x28 variant's f_filt = 3
  assert kernels["fc_mu"] == (128 * 2 * 2, 8)
  assert kernels["decoder_fc"] == (8, 128 * 4 * 4)
  assert [kernels[f"decoder_convt{i}"][-1] for i in range(3)] == [64, 32, 16]
  _, disc = _abstract(vae_lib.Discriminator(width=0.125), jnp.zeros((2, 8)))
  assert disc["params"]["fc0"]["kernel"].shape == (8, 64)


@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 32, 1), (64, 64, 3), (28, 28)])
def test_unsupported_image_sizes_raise_before_training(shape, monkeypatch):
  with pytest.raises(ValueError, match="28x28 or 32x32|H, W, C"):
    vae_lib.vae_for_images(shape)
  monkeypatch.setattr(vaal, "init_state", None)  # training would fail with a TypeError
  mask = np.arange(10) < 3
  with pytest.raises(ValueError, match="28x28 or 32x32|rank 4"):
    vaal.vaal(jax.random.key(0), np.zeros((10,) + shape, np.float32), mask, 2, **FAST)


@pytest.mark.parametrize("size, k, stride, padding", [(4, 3, 2, 1), (7, 4, 2, 1), (3, 1, 1, 0)])
def test_conv_transpose_is_the_adjoint_of_the_strided_conv(size, k, stride, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, size, size, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, 3, 5)), jnp.float32)
  y = vae_lib.conv_transpose(x, kernel, stride=stride, padding=padding)
  out = (size - 1) * stride + k - 2 * padding  # PyTorch ConvTranspose2d's output size
  assert y.shape == (2, out, out, 5)
  # PyTorch's ConvTranspose2d is the gradient of Conv2d with the same (transposed) weight.
  _, vjp = jax.vjp(lambda t: conv.xla_conv(t, jnp.swapaxes(kernel, 2, 3), stride=stride,
                                      padding=padding), jnp.zeros(y.shape))
  np.testing.assert_allclose(y, vjp(x)[0], atol=1e-5)


def test_initialisation_follows_the_reference():
  state = vaal.init_state(jax.random.key(0), image_shape=(28, 28, 1), width=0.125,
                          latent_dim=8)
  params = state.vae_params
  std = lambda a: float(np.std(np.asarray(a)))
  # kaiming_normal: std sqrt(2 / fan_in), zero biases.
  assert std(params["encoder_conv1"]["kernel"]) == pytest.approx(np.sqrt(2 / (16 * 16)), rel=0.1)
  assert std(params["decoder_fc"]["kernel"]) == pytest.approx(np.sqrt(2 / 8), rel=0.1)
  assert not np.asarray(params["decoder_fc"]["bias"]).any()
  # fc_mu keeps torch's Linear default U(+-1/sqrt(fan_in)); convT's default uses out * k * k.
  assert np.abs(params["fc_mu"]["kernel"]).max() <= 1 / np.sqrt(512)
  assert std(params["fc_mu"]["kernel"]) == pytest.approx(1 / np.sqrt(3 * 512), rel=0.1)
  bound = 1 / np.sqrt(32 * 4 * 4)  # decoder_convt1: 64 -> 32 channels, 4x4
  assert np.abs(params["decoder_convt1"]["kernel"]).max() <= bound
  assert np.abs(params["decoder_convt1"]["kernel"]).max() > 0.9 * bound
  assert np.abs(params["decoder_out"]["bias"]).max() <= 1.0  # fan_in = nc * 1 * 1 = 1
  assert std(state.disc_params["fc1"]["kernel"]) == pytest.approx(np.sqrt(2 / 64), rel=0.1)


def test_batch_draws_are_distinct_members_of_each_set():
  num_nodes = 40
  images = np.broadcast_to(np.arange(num_nodes, dtype=np.float32)[:, None, None, None],
                           (num_nodes, 28, 28, 1))
  for num_labelled in (5, 30):  # fewer and more labelled nodes than the batch of 16
    mask = np.arange(num_nodes) < num_labelled
    batches, _ = vaal.draw_chunk(jax.random.key(0), 0, jnp.asarray(images), jnp.asarray(mask),
                                 batch_size=16)
    nodes = np.asarray(batches[..., 0, 0, 0]).astype(int)  # [CHUNK, 2 steps, 2 sets, 16]
    assert nodes.shape == (vaal.CHUNK, 2, 2, 16)
    assert mask[nodes[:, :, 0]].all() and not mask[nodes[:, :, 1]].any()
    for batch in nodes.reshape(-1, 16):
      set_size = num_labelled if mask[batch[0]] else num_nodes - num_labelled
      assert len(set(batch.tolist())) == min(16, set_size)
    assert len(set(nodes[:, :, 1].ravel().tolist())) == num_nodes - num_labelled


def _corner_images(rng, n, corner):
  images = 0.1 * rng.normal(size=(n, 28, 28, 1)).astype(np.float32)
  square = slice(2, 14) if corner == "top_left" else slice(14, 26)
  images[:, square, square] += 1.0
  return images


def _recording_train_vaal(monkeypatch):
  """Makes `vaal.train_vaal` record its results (so a test sees the scores behind the picks)."""
  results = []
  real = vaal.train_vaal

  def train_vaal(*args, **kwargs):
    results.append(real(*args, **kwargs))
    return results[-1]

  monkeypatch.setattr(vaal, "train_vaal", train_vaal)
  return results


def test_discriminator_separates_sets_and_picks_the_least_labelled_like(monkeypatch):
  rng = np.random.default_rng(0)
  # 40 labelled (top-left square), 100 unlabelled unlike them, 20 unlabelled like them.
  images = np.concatenate([_corner_images(rng, 40, "top_left"),
                           _corner_images(rng, 100, "bottom_right"),
                           _corner_images(rng, 20, "top_left")])
  mask = np.arange(160) < 40
  unlike, like = np.arange(40, 140), np.r_[0:40, 140:160]
  # No adversarial VAE term (it exists to hide exactly this difference) and a light KL term,
  # so mu keeps the square's position and the discriminator has something to learn.
  options = dict(FAST, vaal_epochs=10, vaal_learning_rate=2e-3, vaal_beta=0.01,
                 vaal_adversary_weight=0.0)
  results = _recording_train_vaal(monkeypatch)
  picks = np.asarray(vaal.vaal(jax.random.key(0), images, mask, 100, **options))
  (result,) = results
  p = result.probabilities
  assert p[like].min() > p[unlike].max(), (p[like].min(), p[unlike].max())
  assert p[:40].mean() - p[unlike].mean() > 0.3
  np.testing.assert_array_equal(np.sort(picks), unlike)
  assert np.all(np.diff(result.logits[picks]) >= 0)  # least "labelled" first
  logs = result.logs
  assert len(logs["discriminator_loss"]) == 100  # int(160 * 10 / 16)
  assert logs["discriminator_loss"][-10:].mean() < 0.7 * logs["discriminator_loss"][:10].mean()
  assert logs["reconstruction"][-10:].mean() < logs["reconstruction"][:10].mean()


def _short_problem(num_nodes=60, num_labelled=20, seed=0):
  rng = np.random.default_rng(seed)
  mask = np.zeros(num_nodes, bool)
  mask[rng.choice(num_nodes, num_labelled, replace=False)] = True
  return rng.uniform(size=(num_nodes, 28, 28, 1)).astype(np.float32), mask


def test_picks_distinct_unlabelled_deterministic_and_one_trace_for_all_pool_sizes(monkeypatch):
  options = dict(FAST, vaal_epochs=2)
  results = _recording_train_vaal(monkeypatch)
  for num_nodes, num_labelled in ((60, 20), (75, 9)):  # a new N and mask: no new trace
    images, mask = _short_problem(num_nodes, num_labelled)
    picks = np.asarray(vaal.vaal(jax.random.key(3), images, mask, 12, **options))
    assert picks.dtype == np.int32 and len(set(picks.tolist())) == 12
    assert not mask[picks].any()
  # The registry entry gives the same picks for the same key; another key other scores.
  pool = samplers.Pool(mask, images=images)
  np.testing.assert_array_equal(
      samplers.get_sampler("VAAL")(jax.random.key(3), pool, 12, **options), picks)
  samplers.get_sampler("VAAL")(jax.random.key(4), pool, 12, **options)
  np.testing.assert_array_equal(results[1].logits, results[2].logits)
  assert not np.array_equal(results[1].logits, results[3].logits)


def _plain(options):
  return {k[len("vaal_"):]: v for k, v in options.items()}


def test_schedule_and_loss_composition():
  images, mask = _short_problem()
  assert vaal.num_iterations(6000, 100, 128) == 4687  # int(6000 * 100 / 128)
  result = vaal.train_vaal(jax.random.key(0), images, mask, epochs=5, beta=0.5,
                           adversary_weight=2.0, **_plain(FAST))
  logs = result.logs
  assert all(log.shape == (int(60 * 5 / 16),) for log in logs.values())  # 18: two chunks
  np.testing.assert_allclose(
      logs["vae_loss"], logs["reconstruction"] + 0.5 * logs["kld"] + 2.0 * logs["adversarial"],
      rtol=1e-5)
  assert (logs["kld"] >= 0).all() and (logs["discriminator_loss"] > 0).all()
  np.testing.assert_allclose(result.probabilities, 1 / (1 + np.exp(-result.logits)), rtol=1e-5)


@pytest.mark.parametrize("options, message", [
    (dict(vaal_epochs=0), "vaal_epochs must be a finite number > 0"),
    (dict(vaal_epochs=float("nan")), "vaal_epochs must be a finite number > 0"),
    (dict(vaal_batch_size=16.0), "vaal_batch_size must be an int >= 1"),
    (dict(vaal_batch_size=0), "vaal_batch_size must be an int >= 1"),
    (dict(vaal_width=-0.5), "vaal_width must be a finite number > 0"),
    (dict(vaal_latent_dim=-1), "vaal_latent_dim must be an int >= 0"),
    (dict(vaal_latent_dim=True), "vaal_latent_dim must be an int >= 0"),
    (dict(vaal_learning_rate=float("inf")), "vaal_learning_rate must be a finite number > 0"),
    (dict(vaal_beta=-1.0), "vaal_beta must be a finite number >= 0"),
    (dict(vaal_adversary_weight="1"), "vaal_adversary_weight must be a finite number >= 0"),
])
def test_bad_options_fail_before_training(options, message, monkeypatch):
  monkeypatch.setattr(vaal, "init_state", None)  # training would fail with a TypeError
  with pytest.raises(ValueError, match=message):
    samplers.get_sampler("VAAL").resolve_options(options)
  images, mask = _short_problem()
  with pytest.raises(ValueError, match=message):
    vaal.vaal(jax.random.key(0), images, mask, 3, **options)


def test_bad_inputs_and_divergence_are_named(monkeypatch):
  images, mask = _short_problem()
  with pytest.raises(ValueError, match="at least one labelled"):
    vaal.vaal(jax.random.key(0), images, np.zeros(60, bool), 3, **FAST)
  bad = images.copy()
  bad[3, 4, 5, 0] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    vaal.vaal(jax.random.key(0), bad, mask, 3, **FAST)
  with pytest.raises(ValueError, match="needs pool.images"):
    samplers.get_sampler("VAAL")(jax.random.key(0), samplers.Pool(mask), 3)
  monkeypatch.setattr(vaal, "score_batch", lambda variables, x, **_: jnp.full(len(x), jnp.nan))
  with pytest.raises(FloatingPointError, match="VAAL diverged"):
    vaal.vaal(jax.random.key(0), images, mask, 3, **dict(FAST, vaal_epochs=1))
