"""Input validation shared by the public entry points: one clear ValueError before any work.

These run on the host (they look at values, e.g. for NaN), so they are called outside `jax.jit`.
"""

import jax.numpy as jnp
import numpy as np

# A column sum of S - I is a sum of N - 1 cosine similarities; below this fraction of N it is
# degenerate (orthogonal or all-zero feature rows) and dividing by it explodes (protocol §7).
COLUMN_SUM_TOLERANCE = 1e-6


def features(x, name: str = "features"):
  """[num_nodes, dim] finite float array (ints are cast to float32), else ValueError."""
  x = jnp.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"{name} must be [num_nodes, dim], got shape {x.shape}")
  if x.shape[0] == 0 or x.shape[1] == 0:
    raise ValueError(f"{name} is empty: shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  finite = np.asarray(jnp.isfinite(x).all(axis=1))
  if not finite.all():
    bad = np.flatnonzero(~finite)
    raise ValueError(f"{name} has NaN or inf in {bad.size} row(s), first at rows "
                     f"{bad[:5].tolist()}")
  return x


def mask(m, num_nodes: int, *, need_both: bool = False, name: str = "labelled_mask"):
  """[num_nodes] bool mask; with `need_both`, at least one True and one False."""
  m = jnp.asarray(m)
  if m.ndim != 1 or m.shape[0] != num_nodes:
    raise ValueError(f"{name} must have shape ({num_nodes},) to match the features, got "
                     f"{m.shape}")
  if m.dtype != jnp.bool_:
    if not np.isin(np.asarray(m), (0, 1)).all():
      raise ValueError(f"{name} must be boolean (or 0/1)")
    m = m.astype(bool)
  if need_both:
    n_true = int(m.sum())
    if n_true == 0 or n_true == num_nodes:
      raise ValueError(f"{name} needs both labelled and unlabelled nodes, got {n_true} "
                       f"labelled of {num_nodes}")
  return m


def column_sums(sums):
  """Raises if a column sum of V V^T - I is ~0 or negative (degenerate feature rows)."""
  sums = np.asarray(sums)
  if sums.shape[0] < 2:
    raise ValueError(f"the similarity graph needs at least 2 nodes, got {sums.shape[0]}")
  bad = np.flatnonzero(~(sums > COLUMN_SUM_TOLERANCE * sums.shape[0]))
  if bad.size:
    raise ValueError(
        f"{bad.size} feature row(s) make a column sum of the similarity matrix zero or "
        f"negative (first at rows {bad[:5].tolist()}, sums {sums[bad[:3]].tolist()}): all-zero "
        "rows or rows orthogonal to all others cannot be normalised (reference aff_to_adj "
        "divides by these sums)")


def budget(budget: int, num_candidates: int):
  """Raises unless 1 <= budget <= num_candidates."""
  if num_candidates == 0:
    raise ValueError("the unlabelled pool is empty: nothing to select from")
  if not isinstance(budget, (int, np.integer)) or budget < 1:
    raise ValueError(f"budget must be a positive int, got {budget!r}")
  if budget > num_candidates:
    raise ValueError(f"budget {budget} is larger than the {num_candidates} unlabelled "
                     "candidates")


def is_int(value) -> bool:
  """A Python or NumPy integer, not a bool (for option checks)."""
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_real(value) -> bool:
  """A Python or NumPy int or float, not a bool (NaN and inf included; range checks follow)."""
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def is_finite_real(value) -> bool:
  """`is_real` and finite."""
  return is_real(value) and bool(np.isfinite(value))
