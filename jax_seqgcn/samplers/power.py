"""Power sampling (Kirsch et al. 2023, "Stochastic Batch Acquisition"): PowerEntropy.

Top-k acquisition takes the `budget` best-scored nodes; power acquisition instead draws `budget`
distinct unlabelled nodes, each draw with probability proportional to score^beta among the nodes
not drawn yet (as baal's `PowerSampling`). `power_sample` does the draw for any score, by the
Gumbel top-k trick: the `budget` largest beta * log(score_i) + G_i, with G_i i.i.d. standard
Gumbel noise from `key`, are such a draw (Plackett-Luce; for budget 1, node i is drawn with
probability score_i^beta / sum_j score_j^beta exactly).

* beta = 1 (the default) is the paper's power acquisition; beta = 0 draws uniformly (Random);
  beta -> infinity approaches top-k (Entropy).
* A score of 0 (or below: rounding) has weight 0^beta = 0: log 0 = -inf never makes a NaN here;
  such nodes come after every positive-score node, in a uniform random order (from `key`), and
  are drawn only when the budget exceeds the positive-score nodes. With beta = 0 every
  unlabelled node has weight 1 (0^0 = 1).

`PowerEntropy` scores the learner's predictive entropy -sum_c p_c log p_c (`uncertainty.
entropy_scores`); PowerBALD reuses `power_sample` on BALD scores.

Inside `samplers.on_mesh(mesh)` over several devices (or processes), both score the nodes split
over the mesh axis 'data' and rank them with global top-k (`power_sample_on_mesh`); the [N]
noise is drawn as on one device (`power_noise`), so the picks are the single-device picks.
"""

import functools
from typing import Callable, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_seqgcn import checks
from jax_seqgcn.samplers import base
from jax_seqgcn.samplers import uncertainty
from jax_seqgcn.selection import sharding

DEFAULT_BETA = 1.0
OPTIONS = dict(power_beta=DEFAULT_BETA)


def check_options(options) -> None:
  """ValueError unless `power_beta` is a finite number >= 0 (a bool is refused).

  Shared by every power sampler (PowerEntropy, PowerBALD), so the message names the option only.
  """
  beta = options.get("power_beta", DEFAULT_BETA)
  if not checks.is_finite_real(beta) or beta < 0:
    raise ValueError(f"bad power sampling option: power_beta must be a finite number >= 0 "
                     f"(0: uniform, 1: the paper's power acquisition), got {beta!r}")


def power_noise(key: jax.Array, num_nodes: int, dtype) -> Tuple[jax.Array, jax.Array]:
  """The random numbers of `power_sample(key, scores, ...)` for N = `num_nodes` scores.

  Args:
    key: PRNG key.
    num_nodes: static int N.
    dtype: the scores' float dtype (at least float32).
  Returns:
    ([N] standard Gumbel noise in `dtype`, [N] uniforms in the default float dtype): the
    positive scores' perturbations and the zero-weight nodes' random order.
  """
  positive_key, zero_key = jax.random.split(key)
  return (jax.random.gumbel(positive_key, (num_nodes,), dtype),
          jax.random.uniform(zero_key, (num_nodes,)))


def _power_picks(scores, labelled_mask, beta, gumbel, uniform, *, budget, top_k, count):
  """The draw of `power_sample` from its noise; `top_k(values, k) -> [k] indices` and
  `count(mask) -> int` over all nodes (one device: `lax.top_k` and `jnp.sum`; a split pool:
  `sharding.global_top_k` and a `psum`)."""
  beta = jnp.asarray(beta, scores.dtype)
  positive = scores > 0.0
  # 0^0 = 1: with beta = 0 every node has weight 1, and log weight 0 (not 0 * -inf = NaN).
  log_weights = jnp.where(beta == 0.0, 0.0, beta * jnp.log(jnp.where(positive, scores, 1.0)))
  tier = ~labelled_mask & (positive | (beta == 0.0))
  first = top_k(jnp.where(tier, log_weights + gumbel, -jnp.inf), budget)
  # Zero-weight unlabelled nodes, in a uniform random order, after the positive ones.
  zeros = ~labelled_mask & ~tier
  last = top_k(jnp.where(zeros, uniform, -1.0), budget)
  num_first = count(tier)
  slot = jnp.arange(budget)
  picks = jnp.where(slot < num_first, first, last[jnp.clip(slot - num_first, 0, budget - 1)])
  return picks.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames="budget")
def power_sample(key: jax.Array, scores: jax.Array, labelled_mask: jax.Array, budget: int,
                 beta=DEFAULT_BETA) -> jax.Array:
  """`budget` distinct unlabelled nodes drawn in turn with probability proportional to score^beta.

  Traceable and jitted (one compile per shape and budget; `beta` is traced, so changing it does
  not recompile). The caller checks the inputs (see `PowerEntropy`).

  Args:
    key: PRNG key: the Gumbel noise.
    scores: [N] finite scores; <= 0 is weight 0 (module docstring).
    labelled_mask: [N] bool; labelled nodes are never drawn.
    budget: static int, 1 <= budget <= number of unlabelled nodes.
    beta: float >= 0, the power.
  Returns:
    [budget] int32 node indices in draw order.
  """
  scores = jnp.asarray(scores)
  scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
  gumbel, uniform = power_noise(key, scores.shape[0], scores.dtype)
  return _power_picks(scores, jnp.asarray(labelled_mask, bool), beta, gumbel, uniform,
                      budget=budget, top_k=lambda v, k: jax.lax.top_k(v, k)[1], count=jnp.sum)


_power_noise_jit = jax.jit(power_noise, static_argnames=("num_nodes", "dtype"))


def _local_power(node_values, available, gumbel, uniform, beta, *, score, budget):
  """`power_sample` on one shard of the rows (inside `sharding.map_rows`): [budget] picks."""
  scores = score(node_values)
  scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
  return _power_picks(scores, ~available, beta, gumbel, uniform, budget=budget,
                      top_k=lambda v, k: sharding.global_top_k(v, k)[1],
                      count=lambda m: jax.lax.psum(jnp.sum(m), sharding.DATA_AXIS))


def power_sample_on_mesh(mesh, key: jax.Array, score: Callable[[jax.Array], jax.Array],
                         node_values, labelled_mask, budget: int, beta=DEFAULT_BETA, *,
                         node_axis: int = 0) -> jax.Array:
  """`power_sample(key, score(node_values), labelled_mask, budget, beta)` with the nodes split
  over `mesh`'s axis 'data': the same picks.

  Each device scores its N / devices rows; the two top-k are global (`sharding.global_top_k`,
  ties: lowest index first). The [N] noise is drawn on each process's host side exactly as
  `power_sample` draws it (`power_noise`, the same key), then split like the rows.

  Args:
    mesh: a mesh with an axis 'data' (several devices or processes).
    key: PRNG key, as `power_sample`'s.
    score: a module-level function (it is a static argument: a new lambda recompiles) mapping
      one shard of `node_values` to its [n_local] scores, row by row (e.g.
      `uncertainty.entropy_scores`, `bald.bald_scores`).
    node_values: host array with the N nodes on axis `node_axis` (e.g. [N, C] probabilities,
      [T, N, C] MC-dropout probabilities with node_axis 1), the same on every process.
    labelled_mask: [N] bool host array.
    budget: int, 1 <= budget <= number of unlabelled nodes.
    beta: float >= 0.
    node_axis: the node axis of `node_values`.
  Returns:
    [budget] int32 node indices in draw order, the same on every process.
  """
  labelled_mask = np.asarray(labelled_mask, bool)
  shape = list(np.shape(node_values))
  shape[node_axis] = 1  # the dtype of the scores only
  dtype = jax.eval_shape(score, jax.ShapeDtypeStruct(
      tuple(shape), jax.dtypes.canonicalize_dtype(np.result_type(node_values)))).dtype
  dtype = jnp.promote_types(dtype, jnp.float32)
  gumbel, uniform = _power_noise_jit(key, num_nodes=labelled_mask.shape[0], dtype=dtype)
  return jnp.asarray(sharding.map_rows(
      _local_power, mesh, (node_values, ~labelled_mask, np.asarray(gumbel), np.asarray(uniform)),
      (np.asarray(beta, dtype),), axes=(node_axis, 0, 0, 0), score=score, budget=int(budget)))


@functools.partial(jax.jit, static_argnames="budget")
def _power_entropy(key, probabilities, labelled_mask, beta, *, budget):
  return power_sample(key, uncertainty.entropy_scores(probabilities), labelled_mask, budget, beta)


@base.register("PowerEntropy", needs=("probabilities",), options=OPTIONS, check=check_options,
               description="draws without replacement with probability proportional to "
                           "entropy^power_beta (Kirsch et al. 2023)")
def _power_entropy_sampler(key, pool: base.Pool, budget: int, *, power_beta) -> jax.Array:
  uncertainty.check_probabilities(pool.probabilities, "PowerEntropy")
  mesh = base.current_mesh()
  if sharding.spans_devices(mesh):  # inside `base.on_mesh`: the rows split, the same picks
    return power_sample_on_mesh(mesh, key, uncertainty.entropy_scores, pool.probabilities,
                                pool.labelled_mask, int(budget), float(power_beta))
  return _power_entropy(key, jnp.asarray(pool.probabilities), jnp.asarray(pool.labelled_mask),
                        float(power_beta), budget=int(budget))


def power_entropy(key: jax.Array, probabilities: jax.Array, labelled_mask: jax.Array,
                  budget: int, **options) -> jax.Array:
  """PowerEntropy on a probabilities array: the registered sampler's picks.

  Args:
    key: PRNG key.
    probabilities: [N, C] softmax outputs, C >= 2.
    labelled_mask: [N] bool.
    budget: number of picks, 1 <= budget <= number of unlabelled nodes.
    **options: `power_beta` (default 1.0).
  Returns:
    [budget] int32 distinct unlabelled node indices, in draw order.
  Raises:
    ValueError: missing or malformed probabilities, a bad mask, budget or option.
  """
  uncertainty.check_probabilities(probabilities, "PowerEntropy")
  return base.SAMPLERS["PowerEntropy"](key, base.Pool(labelled_mask, probabilities=probabilities),
                                       budget, **options)
