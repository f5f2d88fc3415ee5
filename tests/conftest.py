"""Shared fixtures and helpers of the tests.

* The reference outputs (`ref`): compact copies of the reference implementation's outputs in
  tests/data (see tests/data/README.md), from the public PyTorch reference run on fixed inputs;
  they are part of the repository, so these tests never skip. `features` and `features_l2` are
  rebuilt from a recipe and checked byte for byte against the reference's SHA-256.
* Jaxpr inspection: `shapes_in_jaxpr`, `has_square_array`.
* Tiny experiment runs: the `npz_path` fixture (a small synthetic set), `tiny_config`,
  `labelled_sets`, `FAST_SAMPLER_OPTIONS`.
* Tiny learners: `TinyBN`.
* Subprocesses: `ROOT`, `free_port`, `python_env`, `python_command`, `run_python`,
  `main_args`, `run_on_meshes`.
* One persistent XLA compilation cache per test session (`pytest_configure`): a fresh
  directory that the xdist workers and every subprocess (`experiments/main.py` included) share
  through `JAX_COMPILATION_CACHE_DIR`, so a program compiled by one of them is loaded by the
  others; removed at the end. A fresh one each time: a local run starts as cold as CI's.

Fixtures need no import; import the plain helpers with `from tests.conftest import ...` (a
subprocess can too when it runs with `python_env()`, which puts the repository root on its path).
"""

import functools
import hashlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

ROOT = pathlib.Path(__file__).resolve().parents[1]  # the repository root
_CACHE_DIR_ENV = "JAX_COMPILATION_CACHE_DIR"
_CACHE_MIN_SECONDS_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


def pytest_configure(config):
  """The session's compilation cache (module docstring). The xdist controller creates it before
  it starts the workers, which inherit the variables (JAX reads them at import)."""
  if hasattr(config, "workerinput"):
    return
  path = tempfile.mkdtemp(prefix="jax-seqgcn-tests-xla-")
  config.jax_seqgcn_cache_dir = path
  os.environ[_CACHE_DIR_ENV] = path
  os.environ[_CACHE_MIN_SECONDS_ENV] = "0.5"
  jax.config.update("jax_compilation_cache_dir", path)  # this process (a run without xdist)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_unconfigure(config):
  path = getattr(config, "jax_seqgcn_cache_dir", None)
  if path is not None:
    shutil.rmtree(path, ignore_errors=True)
DATA_DIR = ROOT / "tests" / "data"
# Reference layout: nodes 0..1999 unlabelled subset, 2000..2999 labelled.
NUM_NODES, NUM_UNLABELLED = 3000, 2000


class AdjacencySample(NamedTuple):
  """Entries adj[rows[k], cols[k]] == values[k] of the reference's dense [3000, 3000] adjacency."""
  rows: np.ndarray
  cols: np.ndarray
  values: np.ndarray


class AdjacencyProbe(NamedTuple):
  """`product` = adj (float64) @ `probe`, for the reference adjacency and a [3000, 5] probe."""
  probe: np.ndarray
  product: np.ndarray


def _sha256(array):
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _checked(name, array):
  expected = json.loads((DATA_DIR / "features.json").read_text())[name]
  if array.dtype != np.dtype(expected["dtype"]) or list(array.shape) != expected["shape"]:
    raise AssertionError(f"rebuilt {name}: {array.dtype}{array.shape}, expected "
                         f"{expected['dtype']}{expected['shape']}")
  if _sha256(array) != expected["sha256"]:
    raise AssertionError(f"rebuilt {name} differs from the reference (SHA-256 mismatch); "
                         f"recipe: {expected['recipe']}")
  return array


class Reference:
  """The reference outputs the tests compare against, loaded from tests/data on first use."""

  @functools.cached_property
  def features(self):
    """[3000, 512] float32, rebuilt from the recipe the reference inputs were made with."""
    return _checked("features", np.abs(
        np.random.default_rng(0).standard_normal((NUM_NODES, 512))).astype(np.float32))

  @functools.cached_property
  def features_l2(self):
    """[3000, 512] float32 L2-normalised rows, as the reference computed them."""
    norms = np.load(DATA_DIR / "features_l2_norms.npy")
    return _checked("features_l2", self.features / norms[:, None])

  @functools.cached_property
  def adj_sample(self):
    with np.load(DATA_DIR / "adj_sample.npz") as npz:
      return AdjacencySample(npz["rows"].astype(np.intp), npz["cols"].astype(np.intp),
                             npz["values"])

  @functools.cached_property
  def adj_probe(self):
    with np.load(DATA_DIR / "adj_sample.npz") as npz:
      return AdjacencyProbe(npz["probe"], npz["adj_times_probe"])

  @functools.cached_property
  def gcn_init(self):
    """Torch state_dict names -> initial GCN weights (the used gc1.*, gc3.*)."""
    return _load_npz("gcn_init.npz")

  @functools.cached_property
  def gcn_grad0(self):
    return _load_npz("gcn_grad0.npz")

  @functools.cached_property
  def gcn_outputs_by_step(self):
    return _load_npz("gcn_outputs_by_step.npz")

  @functools.cached_property
  def gcn_loss_all(self):
    return np.load(DATA_DIR / "gcn_loss_all.npy")

  @functools.cached_property
  def gcn_scores(self):
    return np.load(DATA_DIR / "gcn_scores.npy")

  @functools.cached_property
  def gcn_embedding(self):
    return _load_npz("gcn_embedding.npz")["gcn_embedding"]

  @functools.cached_property
  def _selections(self):
    return _load_npz("selections.npz")

  kcenter_idx = property(lambda self: self._selections["kcenter_idx"])
  kcenter_raw_idx = property(lambda self: self._selections["kcenter_raw_idx"])
  coregcn_idx = property(lambda self: self._selections["coregcn_idx"])
  uncertaingcn_idx = property(lambda self: self._selections["uncertaingcn_idx"])
  uncertaingcn_argsort = property(lambda self: self._selections["uncertaingcn_argsort"])

  @property
  def labelled_mask(self):
    mask = np.zeros(NUM_NODES, bool)
    mask[NUM_UNLABELLED:] = True
    return mask


def _load_npz(name):
  with np.load(DATA_DIR / name) as npz:
    return {key: npz[key] for key in npz.files}


@pytest.fixture(scope="session")
def ref():
  return Reference()


def shapes_in_jaxpr(jaxpr):
  """All array shapes of the variables in a closed jaxpr, sub-jaxprs included."""
  import jax.extend as jex  # pylint: disable=g-import-not-at-top
  del jex
  shapes = []

  def visit(jp):
    for eqn in jp.eqns:
      for var in list(eqn.outvars) + list(eqn.invars):
        aval = getattr(var, "aval", None)
        if aval is not None and hasattr(aval, "shape"):
          shapes.append(tuple(aval.shape))
      for param in eqn.params.values():
        for sub in (param if isinstance(param, (list, tuple)) else [param]):
          inner = getattr(sub, "jaxpr", sub)
          if hasattr(inner, "eqns"):
            visit(inner)

  visit(jaxpr.jaxpr)
  return shapes


def has_square_array(jaxpr, n):
  """True if any intermediate has two axes of size n (an N x N matrix)."""
  return any(sum(d == n for d in shape) >= 2 for shape in shapes_in_jaxpr(jaxpr))


# ----------------------------------------------------------------------------- tiny runs


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory):
  """A small synthetic classification set: 10 classes of noisy class-mean images."""
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 400)
  means = rng.integers(0, 256, (10, 28, 28, 1))
  images = np.clip(means[labels] + rng.normal(0, 40, (400, 28, 28, 1)), 0, 255).astype(np.uint8)
  path = tmp_path_factory.mktemp("data") / "tiny.npz"
  np.savez(path, images=images[:300], targets=labels[:300], test_images=images[300:],
           test_targets=labels[300:])
  return str(path)


def tiny_config(npz=None, **overrides):
  """configs/test.py with 1 trial of 1 epoch, on the npz file `npz` if given;
  `section__name=value` overrides set config.section.name (`name=value` a top-level field)."""
  from configs import test as test_config  # pylint: disable=import-outside-toplevel
  config = test_config.get_config()
  if npz:
    config.data.name, config.data.source, config.data.path = "npz", "npz", npz
  config.al.trials = 1
  config.train.epochs = 1
  for dotted, value in overrides.items():
    section, _, name = dotted.rpartition("__")
    (config[section] if section else config)[name] = value
  from jax_seqgcn import samplers  # pylint: disable=import-outside-toplevel
  sampler = samplers.SAMPLERS.get(config.sampler.name)
  if sampler is not None and "mc_probabilities" in sampler.needs and \
      "learner__mc_dropout" not in overrides:
    config.learner.mc_dropout = 0.5  # BALD's samplers need a learner with MC dropout
  return config


def labelled_sets(workdir, trial=0):
  """The labelled index sets a run saved for `trial`, one per cycle, in cycle order."""
  files = sorted((pathlib.Path(workdir) / "labelled").glob(f"trial{trial}_cycle*.npy"))
  return [np.load(f) for f in files]


# Small settings of the slow samplers' options (each sampler reads only its own).
FAST_SAMPLER_OPTIONS = dict(vaal_epochs=1, vaal_batch_size=16, vaal_width=0.125,
                            vaal_latent_dim=8)


# ----------------------------------------------------------------------------- tiny learners


class TinyBN(nn.Module):
  """Conv + BatchNorm learner with the common interface (8x8 inputs)."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, *, train):
    h = nn.Conv(4, (3, 3))(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(h)
    h = nn.relu(h)
    embedding = jnp.mean(h, axis=(1, 2))
    return nn.Dense(self.num_classes)(embedding), embedding, (h, h, h, h)


# ----------------------------------------------------------------------------- subprocesses


def free_port() -> int:
  """A TCP port of 127.0.0.1 that was free a moment ago (for a jax.distributed coordinator)."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def python_env(**overrides) -> dict:
  """This process's environment with the repository root first on PYTHONPATH (so a subprocess
  imports this checkout's `jax_seqgcn`, `configs` and `tests`), then `overrides` (str()-ed;
  None removes the variable)."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
  for name, value in overrides.items():
    if value is None:
      env.pop(name, None)
    else:
      env[name] = str(value)
  return env


def python_command(*args) -> list:
  """`[this interpreter, *args]`, every argument a str (for subprocess.Popen or run)."""
  return [sys.executable, *map(str, args)]


def run_python(*args, timeout=120, env=None, **kwargs) -> subprocess.CompletedProcess:
  """Runs `python *args` (e.g. a script and its flags, or "-c", code) to its end.

  Text stdout and stderr are captured, `env` defaults to `python_env()`, and a `timeout` (in
  seconds) turns a hang into an error; other keywords (cwd, check) go to `subprocess.run`.
  """
  return subprocess.run(python_command(*args), capture_output=True, text=True, timeout=timeout,
                        env=python_env() if env is None else env, **kwargs)


def main_args(workdir, *flags) -> list:
  """`python` arguments running `experiments/main.py` on configs/test.py and `workdir`, then
  `flags`: `run_python(*main_args(...))`, or `python_command(*main_args(...))` for Popen."""
  return [str(ROOT / "experiments" / "main.py"), f"--config={ROOT / 'configs' / 'test.py'}",
          f"--workdir={workdir}", *map(str, flags)]


def wait_all(procs, timeout: float, what: str = "hang in collectives or a barrier?") -> list:
  """Outputs of all `Popen`s (text, stderr merged); kills the rest and fails on a timeout or a
  non-zero exit."""
  outputs = []
  try:
    for proc in procs:
      output, _ = proc.communicate(timeout=timeout)
      assert proc.returncode == 0, f"process failed:\n{output}"
      outputs.append(output)
  except subprocess.TimeoutExpired:
    pytest.fail(f"process timed out ({what})")
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return outputs


def run_on_meshes(directory: pathlib.Path, script: str, timeout: float) -> dict:
  """Runs `script` on 8 fake CPU devices and as 2 processes x 2 devices (jax.distributed on
  localhost), all at once, and returns each run's saved npz as a dict: {"eight", "process0",
  "process1"}. The script gets `out process_id num_processes address` as arguments and must
  `np.savez(out, ...)`; with num_processes > 1 it calls `parallel.initialize_distributed`."""
  path = directory / "script.py"
  path.write_text(script)
  address = f"127.0.0.1:{free_port()}"
  configs = {"eight": (8, 0, 1, ""), "process0": (2, 0, 2, address),
             "process1": (2, 1, 2, address)}
  procs, outs = [], {}
  for name, (devices, process_id, num_processes, addr) in configs.items():
    outs[name] = directory / f"{name}.npz"
    env = python_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                     JAX_PLATFORMS="cpu")
    procs.append(subprocess.Popen(
        python_command(str(path), str(outs[name]), str(process_id), str(num_processes), addr),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  wait_all(procs, timeout)
  return {name: dict(np.load(out)) for name, out in outs.items()}
