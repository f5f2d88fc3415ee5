"""Input validation shared by the public entry points: one clear ValueError before any work.

These run on the host (they look at values, e.g. for NaN), so they are called outside `jax.jit`.
"""

import jax
import jax.numpy as jnp
import numpy as np

# A column sum of S - I is a sum of N - 1 cosine similarities; below this fraction of N it is
# degenerate (orthogonal or all-zero feature rows) and dividing by it explodes (protocol §7).
COLUMN_SUM_TOLERANCE = 1e-6
# The largest finite float32 (3.4e38): wider values become inf in the samplers' float32.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def numeric(x, name: str):
  """`x` as an array whose dtype holds real numbers (bool, int or float), else ValueError.

  A `jax.Array` stays on its device and a NumPy array is not copied; anything else (a list) is
  made a NumPy array. Object, string and complex arrays are refused here, by name, instead of
  failing later inside JAX (an object array is a TypeError there).
  """
  if not isinstance(x, (np.ndarray, jax.Array)):
    x = np.asarray(x)
  dtype = x.dtype
  # jnp.issubdtype, not dtype.kind: bfloat16 (ml_dtypes) has kind "V" but is a float.
  if not (dtype == np.bool_ or jnp.issubdtype(dtype, jnp.integer)
          or jnp.issubdtype(dtype, jnp.floating)):
    raise ValueError(f"{name} must hold real numbers (bool, int or float), got dtype {dtype}")
  return x


def finite_rows(x, name: str, hint: str = "") -> None:
  """Raises unless every value of `x` [N, ...] is finite and within float32 range.

  Checked in `x`'s own precision (NumPy on the host, JAX on its device), before any cast: a
  float64 1e300 is reported as beyond float32 range, not as the inf a cast would make of it
  (with an overflow RuntimeWarning). Values beyond float32 range are refused whatever the
  dtype, since the samplers compute in float32.

  Args:
    x: [N, ...] array from `numeric`.
    name: what `x` is, for the message.
    hint: appended to the NaN/inf message (e.g. " (did the learner diverge?)").
  """
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return  # ints and bools are finite, and int64's range is far inside float32's
  xp = np if isinstance(x, np.ndarray) else jnp
  rows = x.reshape(x.shape[0], -1)
  finite = np.asarray(xp.isfinite(rows).all(axis=1))
  if not finite.all():
    bad = np.flatnonzero(~finite)
    raise ValueError(f"{name} has NaN or inf in {bad.size} row(s), first at rows "
                     f"{bad[:5].tolist()}{hint}")
  # By bits, not finfo.max > FLOAT32_MAX: that comparison itself overflows float16.
  if jnp.finfo(x.dtype).bits > 32:
    inside = np.asarray((xp.abs(rows) <= FLOAT32_MAX).all(axis=1))
    if not inside.all():
      bad = np.flatnonzero(~inside)
      raise ValueError(f"{name} has values beyond float32 range (max 3.4e38) in {bad.size} "
                       f"row(s), first at rows {bad[:5].tolist()}; the samplers compute in "
                       "float32: rescale it")


def features(x, name: str = "features"):
  """[num_nodes, dim] finite float array, at least float32, else ValueError.

  Ints, bools, float16 and bfloat16 are cast to float32: the samplers compute in float32 (in
  float16 a GCN's training overflows and looks diverged), as `jax-seqgcn select` reads a
  FEATURES file. A float64 array stays float64 only where JAX runs in 64 bits.

  Args:
    x: [num_nodes, dim] real numbers (NumPy, JAX or a nested list).
    name: what `x` is, for the messages.
  Returns:
    [num_nodes, dim] jax.Array, float32 (or float64 with jax_enable_x64).
  Raises:
    ValueError: another rank, an empty array, a non-numeric dtype (object, string, complex),
      NaN or inf, values beyond float32 range.
  """
  x = numeric(x, name)
  if x.ndim != 2:
    raise ValueError(f"{name} must be [num_nodes, dim], got shape {x.shape}")
  if x.shape[0] == 0 or x.shape[1] == 0:
    raise ValueError(f"{name} is empty: shape {x.shape}")
  finite_rows(x, name)
  # device_put, not jnp.asarray: one copy of a NumPy array instead of two (none for a 64-byte
  # aligned one on CPU), which matters for [1.28M, 512] features (2.6 GB each).
  x = jax.device_put(x) if isinstance(x, np.ndarray) else jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating) or jnp.finfo(x.dtype).bits < 32:
    x = x.astype(jnp.float32)
  return x


def host_float32(x, name: str, hint: str = "") -> np.ndarray:
  """`x` [N, ...] as a float32 NumPy array, checked first by `numeric` and `finite_rows`."""
  x = numeric(x, name)
  finite_rows(x, name, hint)
  return np.asarray(x, np.float32)


def mask(m, num_nodes: int, *, need_both: bool = False, name: str = "labelled_mask"):
  """[num_nodes] bool mask; with `need_both`, at least one True and one False."""
  m = jnp.asarray(numeric(m, name))
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
  # Not `isinstance(budget, int)`: True is an int, and a budget of True is a mistake, not 1.
  if not is_int(budget) or budget < 1:
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
