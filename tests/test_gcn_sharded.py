"""The sampler stage split over devices (selection.gcn_sharded, samplers.on_mesh) gives the
single-device results: on 8 fake CPU devices and on 2 processes (jax.distributed, gloo).

Float64 throughout, so that a float32 rounding of another summation order cannot flip a tie:
the trained GCN must agree to 1e-12 and the picks exactly. Each configuration runs once in a
subprocess (`XLA_FLAGS` must be set before JAX is imported) that saves its results to an npz.
"""

import numpy as np
import pytest

from tests.conftest import run_on_meshes

TIMEOUT = 300
NUM_NODES = 203  # not a multiple of 8 or 4: the padding rows are exercised
BUDGET = 12

_SCRIPT = r'''
import sys
import jax
jax.config.update("jax_enable_x64", True)
import numpy as np
from jax_seqgcn import samplers
from jax_seqgcn.selection import gcn_sharded
from jax_seqgcn.selection import graph
from jax_seqgcn.training import parallel

out, process_id, num_processes, address = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if num_processes > 1:
  parallel.initialize_distributed(address, num_processes, process_id)
rng = np.random.default_rng(0)
x = np.abs(rng.normal(size=(%(n)d, 16)))
mask = np.arange(%(n)d) >= 170
options = dict(steps=12, hidden=8, adjacency="factored")
pool = samplers.Pool(mask, features=x)
key = jax.random.key(1)
mesh = parallel.make_mesh()
results = {"devices": np.int32(jax.device_count()), "processes": np.int32(jax.process_count())}
trained = graph.train_gcn(key, x, mask, mesh=mesh, **options)
for name in ("scores", "embedding", "losses"):
  results["mesh/" + name] = np.asarray(getattr(trained, name))
results["mesh/kernel"] = np.asarray(trained.params["gc1"]["kernel"])
with samplers.on_mesh(mesh):
  for name in ("UncertainGCN", "CoreGCN", "CoreSet"):
    results["mesh/" + name] = np.asarray(samplers.get_sampler(name)(
        key, pool, %(budget)d, **({} if name == "CoreSet" else options)))
fused = gcn_sharded.build_graph_sharded(x, mesh)
for name in ("features", "propagated", "norms", "column_sums"):
  array = getattr(fused, name)
  results["rows/" + name] = np.asarray(
      [s.data.shape[0] for s in array.addressable_shards] + [array.shape[0]])
  results["bytes/" + name] = np.asarray(
      [s.data.nbytes for s in array.addressable_shards] + [array.nbytes])
if num_processes == 1:
  single = graph.train_gcn(key, x, mask, **options)
  for name in ("scores", "embedding", "losses"):
    results["single/" + name] = np.asarray(getattr(single, name))
  results["single/kernel"] = np.asarray(single.params["gc1"]["kernel"])
  for name in ("UncertainGCN", "CoreGCN", "CoreSet"):
    results["single/" + name] = np.asarray(samplers.get_sampler(name)(
        key, pool, %(budget)d, **({} if name == "CoreSet" else options)))
np.savez(out, **results)
''' % dict(n=NUM_NODES, budget=BUDGET)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return run_on_meshes(tmp_path_factory.mktemp("sharded_stage"), _SCRIPT, TIMEOUT)


def _assert_equal_to_single(run, single):
  """`run`'s split GCN agrees with `single`'s one-device GCN to 1e-12, and the picks are equal."""
  for name in ("scores", "embedding", "losses", "kernel"):
    np.testing.assert_allclose(run["mesh/" + name], single["single/" + name], rtol=1e-12,
                               atol=1e-14)
  for name in ("UncertainGCN", "CoreGCN", "CoreSet"):
    np.testing.assert_array_equal(run["mesh/" + name], single["single/" + name])


def test_eight_devices_give_the_single_device_training_and_picks(runs):
  eight = runs["eight"]
  assert eight["devices"] == 8
  _assert_equal_to_single(eight, eight)


def test_two_processes_give_the_single_device_results_on_both(runs):
  single = runs["eight"]
  for process in ("process0", "process1"):
    run = runs[process]
    assert run["processes"] == 2 and run["devices"] == 4
    _assert_equal_to_single(run, single)


def test_each_device_holds_one_share_of_the_node_arrays(runs):
  for name, devices_here in (("eight", 8), ("process0", 2)):
    shards = runs[name]["devices"]
    for array in ("features", "propagated", "norms", "column_sums"):
      *rows, total = runs[name]["rows/" + array]
      *nbytes, total_bytes = runs[name]["bytes/" + array]
      assert len(rows) == devices_here
      assert total == -(-NUM_NODES // shards) * shards  # padded to a multiple of the shards
      assert all(r == total // shards for r in rows)
      assert all(b * shards == total_bytes for b in nbytes)
