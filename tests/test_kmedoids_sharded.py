"""k-medoids and FeatProp with the nodes split over devices (selection.kmedoids_sharded,
samplers.on_mesh) give the single-device results: on 8 fake CPU devices and on 2 processes
(jax.distributed, gloo) of 2 devices each.

Float64 throughout, so that a rounding of another summation order cannot flip a near-tie: the
medoids, sweeps, swaps and per-sweep reports must be equal and the costs agree to 1e-12. Each
configuration runs once in a subprocess (`XLA_FLAGS` must be set before JAX is imported) that
saves its results to an npz. All cases share one shape, k and block: one compile each.
"""

import jax
import numpy as np
import pytest

from jax_seqgcn.selection import kmedoids
from jax_seqgcn.selection import kmedoids_sharded
from tests.test_featprop import _points
from tests.test_featprop import best_swap_change
from tests.test_featprop import numpy_cost
from tests.conftest import run_on_meshes

TIMEOUT = 300
# Not a multiple of 8 or 4 (padding rows); ~283 candidates: two swap blocks of 256 per sweep.
NUM_NODES, DIM, K = 333, 5, 7
CASES = ("random", "duplicates")
SPLIT = ("features", "sq_norms", "candidate", "dist", "nearest", "d1", "second", "d2")

_SCRIPT = r'''
import sys
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
from jax_seqgcn import samplers
from jax_seqgcn.selection import kmedoids
from jax_seqgcn.selection import kmedoids_sharded
from jax_seqgcn.selection import sharding
from jax_seqgcn.training import parallel

out, process_id, num_processes, address = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if num_processes > 1:
  parallel.initialize_distributed(address, num_processes, process_id)
n, k = %(n)d, %(k)d
rng = np.random.default_rng(0)
x = np.abs(rng.normal(size=(n, %(dim)d)))
candidate = rng.random(n) < 0.85
# Rows drawn from 40 distinct points (k < 40: no exact tie between medoids).
duplicates = np.abs(rng.normal(size=(40, %(dim)d)))[rng.integers(0, 40, n)]
cases = {"random": x, "duplicates": duplicates}
key = jax.random.key(3)
mesh = parallel.make_mesh()
results = {"devices": np.int32(jax.device_count()), "processes": np.int32(jax.process_count())}

def record(prefix, run):
  reports = []
  result = run(lambda *report: reports.append(report))
  for name, value in result._asdict().items():
    results[prefix + name] = np.asarray(value)
  results[prefix + "reports"] = np.asarray(reports)

for name, features in cases.items():
  record("mesh/" + name + "/", lambda on_sweep: kmedoids_sharded.k_medoids_sharded(
      key, features, candidate, k, mesh=mesh, on_sweep=on_sweep))
pool = samplers.Pool(~candidate, features=x)
with samplers.on_mesh(mesh):
  results["mesh/FeatProp"] = np.asarray(samplers.get_sampler("FeatProp")(key, pool, k))
# The split arrays, as k_medoids_sharded lays them out (same compiled program: cached).
num_rows = sharding.padded_rows(n, mesh)
key_data, key_impl = sharding.key_parts(key)
prepared, state = kmedoids_sharded._setup(
    key_data, sharding.shard_rows(mesh, x, num_rows), sharding.shard_rows(mesh, candidate, num_rows),
    k=k, num_nodes=n, mesh=mesh, key_impl=key_impl)
for name, array in {**prepared._asdict(), **state._asdict()}.items():
  if array.ndim:
    results["rows/" + name] = np.asarray(
        [s.data.shape[0] for s in array.addressable_shards] + [array.shape[0]])
if num_processes == 1:
  for name, features in cases.items():
    record("single/" + name + "/", lambda on_sweep: kmedoids.k_medoids(
        key, features, candidate, k, on_sweep=on_sweep))
  results["single/FeatProp"] = np.asarray(samplers.get_sampler("FeatProp")(key, pool, k))
np.savez(out, **results)
''' % dict(n=NUM_NODES, dim=DIM, k=K)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return run_on_meshes(tmp_path_factory.mktemp("kmedoids_sharded"), _SCRIPT, TIMEOUT)


def _assert_equal_to_single(run, single):
  for case in CASES:
    mesh, one = f"mesh/{case}/", f"single/{case}/"
    for name in ("medoids", "sweeps", "swaps", "converged"):
      np.testing.assert_array_equal(run[mesh + name], single[one + name], err_msg=case + name)
    np.testing.assert_allclose(run[mesh + "cost"], single[one + "cost"], rtol=1e-12)
    reports, expected = run[mesh + "reports"], single[one + "reports"]
    np.testing.assert_array_equal(reports[:, [0, 2]], expected[:, [0, 2]])  # sweeps, swaps
    np.testing.assert_allclose(reports[:, 1], expected[:, 1], rtol=1e-12)  # cost
  np.testing.assert_array_equal(run["mesh/FeatProp"], single["single/FeatProp"])


def test_eight_devices_give_the_single_device_medoids_and_picks(runs):
  eight = runs["eight"]
  assert eight["devices"] == 8
  _assert_equal_to_single(eight, eight)
  for case in CASES:  # a real run: several sweeps and swaps, converged
    assert eight[f"single/{case}/converged"] and eight[f"single/{case}/swaps"] > 0
    assert len(eight[f"single/{case}/reports"]) >= 2
  assert len(set(eight["mesh/FeatProp"].tolist())) == K


def test_two_processes_give_the_single_device_results_on_both(runs):
  for process in ("process0", "process1"):
    run = runs[process]
    assert run["processes"] == 2 and run["devices"] == 4
    _assert_equal_to_single(run, runs["eight"])


def test_each_device_holds_one_share_of_the_node_arrays(runs):
  for name, devices_here in (("eight", 8), ("process0", 2)):
    shards = runs[name]["devices"]
    padded = -(-NUM_NODES // shards) * shards
    for array in SPLIT:
      *rows, total = runs[name]["rows/" + array]
      assert len(rows) == devices_here and total == padded, array
      assert all(r == padded // shards for r in rows), array
    *rows, total = runs[name]["rows/order"]  # replicated: 4 bytes per node
    assert total == NUM_NODES and all(r == NUM_NODES for r in rows)
    *rows, _ = runs[name]["rows/medoids"]
    assert all(r == K for r in rows)


def test_one_device_mesh_in_float32_is_swap_optimal():
  x, candidate = _points(1)
  result = kmedoids_sharded.k_medoids_sharded(jax.random.key(0), x, candidate, 4)  # 1 device
  medoids = np.asarray(result.medoids)
  assert medoids.dtype == np.int32 and len(set(medoids.tolist())) == 4
  assert candidate[medoids].all() and bool(result.converged) and int(result.swaps) > 0
  cost = numpy_cost(x, candidate, medoids)
  np.testing.assert_allclose(float(result.cost), cost, rtol=1e-5)
  assert best_swap_change(x, candidate, medoids) >= -1e-5 * cost


@pytest.mark.parametrize("kwargs, message", [
    (dict(features=np.zeros((4,))), "num_nodes, dim"),
    (dict(features=np.full((4, 2), np.nan)), "NaN or inf"),
    (dict(candidate_mask=np.zeros(4, bool)), "selects no node"),
    (dict(candidate_mask=np.ones(3, bool)), "shape"),
    (dict(k=5), "k must be"),
    (dict(max_sweeps=-1), "max_sweeps"),
    (dict(rel_tol=1.0), "rel_tol"),
    (dict(block=0), "block"),
    (dict(mesh=jax.make_mesh((1,), ("model",))), "axis 'data'"),
])
def test_rejects_bad_input_as_k_medoids(kwargs, message):
  args = dict(features=np.ones((4, 2)), candidate_mask=np.ones(4, bool), k=2)
  args.update(kwargs)
  mesh = args.pop("mesh", None)
  with pytest.raises(ValueError, match=message):
    kmedoids_sharded.k_medoids_sharded(jax.random.key(0), mesh=mesh, **args)
  if mesh is None:  # the same error from the one-device version
    with pytest.raises(ValueError, match=message):
      kmedoids.k_medoids(jax.random.key(0), **args)
