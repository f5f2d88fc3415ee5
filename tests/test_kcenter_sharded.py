"""Tests of jax_seqgcn.selection.kcenter_sharded: the same picks as `kcenter.k_center_greedy`.

The multi-device cases run once in a subprocess with 8 fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8` must be set before JAX is imported), which
saves every case's sharded and single-device picks to an npz; the tests below compare them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_seqgcn.selection import kcenter
from jax_seqgcn.selection import kcenter_sharded
from tests.conftest import has_square_array
from tests.conftest import python_env
from tests.conftest import run_python

TIMEOUT = 240  # seconds; a hang fails the test instead of blocking CI
REFERENCE_CASES = [("features_l2", "kcenter_idx"), ("features", "kcenter_raw_idx"),
                   ("gcn_embedding", "coregcn_idx")]

_SCRIPT = r'''
import sys
import jax
import numpy as np
from jax_seqgcn.selection import kcenter
from jax_seqgcn.selection import kcenter_sharded
from tests.conftest import Reference

assert jax.device_count() == 8, jax.devices()
out = sys.argv[1]
results = {}

def case(name, x, is_centre, budget, mesh=None, key=None, single=True):
  results[name + "/sharded"] = np.asarray(
      kcenter_sharded.k_center_greedy_sharded(x, is_centre, budget, mesh=mesh, key=key))
  if single:
    results[name + "/single"] = np.asarray(kcenter.k_center_greedy(x, is_centre, budget, key=key))

ref = Reference()
for features, expected in %(reference_cases)r:
  case("ref_" + features, getattr(ref, features), ref.labelled_mask, 200, single=False)

rng = np.random.default_rng(0)
x = rng.normal(size=(1003, 16)).astype(np.float32)  # N = 1003: 5 padding rows on 8 devices
few = np.zeros(1003, bool)
few[rng.choice(1003, 7, replace=False)] = True
many = rng.random(1003) < 0.6  # ~600 centres: three blocks of 256
case("random_few", x, few, 60)
case("random_many", x, many, 60)
case("cold_start", x, np.zeros(1003, bool), 60)
case("cold_start_key", x, np.zeros(1003, bool), 60, key=jax.random.key(7))
case("mesh_of_3", x, few, 60, mesh=jax.make_mesh((3,), ("data",), devices=jax.devices()[:3]))

# Ties: 101 rows drawn from 5 distinct points, every candidate picked (pads must never be).
points = rng.normal(size=(5, 3)).astype(np.float32)
duplicates = points[rng.integers(0, 5, 101)]
centres = np.zeros(101, bool)
centres[rng.choice(101, 10, replace=False)] = True
case("duplicates", duplicates, centres, 91)
case("all_equal", np.zeros((13, 3), np.float32), np.arange(13) == 0, 12)
np.savez(out, **results)
'''


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
  """Picks of every multi-device case, computed in one subprocess on 8 fake CPU devices."""
  tmp = tmp_path_factory.mktemp("kcenter_sharded")
  script, out = tmp / "run.py", tmp / "picks.npz"
  script.write_text(_SCRIPT % {"reference_cases": REFERENCE_CASES})
  env = python_env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = run_python(script, out, env=env, timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return dict(np.load(out))


@pytest.mark.parametrize("features, expected", REFERENCE_CASES)
def test_eight_devices_match_reference(ref, eight_devices, features, expected):
  np.testing.assert_array_equal(eight_devices[f"ref_{features}/sharded"], getattr(ref, expected))


@pytest.mark.parametrize("name", ["random_few", "random_many", "cold_start", "cold_start_key",
                                  "mesh_of_3", "duplicates", "all_equal"])
def test_eight_devices_match_single_device(eight_devices, name):
  sharded, single = eight_devices[name + "/sharded"], eight_devices[name + "/single"]
  assert sharded.dtype == np.int32
  np.testing.assert_array_equal(sharded, single)


def test_ties_pick_every_candidate_once(eight_devices):
  picks = eight_devices["duplicates/sharded"]
  assert len(set(picks.tolist())) == 91 and picks.max() < 101
  np.testing.assert_array_equal(eight_devices["all_equal/sharded"], np.arange(1, 13))


def _one_device_mesh():
  return jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])


def test_one_device_matches_reference(ref):
  picks = kcenter_sharded.k_center_greedy_sharded(ref.gcn_embedding, ref.labelled_mask, 200,
                                                  mesh=_one_device_mesh())
  np.testing.assert_array_equal(picks, ref.coregcn_idx)


@pytest.mark.parametrize("n_centres, key", [(0, None), (0, 3), (40, None)])
def test_one_device_matches_single_device(n_centres, key):
  rng = np.random.default_rng(n_centres)
  x = rng.normal(size=(300, 8)).astype(np.float32)
  is_centre = np.arange(300) < n_centres
  key = None if key is None else jax.random.key(key)
  np.testing.assert_array_equal(
      kcenter_sharded.k_center_greedy_sharded(x, is_centre, 30, mesh=_one_device_mesh(),
                                              key=key),
      kcenter.k_center_greedy(x, is_centre, 30, key=key))


def test_never_forms_an_n_by_n_array():
  n, mesh = 40, _one_device_mesh()
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  jaxpr = jax.make_jaxpr(lambda x, c: kcenter_sharded._greedy_sharded(  # pylint: disable=protected-access
      x, c, jnp.int32(-1), jnp.int32(n), budget=3, mesh=mesh, block=8))(
          jax.device_put(jnp.ones((n, 5)), sharding), jax.device_put(jnp.arange(n) > 30, sharding))
  assert not has_square_array(jaxpr, n)


@pytest.mark.parametrize("features, mask, budget, message", [
    (np.full((5, 2), np.nan), np.zeros(5, bool), 1, "NaN"),
    (np.ones((5, 2)), np.zeros(4, bool), 1, "shape"),
    (np.ones((5, 2)), np.ones(5, bool), 1, "empty"),
    (np.ones((5, 2)), np.array([1, 1, 0, 0, 0], bool), 4, "larger than"),
])
def test_bad_input(features, mask, budget, message):
  with pytest.raises(ValueError, match=message):
    kcenter_sharded.k_center_greedy_sharded(features, mask, budget, mesh=_one_device_mesh())


def test_mesh_needs_a_data_axis():
  mesh = jax.make_mesh((1,), ("model",), devices=jax.devices()[:1])
  with pytest.raises(ValueError, match="'data'"):
    kcenter_sharded.k_center_greedy_sharded(np.ones((5, 2)), np.zeros(5, bool), 1, mesh=mesh)
