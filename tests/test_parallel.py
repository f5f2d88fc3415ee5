"""Tests for jax_seqgcn.training.parallel: meshes, shardings, and data-parallel training.

The equivalence tests run training in subprocesses: 1 CPU device, 8 fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`, which must be set before JAX is
imported) and 2 processes on localhost joined by `jax.distributed` with gloo collectives.
All must end with the same parameters up to float summation order.
"""

import subprocess
import textwrap

import jax
import numpy as np
import pytest

from jax_seqgcn.training import parallel
from tests.conftest import free_port
from tests.conftest import python_command
from tests.conftest import python_env

TIMEOUT = 240  # seconds per subprocess; a hang fails the test instead of blocking CI

WORKER = textwrap.dedent('''
    """Trains a tiny BatchNorm net three ways and saves the results to an npz file."""
    import sys

    mode, out_path = sys.argv[1], sys.argv[2]
    if mode == "multihost":
      from jax_seqgcn.training import parallel
      parallel.initialize_distributed(sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))

    import jax
    import numpy as np
    from jax_seqgcn import training as train
    from jax_seqgcn.training import parallel
    from tests.conftest import TinyBN  # the repository root is on PYTHONPATH (python_env)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (100, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 100).astype(np.int32)
    mesh = parallel.make_mesh()
    spec = train.preprocessing_for("cifar10")
    model = TinyBN()
    results = {"devices": np.int32(jax.device_count()),
               "processes": np.int32(jax.process_count())}

    # 1. fit(): every process holds the whole labelled set; 100 examples, batch 32 (padded).
    state = train.fit(jax.random.key(0), model, images, labels, epochs=2, batch_size=32,
                      learning_rate=0.1, milestones=(1,), preprocessing=spec, mesh=mesh)
    for path, leaf in jax.tree_util.tree_leaves_with_path(
        parallel.to_host({"params": state.params, "batch_stats": state.batch_stats})):
      results["fit/" + jax.tree_util.keystr(path)] = leaf
    results["embeddings"] = train.extract_embeddings(state, model, images, np.arange(37),
                                                     batch_size=16, preprocessing=spec, mesh=mesh)
    results["accuracy"] = np.float64(train.evaluate(state, model, images, labels,
                                                    batch_size=16, preprocessing=spec, mesh=mesh))

    # 2. Stepwise: each process feeds only its rows of every global batch.
    state = train.init_train_state(jax.random.key(1), model, (8, 8, 3), mesh=mesh)
    step = train.make_train_step(model, preprocessing=spec, mesh=mesh)
    rows = parallel.local_rows(mesh, 32)
    for i in range(3):
      batch = slice(32 * i, 32 * i + 32)
      local = (images[batch][rows], labels[batch][rows], np.ones(32, np.float32)[rows])
      state, _ = step(state, *parallel.global_batch_from_local(mesh, local), jax.random.key(2))
    for path, leaf in jax.tree_util.tree_leaves_with_path(
        parallel.to_host({"params": state.params, "batch_stats": state.batch_stats})):
      results["steps/" + jax.tree_util.keystr(path)] = leaf

    # 3. A global batch that does not split over the devices is a clear error.
    try:
      train.fit(jax.random.key(0), model, images, labels, epochs=1, batch_size=12, mesh=mesh)
      results["divisible_error"] = np.bool_(False)
    except ValueError as err:
      results["divisible_error"] = np.bool_("multiple of the number of devices" in str(err))
    np.savez(out_path, **results)
    print("done", jax.process_index(), flush=True)
''')


def _launch(tmp_path, mode, out_name, *args, device_count=1):
  script = tmp_path / "worker.py"
  if not script.exists():
    script.write_text(WORKER)
  out = tmp_path / out_name
  env = python_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={device_count}",
                   JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(python_command(script, mode, out, *args), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  return proc, out


def _wait(procs):
  """Waits for all processes; kills the rest and fails on a timeout or an error."""
  try:
    for proc in procs:
      output, _ = proc.communicate(timeout=TIMEOUT)
      assert proc.returncode == 0, f"worker failed:\n{output}"
  except subprocess.TimeoutExpired:
    pytest.fail("worker timed out (hang in collectives?)")
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()


def _load(path):
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def _assert_same_training(got, expected):
  trained = [k for k in expected if k.startswith(("fit/", "steps/"))]
  assert trained and set(trained) <= set(got)
  for name in trained:
    np.testing.assert_allclose(got[name], expected[name], rtol=2e-4, atol=2e-5, err_msg=name)
  np.testing.assert_allclose(got["embeddings"], expected["embeddings"], rtol=2e-4, atol=2e-5)
  assert abs(got["accuracy"] - expected["accuracy"]) <= 0.02
  assert got["divisible_error"] == expected["divisible_error"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Single-device reference and the 8-fake-device run, launched concurrently."""
  tmp_path = tmp_path_factory.mktemp("parallel")
  jobs = [_launch(tmp_path, "local", "one.npz", device_count=1),
          _launch(tmp_path, "local", "eight.npz", device_count=8)]
  _wait([proc for proc, _ in jobs])
  return {"one": _load(jobs[0][1]), "eight": _load(jobs[1][1])}


def test_mesh_and_shardings():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == ("data",) and parallel.num_data_shards(mesh) == jax.device_count()
  assert parallel.replicated(mesh).spec == jax.sharding.PartitionSpec()
  assert parallel.data_sharding(mesh).spec == jax.sharding.PartitionSpec("data")
  batch = {"x": np.arange(12.0).reshape(4, 3)}
  sharded = parallel.shard_batch(mesh, batch)
  assert sharded["x"].sharding == parallel.data_sharding(mesh)
  np.testing.assert_array_equal(parallel.to_host(sharded)["x"], batch["x"])
  rep = parallel.replicate(mesh, (np.ones(3), 2.0))
  assert rep[0].sharding.is_fully_replicated
  assert parallel.local_rows(mesh, 4) == slice(0, 4)
  local = parallel.global_batch_from_local(mesh, batch)
  np.testing.assert_array_equal(np.asarray(local["x"]), batch["x"])
  assert parallel.is_main_process()
  with pytest.raises(ValueError, match="multiple of the number of devices"):
    parallel.check_divisible(mesh, 0)


def test_eight_devices_equal_one_device(runs):
  assert int(runs["one"]["devices"]) == 1 and int(runs["eight"]["devices"]) == 8
  assert bool(runs["eight"]["divisible_error"])  # 12 does not split over 8 devices
  assert not bool(runs["one"]["divisible_error"])
  for name in ("fit/['params']['Dense_0']['kernel']", "steps/['params']['Conv_0']['kernel']"):
    assert name in runs["one"]
  runs["eight"]["divisible_error"] = runs["one"]["divisible_error"]
  _assert_same_training(runs["eight"], runs["one"])


@pytest.mark.slow
def test_two_processes_equal_one_process(runs, tmp_path):
  address = f"127.0.0.1:{free_port()}"
  jobs = [_launch(tmp_path, "multihost", f"proc{i}.npz", address, 2, i) for i in range(2)]
  _wait([proc for proc, _ in jobs])
  first, second = (_load(out) for _, out in jobs)
  assert int(first["processes"]) == 2 and int(first["devices"]) == 2
  for name in first:  # both processes end with identical results
    np.testing.assert_array_equal(first[name], second[name], err_msg=name)
  _assert_same_training(first, runs["one"])
