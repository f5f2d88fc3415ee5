"""The sampler's similarity graph: its adjacency, dense or factored, and how to choose.

Protocol §3 (paper Eq. 4, reference `aff_to_adj`):

* `normalized_adjacency`: A = (S - I) D^-1 + I with S = V V^T over L2-normalised rows V and
  D = diag of the column sums of S - I (columns normalised, exactly as the reference; the paper
  writes D^-1 (S - I)). Computed with a broadcast divide: O(N^2 m), never O(N^3).
* `factored_adjacency` / `propagate`: the same operator applied without forming it,
  A X = V (V^T (X / d)) - X / d + X, in O(N m k) time and O(N (m + k)) memory.
* `choose_adjacency`: what "auto" resolves to, the same in every process of a run.
* The ablations' `IdentityAdjacency` ("Eye") and `OnesAdjacency` ("Ones").

Every product asks for full float32 (`HIGHEST`) on every backend (see `selection/__init__.py`).
"""

import logging
import os
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jax_seqgcn import checks

# Full float32 products on every backend (TPU: not bfloat16 passes); see selection/__init__.py.
HIGHEST = jax.lax.Precision.HIGHEST
_LOG = logging.getLogger(__name__)


class FactoredAdjacency(NamedTuple):
  """The normalised adjacency of protocol §3 kept in factored form (no N x N array).

  Attributes:
    unit_features: [num_nodes, dim] L2-normalised node features V.
    column_sums: [num_nodes] d = column sums of V V^T - I.
  """
  unit_features: jax.Array
  column_sums: jax.Array


class IdentityAdjacency(NamedTuple):
  """A = I: each node sees only itself, so the GCN is an MLP (the paper's "Eye" ablation)."""


class OnesAdjacency(NamedTuple):
  """The similarity S replaced by all ones, through the same normalisation (the "Ones" ablation).

  A = (1 1^T - I) / (N - 1) + I: every node adds the mean of all other nodes to itself.
  Applied matrix-free: A x = (sum(x) - x) / (N - 1) + x.
  """


Adjacency = Union[jax.Array, FactoredAdjacency, IdentityAdjacency, OnesAdjacency]


# "identity" and "ones" are ablations: they ignore the features' similarity.
ADJACENCY_MODES = ("auto", "dense", "factored", "identity", "ones")


# Dense training holds about this many N x N arrays at once (similarity, adjacency, temporaries).
_DENSE_COPIES = 3


def available_memory_bytes(device: Optional[jax.Device] = None) -> int:
  """Memory the dense adjacency may use: the accelerator's limit, or the host's free RAM.

  Args:
    device: the device to ask; None = this process's first local device (never a remote one:
      `jax.devices()[0]` belongs to process 0 in a multi-process run).
  """
  device = device or jax.local_devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def agreed_memory_bytes() -> int:
  """`available_memory_bytes()` of the process with the least, so every process of a run makes
  the same "auto" choice (a collective: every process must call it; no-op in one process)."""
  local = available_memory_bytes()
  if jax.process_count() == 1:
    return local
  return int(np.min(multihost_utils.process_allgather(np.asarray(local, np.int64))))


def choose_adjacency(num_nodes: int, dim: int, dtype=jnp.float32, *,
                     memory_bytes: Optional[int] = None) -> str:
  """The adjacency mode "auto" resolves to: the cheaper one that fits.

  Both modes apply the same operator. Per training step the dense form streams the N x N
  matrix twice (forward and backward of the second layer: ~2 N^2 values) while the factored
  form streams V four times (~4 N dim); the one-off A V costs N^2 dim against 2 N dim^2. So
  factored is chosen when 2 dim < N, and always when ~3 dense N x N arrays would not fit in half
  the available memory (logged, since that is the reference's failure mode on large pools).

  Args:
    num_nodes: N.
    dim: feature dimension.
    dtype: feature dtype.
    memory_bytes: override of `agreed_memory_bytes()` (the least free memory of any process,
      so that every process of a multi-process run chooses the same mode).
  Returns:
    "dense" or "factored".
  """
  memory_bytes = agreed_memory_bytes() if memory_bytes is None else memory_bytes
  needed = _DENSE_COPIES * num_nodes ** 2 * jnp.dtype(dtype).itemsize
  if needed > memory_bytes // 2:
    _LOG.warning("adjacency: dense N=%d needs ~%.1f GB of %.1f GB available; using the factored "
                 "(matrix-free) form", num_nodes, needed / 1e9, memory_bytes / 1e9)
    return "factored"
  return "factored" if 2 * dim < num_nodes else "dense"


def l2_normalize(features: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows divided by their L2 norm (torch `F.normalize`: x / max(|x|, eps)).

  Args:
    features: [num_nodes, dim] float array.
    eps: lower bound on the norm.
  Returns:
    [num_nodes, dim] array of the same dtype.
  """
  norm = jnp.linalg.norm(features, axis=-1, keepdims=True)
  return features / jnp.maximum(norm, eps)


def column_sums(unit_features: jax.Array) -> jax.Array:
  """[N] column sums of S - I for [N, m] L2-normalised rows (D of the adjacency)."""
  # Column sums of V V^T - I without the N x N matrix: V (V^T 1) - 1.
  return jnp.matmul(unit_features, jnp.sum(unit_features, axis=0), precision=HIGHEST) - 1.0


@jax.jit
def _dense_adjacency(unit_features):
  similarity = jnp.matmul(unit_features, unit_features.T, precision=HIGHEST)
  eye = jnp.eye(similarity.shape[0], dtype=similarity.dtype)
  off_diagonal = similarity - eye
  # Broadcast divide of column j by its sum: the reference's (S - I) D^-1 without the O(N^3) product.
  return off_diagonal / jnp.sum(off_diagonal, axis=0)[None, :] + eye


def normalized_adjacency(features: jax.Array) -> jax.Array:
  """Dense normalised similarity graph of protocol §3 (reference `aff_to_adj`).

  Rows of `features` are L2-normalised to V; S = V V^T - I; each column j is divided by its sum
  d_j; then I is added back, so every column of A sums to 2.

  Args:
    features: [num_nodes, dim] float node features (learner embeddings).
  Returns:
    [num_nodes, num_nodes] adjacency A of the features' dtype.
  Raises:
    ValueError: non-finite features, fewer than 2 nodes, or rows that make a column sum ~0.
  """
  unit = l2_normalize(checks.features(features))
  checks.column_sums(column_sums(unit))
  return _dense_adjacency(unit)


def factored_adjacency(features: jax.Array) -> FactoredAdjacency:
  """The operator of `normalized_adjacency` in factored form: O(N dim) memory.

  Args:
    features: [num_nodes, dim] float node features.
  Returns:
    `FactoredAdjacency` with `propagate(adj, x)` equal to `normalized_adjacency(features) @ x`.
  Raises:
    ValueError: as `normalized_adjacency`.
  """
  unit = l2_normalize(checks.features(features))
  sums = column_sums(unit)
  checks.column_sums(sums)
  return FactoredAdjacency(unit, sums)


def propagate(adjacency: Adjacency, x: jax.Array) -> jax.Array:
  """Applies the normalised adjacency to node signals: A @ x.

  Args:
    adjacency: dense [N, N] array, or a `FactoredAdjacency`.
    x: [N, k] node signals.
  Returns:
    [N, k] array A @ x. The factored form computes V (V^T (x / d)) - x / d + x.
  """
  if isinstance(adjacency, IdentityAdjacency):
    return x
  if isinstance(adjacency, OnesAdjacency):
    return (jnp.sum(x, axis=0, keepdims=True) - x) / (x.shape[0] - 1) + x
  if isinstance(adjacency, FactoredAdjacency):
    scaled = x / adjacency.column_sums[:, None]
    unit = adjacency.unit_features
    return (jnp.matmul(unit, jnp.matmul(unit.T, scaled, precision=HIGHEST), precision=HIGHEST)
            - scaled + x)
  return jnp.matmul(adjacency, x, precision=HIGHEST)


def build_adjacency(unit_features: jax.Array, mode: str) -> Adjacency:
  """The adjacency of a resolved `mode` ("dense", "factored", "identity", "ones") over [N, m]
  L2-normalised rows."""
  if mode == "identity":
    return IdentityAdjacency()
  if mode == "ones":
    return OnesAdjacency()
  if mode == "dense":
    return _dense_adjacency(unit_features)
  return FactoredAdjacency(unit_features, column_sums(unit_features))
