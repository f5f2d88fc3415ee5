"""Shared fixtures: the reference implementation's outputs in ../shared/reference."""

import os
import pathlib

import numpy as np
import pytest

REFERENCE_DIR = pathlib.Path(os.environ.get(
    "JAX_SEQGCN_REFERENCE",
    pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference"))
# Reference layout (README.txt): nodes 0..1999 unlabelled subset, 2000..2999 labelled.
NUM_NODES, NUM_UNLABELLED = 3000, 2000


class Reference:
  """Lazy loader of the reference files: `ref.adj`, `ref.gcn_init`, ..."""

  def __getattr__(self, name):
    for suffix in (".npy", ".npz"):
      path = REFERENCE_DIR / (name + suffix)
      if path.exists():
        value = np.load(path)
        if suffix == ".npz":
          value = dict(value)
        setattr(self, name, value)
        return value
    raise AttributeError(name)

  @property
  def labelled_mask(self):
    mask = np.zeros(NUM_NODES, bool)
    mask[NUM_UNLABELLED:] = True
    return mask


@pytest.fixture(scope="session")
def ref():
  if not (REFERENCE_DIR / "README.txt").exists():
    if os.environ.get("CI"):
      pytest.fail(f"reference outputs not found at {REFERENCE_DIR}")
    pytest.skip(f"reference outputs not found at {REFERENCE_DIR} (set JAX_SEQGCN_REFERENCE)")
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
