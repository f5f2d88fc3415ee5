"""Uncertainty baselines on the learner's class probabilities: Entropy, Margin, LeastConfidence.

Each ranks the unlabelled nodes by one number computed from its softmax row p [C] and takes the
`budget` most uncertain (ties: lowest index first); none is random, the key is accepted only for
the common sampler signature.

* `Entropy`: the largest entropy -sum_c p_c log p_c (a zero probability contributes 0).
* `Margin`: the smallest margin p_(1) - p_(2) between the two most probable classes.
* `LeastConfidence`: the smallest confidence max_c p_c.

The score functions (`entropy_scores`, `margin_scores`, `confidence_scores`) return those
quantities themselves, so they can be logged or plotted; which end is picked is stated in each.
Regression learners have no class probabilities, so these samplers refuse them (ValueError).

Inside `samplers.on_mesh(mesh)` over several devices (or processes) the scores are computed with
the nodes split over the mesh axis 'data' (`selection.sharding.map_rows`: each device scores
its N / devices rows) and the top `budget` is found with a global top-k (`sharding.
global_top_k`); the picks are the single-device picks exactly, ties included, since each row's
score does not depend on the split.
"""

import functools
from typing import Callable, Dict, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jax_seqgcn.samplers import base
from jax_seqgcn.selection import sharding


def entropy_scores(probabilities: jax.Array) -> jax.Array:
  """Entropy of each row, in nats; `Entropy` picks the largest.

  Args:
    probabilities: [N, C] rows summing to 1; exact zeros are allowed (0 log 0 = 0).
  Returns:
    [N] float, in [0, log C].
  """
  chex.assert_rank(probabilities, 2)
  # entr(x) = -x log x with entr(0) = 0: no 0 * -inf = NaN for confident rows.
  return jnp.sum(jax.scipy.special.entr(probabilities), axis=-1)


def margin_scores(probabilities: jax.Array) -> jax.Array:
  """Largest minus second-largest probability of each row; `Margin` picks the smallest.

  Args:
    probabilities: [N, C] rows summing to 1, C >= 2.
  Returns:
    [N] float, in [0, 1].
  """
  chex.assert_rank(probabilities, 2)
  top_two = jax.lax.top_k(probabilities, 2)[0]
  return top_two[:, 0] - top_two[:, 1]


def confidence_scores(probabilities: jax.Array) -> jax.Array:
  """Largest probability of each row; `LeastConfidence` picks the smallest.

  Args:
    probabilities: [N, C] rows summing to 1.
  Returns:
    [N] float, in [1 / C, 1].
  """
  chex.assert_rank(probabilities, 2)
  return jnp.max(probabilities, axis=-1)


# Rule name -> (score function, sign that makes "larger = picked first"). Negation is exact, so
# the order of the scores is kept bit for bit (1 - score would round distinct values together).
_RULES: Dict[str, Tuple[Callable[[jax.Array], jax.Array], float]] = {
    "Entropy": (entropy_scores, 1.0),
    "Margin": (margin_scores, -1.0),
    "LeastConfidence": (confidence_scores, -1.0),
}


@functools.partial(jax.jit, static_argnames=("rule", "budget"))
def _select(probabilities, labelled_mask, *, rule, budget):
  score_fn, sign = _RULES[rule]
  scores = sign * score_fn(probabilities.astype(jnp.promote_types(probabilities.dtype,
                                                                  jnp.float32)))
  return base.top_unlabelled(scores, labelled_mask, budget)


def _local_select(probabilities, available, *, rule, budget):
  """`_select` on one shard of the rows (inside `sharding.map_rows`): [budget] global picks."""
  score_fn, sign = _RULES[rule]
  scores = sign * score_fn(probabilities.astype(jnp.promote_types(probabilities.dtype,
                                                                  jnp.float32)))
  return sharding.top_available(scores, available, budget=budget)


def check_probabilities(probabilities, name: str):
  """Raises a ValueError unless `probabilities` looks like [N, C >= 2] class probabilities.

  Catches what the pool validation lets through: a missing field (a regression learner) and a
  single column (a regression output or a sigmoid that happens to be all ones).
  """
  if probabilities is None:
    raise ValueError(f"{name} needs class probabilities (pool.probabilities [N, C], a "
                     "classification learner's softmax outputs); regression learners have none: "
                     "use one that needs only features (e.g. CoreSet)")
  shape = np.shape(probabilities)
  if len(shape) != 2 or shape[1] < 2:
    raise ValueError(f"{name} needs class probabilities [N, C] with C >= 2 classes, got shape "
                     f"{shape} (regression outputs are not class probabilities)")


def _pick(rule, pool: base.Pool, budget: int) -> jax.Array:
  check_probabilities(pool.probabilities, rule)
  mesh = base.current_mesh()
  if sharding.spans_devices(mesh):  # inside `base.on_mesh`: the rows split over the devices
    return jnp.asarray(sharding.map_rows(
        _local_select, mesh, (pool.probabilities, ~np.asarray(pool.labelled_mask, bool)),
        rule=rule, budget=int(budget)))
  return _select(jnp.asarray(pool.probabilities), jnp.asarray(pool.labelled_mask), rule=rule,
                 budget=int(budget))


def _plain(rule, probabilities, labelled_mask, budget):
  check_probabilities(probabilities, rule)
  pool = base.validate_pool(base.Pool(labelled_mask, probabilities=probabilities), budget,
                            ("probabilities",), name=rule)
  return _pick(rule, pool, budget)


def entropy(key: jax.Array, probabilities: jax.Array, labelled_mask: jax.Array,
            budget: int) -> jax.Array:
  """Entropy sampling: the `budget` unlabelled nodes with the largest predictive entropy.

  Args:
    key: PRNG key; not used (the rule is deterministic), kept for the sampler signature.
    probabilities: [N, C] softmax outputs, C >= 2.
    labelled_mask: [N] bool.
    budget: number of picks, 1 <= budget <= number of unlabelled nodes.
  Returns:
    [budget] int32 node indices, most uncertain first.
  Raises:
    ValueError: missing or malformed probabilities, a bad mask or budget.
  """
  del key
  return _plain("Entropy", probabilities, labelled_mask, budget)


def margin(key: jax.Array, probabilities: jax.Array, labelled_mask: jax.Array,
           budget: int) -> jax.Array:
  """Margin sampling: the `budget` unlabelled nodes with the smallest top-1 minus top-2 gap.

  Args and returns: as `entropy`.
  """
  del key
  return _plain("Margin", probabilities, labelled_mask, budget)


def least_confidence(key: jax.Array, probabilities: jax.Array, labelled_mask: jax.Array,
                     budget: int) -> jax.Array:
  """Least-confidence sampling: the `budget` unlabelled nodes with the smallest max probability.

  Args and returns: as `entropy`.
  """
  del key
  return _plain("LeastConfidence", probabilities, labelled_mask, budget)


@base.register("Entropy", needs=("probabilities",),
               description="largest predictive entropy of the learner's softmax")
def _entropy(key, pool: base.Pool, budget: int) -> jax.Array:
  del key
  return _pick("Entropy", pool, budget)


@base.register("Margin", needs=("probabilities",),
               description="smallest gap between the two most probable classes")
def _margin(key, pool: base.Pool, budget: int) -> jax.Array:
  del key
  return _pick("Margin", pool, budget)


@base.register("LeastConfidence", needs=("probabilities",),
               description="smallest probability of the predicted class")
def _least_confidence(key, pool: base.Pool, budget: int) -> jax.Array:
  del key
  return _pick("LeastConfidence", pool, budget)
