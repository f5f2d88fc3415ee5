"""The samplers' own training reports its per-step losses (`training.progress.report`)."""

import jax
import numpy as np

import jax_seqgcn
from jax_seqgcn.samplers import vaal
from jax_seqgcn.training import progress


def _record():
  seen = []

  def callback(stage, metrics, first_step, total_steps):
    seen.append((stage, metrics, first_step, total_steps))

  return seen, callback


def test_gcn_samplers_report_every_steps_loss():
  rng = np.random.default_rng(0)
  features = np.abs(rng.standard_normal((60, 16))).astype(np.float32)
  pool = jax_seqgcn.Pool(np.arange(60) < 15, features=features)
  seen, callback = _record()
  with progress.reporting(callback):
    jax_seqgcn.get_sampler("UncertainGCN")(jax.random.key(0), pool, 5, steps=7, hidden=8)
    jax_seqgcn.get_sampler("UncertainDiscriminator")(jax.random.key(0), pool, 5, steps=3,
                                                     hidden=8)
  assert [(stage, sorted(m), first, total) for stage, m, first, total in seen] == [
      ("gcn", ["loss"], 0, 7), ("mlp", ["loss"], 0, 3)]
  # The values are the training's own losses (`train_gcn(...).losses`, same key and options).
  expected = jax_seqgcn.train_gcn(jax.random.key(0), features, pool.labelled_mask, steps=7,
                                  hidden=8).losses
  np.testing.assert_allclose(seen[0][1]["loss"], np.asarray(expected), rtol=1e-6)
  # Outside a `reporting` block nothing is recorded and nothing fails.
  jax_seqgcn.get_sampler("UncertainGCN")(jax.random.key(0), pool, 5, steps=7, hidden=8)
  assert len(seen) == 2


def test_vaal_reports_its_losses_in_order_covering_every_iteration(monkeypatch):
  monkeypatch.setattr(vaal, "REPORT_CHUNKS", 1)  # a report per chunk: several on a short run
  rng = np.random.default_rng(1)
  images = rng.uniform(size=(60, 28, 28, 1)).astype(np.float32)
  mask = np.arange(60) < 20
  seen, callback = _record()
  with progress.reporting(callback):
    result = vaal.train_vaal(jax.random.key(0), images, mask, epochs=10, batch_size=16,
                             width=0.125, latent_dim=8)
  iterations = len(result.logs["vae_loss"])
  assert iterations > vaal.CHUNK and len(seen) == -(-iterations // vaal.CHUNK)
  assert all(stage == "vaal" and total == iterations for stage, _, _, total in seen)
  firsts = [first for _, _, first, _ in seen]
  assert firsts[0] == 0 and firsts == sorted(firsts)
  for name in vaal.LOG_KEYS:
    reported = np.concatenate([metrics[name] for _, metrics, _, _ in seen])
    np.testing.assert_allclose(reported, result.logs[name], rtol=1e-6)


def test_a_long_gcn_training_reports_chunk_by_chunk_while_it_runs():
  rng = np.random.default_rng(2)
  features = np.abs(rng.standard_normal((40, 8))).astype(np.float32)
  pool = jax_seqgcn.Pool(np.arange(40) < 10, features=features)
  steps = 2 * jax_seqgcn.selection.GCN_CHUNK_STEPS + 1  # three chunks of equal compiled length
  seen, callback = _record()
  with progress.reporting(callback):
    jax_seqgcn.get_sampler("CoreGCN")(jax.random.key(0), pool, 5, steps=steps, hidden=8)
  assert [(stage, first, total) for stage, _, first, total in seen] == [
      ("gcn", 0, steps), ("gcn", 34, steps), ("gcn", 68, steps)]
  reported = np.concatenate([m["loss"] for _, m, _, _ in seen])
  whole = jax_seqgcn.train_gcn(jax.random.key(0), features, pool.labelled_mask, steps=steps,
                               hidden=8, chunk_steps=steps)  # one scan, no chunks
  np.testing.assert_array_equal(reported, np.asarray(whole.losses))  # bit for bit on CPU


def test_featprop_reports_each_k_medoids_sweep():
  rng = np.random.default_rng(3)
  features = np.abs(rng.standard_normal((200, 8))).astype(np.float32)  # as ReLU embeddings
  pool = jax_seqgcn.Pool(np.arange(200) < 20, features=features)
  seen, callback = _record()
  with progress.reporting(callback):
    picks = jax_seqgcn.get_sampler("FeatProp")(jax.random.key(0), pool, 12)
  assert seen and all(stage == "kmedoids" and total == 10 for stage, _, _, total in seen)
  assert [first for _, _, first, _ in seen] == list(range(len(seen)))
  assert all(sorted(m) == ["cost", "swaps"] for _, m, _, _ in seen)
  assert len(set(np.asarray(picks).tolist())) == 12
