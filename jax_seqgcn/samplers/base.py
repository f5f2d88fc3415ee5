"""What every sampler shares: the `Pool` it sees, the `Sampler` record, and the registry.

A sampler is called as `sampler(key, pool, budget, **options) -> [budget] int32` and returns
`budget` distinct indices of unlabelled nodes of `pool`. A `Pool` carries what the loop knows
about the N nodes (the loop orders them as the reference does: the unlabelled candidates first,
then the labelled set; any order works):

* `labelled_mask` [N] bool, always;
* `features` [N, D] learner embeddings (eval mode); any real dtype, computed in float32
  (float16 and bfloat16 are upcast: in float16 the GCN's training overflows);
* `images` [N, H, W, C] float32 images after the learner's eval preprocessing;
* `predicted_losses` [N] outputs of a loss-prediction module trained with the learner;
* `probabilities` [N, C] the learner's softmax outputs;
* `mc_probabilities` [T, N, C] T softmax outputs with MC dropout before the learner's head
  (BALD; `training.mc_dropout_probabilities`).

Each registered sampler declares which of the optional fields it `needs`, so the loop computes
only those (Random needs none, so it costs no embedding pass), and which `options` it takes, with
their defaults: the single place those defaults live (configs/default.py reads them from here).
Every option name is one flat `config.sampler.<name>` field, so ablations are command-line flags.
"""

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any, Callable, Dict, FrozenSet, Mapping, NamedTuple, Optional

import jax
import numpy as np

from jax_seqgcn import checks

POOL_FIELDS = ("features", "images", "predicted_losses", "probabilities", "mc_probabilities")

# The mesh of `on_mesh` (None: one device).
_MESH = contextvars.ContextVar("jax_seqgcn_sampler_mesh", default=None)


@contextlib.contextmanager
def on_mesh(mesh):
  """Within this block, the samplers that can split the nodes over devices do so over `mesh`'s
  axis 'data', each device holding N / devices rows of the node arrays:
  * UncertainGCN and CoreGCN (the factored two-layer GCN, `graph.train_gcn(mesh=)`), and the
    k-center of CoreGCN and CoreSet (`k_center_greedy_sharded`);
  * BADGE (`badge_sharded`: its k-means++ seeding; the same picks in float64, in float32 a draw
    can differ where the summation order of the weights flips it);
  * FeatProp (its factored propagation, one [dim, dim] all-reduce per hop, and
    `k_medoids_sharded`; the same picks in float64);
  * Entropy, Margin, LeastConfidence, BALD, PowerBALD, PowerEntropy and LearningLoss (each
    device scores its rows; a global top-k gives the single-device picks, ties included).
  The others (Random, VAAL, TypiClust, ProbCover, ClusterMargin, UncertainDiscriminator) run on
  one device. In a multi-process run every process must enter it with the run's global mesh and
  call the sampler (one SPMD program; the picks are the same everywhere). None, or a mesh of
  one device in one process, changes nothing.

  Example:
    with samplers.on_mesh(parallel.make_mesh()):
      picks = samplers.get_sampler("CoreGCN")(key, pool, budget)
  """
  token = _MESH.set(mesh)
  try:
    yield mesh
  finally:
    _MESH.reset(token)


def current_mesh():
  """The mesh of the innermost `on_mesh` block, or None."""
  return _MESH.get()


class Pool(NamedTuple):
  """The nodes a sampler chooses from.

  Attributes:
    labelled_mask: [N] bool (or 0/1), True for labelled nodes.
    features: optional [N, D] learner embeddings; float16 and bfloat16 are upcast to
      float32 (the samplers compute in float32).
    images: optional [N, H, W, C] float32 preprocessed images.
    predicted_losses: optional [N] predicted losses (Learning Loss).
    probabilities: optional [N, C] class probabilities (rows sum to 1).
    mc_probabilities: optional [T, N, C] class probabilities of T MC-dropout passes (BALD).
  """
  labelled_mask: Any
  features: Optional[Any] = None
  images: Optional[Any] = None
  predicted_losses: Optional[Any] = None
  probabilities: Optional[Any] = None
  mc_probabilities: Optional[Any] = None

  @property
  def num_nodes(self) -> int:
    return int(np.shape(self.labelled_mask)[0])


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A registered sampler.

  Attributes:
    name: registry name.
    fn: `fn(key, pool, budget, **options) -> [budget] int32`, called with a validated pool.
    needs: the optional `Pool` fields it reads (a subset of `POOL_FIELDS`).
    options: option name -> default; `__call__` rejects any other name.
    check: optional `check(options)` raising ValueError for bad option values.
    description: one line for listings (README, `--help`).
    training: optional `training(options, epochs) -> dict` of extra `training.fit` keyword
      arguments the sampler needs from the learner's training (Learning Loss: its jointly
      trained LossNet); see `training_kwargs`.
  """
  name: str
  fn: Callable[..., jax.Array]
  needs: FrozenSet[str]
  options: Mapping[str, Any]
  check: Optional[Callable[[Mapping[str, Any]], None]] = None
  description: str = ""
  training: Optional[Callable[[Mapping[str, Any], int], Dict[str, Any]]] = None

  def training_kwargs(self, options: Mapping[str, Any], epochs: int) -> Dict[str, Any]:
    """What the learner's `training.fit` must add for this sampler ({} for most samplers).

    Args:
      options: the sampler's resolved options.
      epochs: the learner's number of epochs.
    """
    return {} if self.training is None else dict(self.training(options, epochs))

  def resolve_options(self, options: Mapping[str, Any]) -> Dict[str, Any]:
    """`options` over the defaults, checked; a ValueError names unknown or bad options."""
    unknown = sorted(set(options) - set(self.options))
    if unknown:
      raise ValueError(f"unknown option(s) {unknown} for sampler {self.name!r}; valid: "
                       f"{sorted(self.options)}")
    resolved = {**self.options, **options}
    if self.check is not None:
      self.check(resolved)
    return resolved

  def __call__(self, key: jax.Array, pool: Pool, budget: int, **options) -> jax.Array:
    """Picks `budget` distinct unlabelled nodes of `pool`.

    Args:
      key: PRNG key.
      pool: a `Pool` holding at least the fields in `self.needs`.
      budget: number of picks, 1 <= budget <= number of unlabelled nodes.
      **options: sampler options (see `self.options` for names and defaults).
    Returns:
      [budget] int32 node indices.
    Raises:
      ValueError: a missing or malformed pool field, a bad budget, a bad option.
    """
    if not isinstance(pool, Pool):
      raise TypeError(f"sampler {self.name!r} takes a samplers.Pool, got {type(pool).__name__}; "
                      "e.g. Pool(labelled_mask, features=features)")
    resolved = self.resolve_options(options)
    pool = validate_pool(pool, budget, self.needs, name=self.name)
    return self.fn(key, pool, budget, **resolved)


SAMPLERS: Dict[str, Sampler] = {}


def register(name: str, *, needs=(), options: Optional[Mapping[str, Any]] = None,
             check=None, description: str = "", training=None):
  """Decorator adding `fn(key, pool, budget, **options)` to `SAMPLERS` under `name`."""
  unknown = set(needs) - set(POOL_FIELDS)
  if unknown:
    raise ValueError(f"unknown pool field(s) {sorted(unknown)}; valid: {POOL_FIELDS}")

  def decorate(fn):
    if name in SAMPLERS:
      raise ValueError(f"sampler {name!r} is already registered")
    SAMPLERS[name] = Sampler(name, fn, frozenset(needs), dict(options or {}), check,
                             description, training)
    return fn

  return decorate


def get_sampler(name: str) -> Sampler:
  """The sampler registered under `name` (one of `SAMPLERS`), else a ValueError listing them."""
  if name not in SAMPLERS:
    raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLERS)}")
  return SAMPLERS[name]


def all_options() -> Dict[str, Any]:
  """Every option of every registered sampler with its default (one flat namespace).

  Raises:
    RuntimeError: two samplers give one option name different defaults.
  """
  merged: Dict[str, Any] = {}
  for sampler in SAMPLERS.values():
    for option, default in sampler.options.items():
      if option in merged and merged[option] != default:
        raise RuntimeError(f"option {option!r} has two defaults: {merged[option]!r} and "
                           f"{default!r} ({sampler.name})")
      merged[option] = default
  return merged


def validate_pool(pool: Pool, budget: int, needs=(), *, name: str = "sampler") -> Pool:
  """Checks `pool` and `budget` on the host; returns the pool with a bool mask.

  The returned pool's features are a float32 jax.Array (float16, bfloat16 and ints upcast:
  every sampler computes in float32), its probabilities and predicted losses float32 NumPy
  arrays; values are checked in their own precision before that cast (`checks.finite_rows`).

  Raises:
    ValueError: a needed field missing, a field whose first dimension is not N, a field that
      does not hold real numbers (e.g. dtype object), non-finite values or values beyond
      float32 range, probabilities that are not distributions, or a budget outside
      [1, number of unlabelled nodes] (a bool is not a budget).
  """
  labelled_mask = np.asarray(pool.labelled_mask)
  if labelled_mask.ndim != 1:
    raise ValueError(f"labelled_mask must be [num_nodes], got shape {labelled_mask.shape}")
  num_nodes = labelled_mask.shape[0]
  labelled_mask = np.asarray(checks.mask(labelled_mask, num_nodes))
  fields = {}
  for field in POOL_FIELDS:
    value = getattr(pool, field)
    if value is None:
      if field in needs:
        raise ValueError(f"{name} needs pool.{field}, which is missing")
      continue
    fields[field] = _check_field(field, value, num_nodes)
  checks.budget(budget, int(num_nodes - labelled_mask.sum()))
  return Pool(labelled_mask, **fields)


def _check_field(field: str, value, num_nodes: int):
  rank = {"features": 2, "images": 4, "predicted_losses": 1, "probabilities": 2,
          "mc_probabilities": 3}[field]
  node_axis = 1 if field == "mc_probabilities" else 0  # [T, N, C]
  shape = np.shape(value)
  if len(shape) != rank or shape[node_axis] != num_nodes:
    raise ValueError(f"pool.{field} must have rank {rank} and {num_nodes} nodes on axis "
                     f"{node_axis} (one per node of labelled_mask), got shape {shape}")
  if field == "features":
    return checks.features(value, f"pool.{field}")
  if field == "images":
    # Only the dtype here: the values are checked by the learner's (or VAAL's) own input
    # validation; large, left on the host.
    checks.numeric(value, f"pool.{field}")
    return value
  array = checks.host_float32(value, f"pool.{field}", " (did the learner diverge?)")
  if field in ("probabilities", "mc_probabilities") and (
      (array < 0).any() or not np.allclose(array.sum(axis=-1), 1.0, atol=1e-3)):
    raise ValueError(f"pool.{field} must be non-negative rows summing to 1 (softmax "
                     "outputs, not logits)")
  return array


def unlabelled_indices(pool: Pool) -> np.ndarray:
  """[U] int indices of the unlabelled nodes, ascending."""
  return np.flatnonzero(~np.asarray(pool.labelled_mask))


@functools.partial(jax.jit, static_argnames="budget")
def top_unlabelled(scores: jax.Array, labelled_mask: jax.Array, budget: int) -> jax.Array:
  """The `budget` unlabelled nodes with the largest `scores` (ties: lowest index first).

  Args:
    scores: [N] float; NaN is not allowed (callers check).
    labelled_mask: [N] bool.
    budget: static int.
  Returns:
    [budget] int32, largest score first.
  """
  masked = jax.numpy.where(labelled_mask, -jax.numpy.inf, scores)
  return jax.lax.top_k(masked, budget)[1].astype(jax.numpy.int32)
