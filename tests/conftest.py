"""Shared fixtures: compact copies of the reference implementation's outputs in tests/data.

The files in tests/data (see tests/data/README.md) come from the public PyTorch reference run on
fixed inputs; they are part of the repository, so these tests never skip. `features` and
`features_l2` are rebuilt from a recipe and checked byte for byte against the reference's SHA-256.
"""

import functools
import hashlib
import json
import pathlib
from typing import NamedTuple

import numpy as np
import pytest

DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"
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
