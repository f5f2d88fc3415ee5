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
entropy_scores`); PowerBALD would reuse `power_sample` on BALD scores.
"""

import functools

import jax
import jax.numpy as jnp

from jax_seqgcn import checks
from jax_seqgcn.samplers import base
from jax_seqgcn.samplers import uncertainty

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
  labelled_mask = jnp.asarray(labelled_mask, bool)
  beta = jnp.asarray(beta, scores.dtype)
  positive_key, zero_key = jax.random.split(key)
  positive = scores > 0.0
  # 0^0 = 1: with beta = 0 every node has weight 1, and log weight 0 (not 0 * -inf = NaN).
  log_weights = jnp.where(beta == 0.0, 0.0, beta * jnp.log(jnp.where(positive, scores, 1.0)))
  tier = ~labelled_mask & (positive | (beta == 0.0))
  first = jax.lax.top_k(jnp.where(tier, log_weights + jax.random.gumbel(positive_key,
                                                                        scores.shape,
                                                                        scores.dtype),
                                  -jnp.inf), budget)[1]
  # Zero-weight unlabelled nodes, in a uniform random order, after the positive ones.
  zeros = ~labelled_mask & ~tier
  last = jax.lax.top_k(jnp.where(zeros, jax.random.uniform(zero_key, scores.shape), -1.0),
                       budget)[1]
  num_first = jnp.sum(tier)
  slot = jnp.arange(budget)
  picks = jnp.where(slot < num_first, first, last[jnp.clip(slot - num_first, 0, budget - 1)])
  return picks.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames="budget")
def _power_entropy(key, probabilities, labelled_mask, beta, *, budget):
  return power_sample(key, uncertainty.entropy_scores(probabilities), labelled_mask, budget, beta)


@base.register("PowerEntropy", needs=("probabilities",), options=OPTIONS, check=check_options,
               description="draws without replacement with probability proportional to "
                           "entropy^power_beta (Kirsch et al. 2023)")
def _power_entropy_sampler(key, pool: base.Pool, budget: int, *, power_beta) -> jax.Array:
  uncertainty.check_probabilities(pool.probabilities, "PowerEntropy")
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
