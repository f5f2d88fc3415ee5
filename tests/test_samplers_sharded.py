"""BADGE and the score-ranking samplers inside `samplers.on_mesh` give the single-device picks:
on 8 fake CPU devices and on 2 processes x 2 devices (jax.distributed, gloo).

N = 203 is not a multiple of 8 or 4 (padding rows), and rows 100..119 duplicate rows 0..19,
which are the most uncertain (largest entropy, BALD and predicted loss): the top-k must break
those ties by the lowest index across shards. BADGE runs in float64 (module docstring of
`samplers.badge_sharded`), and its duplicated row 3 has the largest gradient norm (a tie for the
first centre). A second pool of mostly one-hot probabilities exercises BADGE's uniform fallback
(every D^2 = 0) and the power samplers' zero-score tier. Each configuration runs once, in a
subprocess (`XLA_FLAGS` must be set before JAX is imported) that does every sampler and saves
the picks to an npz.
"""

import jax
import numpy as np
import pytest

from jax_seqgcn.samplers import badge
from jax_seqgcn.samplers import badge_sharded
from tests.conftest import run_on_meshes

TIMEOUT = 300
NUM_NODES = 203  # not a multiple of 8 or 4: the padding rows are exercised
BUDGET = 12
SAMPLERS = ("BADGE", "Entropy", "Margin", "LeastConfidence", "BALD", "PowerBALD",
            "PowerEntropy", "LearningLoss")

_SCRIPT = r'''
import sys
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
from jax_seqgcn import samplers
from jax_seqgcn.samplers import badge_sharded
from jax_seqgcn.training import parallel

out, process_id, num_processes, address = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if num_processes > 1:
  parallel.initialize_distributed(address, num_processes, process_id)
n, budget, names = %(n)d, %(budget)d, %(names)r
rng = np.random.default_rng(0)

def softmax(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)

features = np.abs(rng.normal(size=(n, 16)))
features[3] *= 10.0  # the largest gradient norm, duplicated at 103: a tie for BADGE's first pick
logits = rng.normal(size=(n, 5)) * 3.0
logits[:20] *= 0.05  # rows 0..19 the most uncertain, duplicated at 100..119: ties in the top-k
mc_logits = rng.normal(size=(4, n, 5)) * 2.0
mc_logits[:, :20] *= 1.5
losses = rng.random(n)
losses[:20] += 2.0
for array, axis in ((features, 0), (logits, 0), (mc_logits, 1), (losses, 0)):
  np.moveaxis(array, axis, 0)[100:120] = np.moveaxis(array, axis, 0)[:20]
probabilities, mc_probabilities = softmax(logits), softmax(mc_logits)
mask = np.zeros(n, bool)
mask[6::7] = True  # labelled nodes in every shard, 3 and 103 unlabelled
pool = samplers.Pool(mask, features=features, probabilities=probabilities,
                     mc_probabilities=mc_probabilities, predicted_losses=losses)
# Mostly one-hot: entropy 0 (PowerEntropy's zero tier) and gradient embeddings 0 (BADGE's
# uniform draws once the few others are picked); identical MC passes: BALD 0.
onehot = np.eye(5)[rng.integers(0, 5, n)]
onehot[[0, 40, 90, 150, 200]] = probabilities[[0, 40, 90, 150, 200]]
flat = samplers.Pool(mask, features=features, probabilities=onehot,
                     mc_probabilities=np.stack([onehot] * 3), predicted_losses=losses)
cases = [(name, name, pool) for name in names] + [
    (name + "/flat", name, flat) for name in ("BADGE", "PowerEntropy", "PowerBALD")]
key = jax.random.key(1)
mesh = parallel.make_mesh()
results = {"devices": np.int32(jax.device_count()), "processes": np.int32(jax.process_count())}
with samplers.on_mesh(mesh):
  for case, name, p in cases:
    results["mesh/" + case] = np.asarray(samplers.get_sampler(name)(key, p, budget))
rows = badge_sharded.layout(features, probabilities, mask, mesh)
for field in rows._fields:
  array = getattr(rows, field)
  results["rows/" + field] = np.asarray(
      [s.data.shape[0] for s in array.addressable_shards] + [array.shape[0]])
if num_processes == 1:
  for case, name, p in cases:
    results["single/" + case] = np.asarray(samplers.get_sampler(name)(key, p, budget))
np.savez(out, **results)
''' % dict(n=NUM_NODES, budget=BUDGET, names=SAMPLERS)

CASES = SAMPLERS + ("BADGE/flat", "PowerEntropy/flat", "PowerBALD/flat")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return run_on_meshes(tmp_path_factory.mktemp("sharded_samplers"), _SCRIPT, TIMEOUT)


def _assert_picks_equal(run, single):
  for case in CASES:
    np.testing.assert_array_equal(run["mesh/" + case], single["single/" + case], err_msg=case)


def test_eight_devices_give_the_single_device_picks(runs):
  eight = runs["eight"]
  assert eight["devices"] == 8
  _assert_picks_equal(eight, eight)


def test_two_processes_give_the_single_device_picks_on_both(runs):
  for process in ("process0", "process1"):
    run = runs[process]
    assert run["processes"] == 2 and run["devices"] == 4
    _assert_picks_equal(run, runs["eight"])


def test_the_cases_exercise_ties_and_both_tiers(runs):
  single = runs["eight"]
  for case in CASES:
    picks = single["single/" + case]
    assert len(set(picks.tolist())) == BUDGET and all(p % 7 != 6 for p in picks), case
  assert single["single/BADGE"][0] == 3  # first index of the tie 3 / 103
  for name in ("Entropy", "Margin", "LeastConfidence", "BALD", "LearningLoss"):
    picks = single["single/" + name].tolist()  # duplicated rows on two shards, both picked
    assert sum(p + 100 in picks for p in picks) >= 2, name
  # the flat pool has 4 unlabelled positive-entropy rows: the other draws are zero-tier
  assert sum(p in (0, 40, 90, 150, 200) for p in single["single/PowerEntropy/flat"]) == 4


def test_each_device_holds_one_share_of_the_badge_node_arrays(runs):
  for name, devices_here in (("eight", 8), ("process0", 2)):
    shards = runs[name]["devices"]
    for field in badge_sharded.BadgeRows._fields:
      *rows, total = runs[name]["rows/" + field]
      assert len(rows) == devices_here
      assert total == -(-NUM_NODES // shards) * shards
      assert all(r == total // shards for r in rows)


def test_badge_sharded_validates_and_matches_badge_on_one_device():
  rng = np.random.default_rng(2)
  features = rng.normal(size=(37, 6)).astype(np.float32)
  probabilities = rng.dirichlet(np.ones(4), 37).astype(np.float32)
  mask = np.arange(37) % 4 == 0
  key = jax.random.key(3)
  mesh = jax.make_mesh((1,), ("data",))
  np.testing.assert_array_equal(
      badge_sharded.badge_sharded(key, features, probabilities, mask, 9, mesh=mesh),
      badge.badge(key, features, probabilities, mask, 9))
  with pytest.raises(ValueError, match="budget"):
    badge_sharded.badge_sharded(key, features, probabilities, mask, 100, mesh=mesh)
  with pytest.raises(ValueError, match="C >= 2"):
    badge_sharded.badge_sharded(key, features, probabilities[:, :1], mask, 3, mesh=mesh)
