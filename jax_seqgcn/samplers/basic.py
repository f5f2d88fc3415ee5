"""Random and CoreSet: the baselines that need no sampler training.

* `Random`: `budget` distinct unlabelled nodes uniformly at random (the reference draws with
  replacement and can pick duplicates; we don't). Needs no learner features.
* `CoreSet` (Sener & Savarese 2018): k-center greedy on the learner embeddings (not
  normalised), the labelled nodes as initial centres.
"""

import jax
import jax.numpy as jnp

from jax_seqgcn.selection.kcenter import k_center_greedy
from jax_seqgcn.selection.kcenter_sharded import k_center_greedy_sharded
from jax_seqgcn.selection.sharding import spans_devices
from jax_seqgcn.samplers import base


@jax.jit
def _random_scores(key, labelled_mask):
  return jnp.where(labelled_mask, -1.0, jax.random.uniform(key, labelled_mask.shape))


def random(key: jax.Array, features: jax.Array, labelled_mask: jax.Array, budget: int,
           **unused_options) -> jax.Array:
  """`budget` distinct unlabelled nodes uniformly at random (no replacement, unlike the reference).

  Args:
    key: PRNG key.
    features: [N, dim] or None; not used (kept so the features-first call works).
    labelled_mask: [N] bool.
    budget: number of picks.
  Returns:
    [budget] int32 indices of unlabelled nodes.
  """
  del features
  return _random(key, base.validate_pool(base.Pool(labelled_mask), budget), budget)


@base.register("Random", description="uniform without replacement over the unlabelled subset")
def _random(key, pool: base.Pool, budget: int) -> jax.Array:
  _, picks = jax.lax.top_k(_random_scores(key, jnp.asarray(pool.labelled_mask)), budget)
  return picks.astype(jnp.int32)


def coreset(key: jax.Array, features: jax.Array, labelled_mask: jax.Array, budget: int,
            **unused_options) -> jax.Array:
  """CoreSet: k-center greedy on the (not normalised) learner embeddings.

  Args:
    key: PRNG key, used only for a cold start (no labelled node).
    features: [N, dim] learner embeddings.
    labelled_mask: [N] bool; labelled nodes are the initial centres.
    budget: number of picks.
  Returns:
    [budget] int32 indices of unlabelled nodes in pick order.
  """
  pool = base.validate_pool(base.Pool(labelled_mask, features=features), budget, ("features",))
  return _coreset(key, pool, budget)


@base.register("CoreSet", needs=("features",),
               description="k-center greedy on the learner embeddings (Sener & Savarese 2018)")
def _coreset(key, pool: base.Pool, budget: int) -> jax.Array:
  mesh = base.current_mesh()
  if spans_devices(mesh):  # inside `base.on_mesh`: the same picks, the rows split over devices
    return k_center_greedy_sharded(pool.features, pool.labelled_mask, budget, mesh=mesh, key=key)
  return k_center_greedy(pool.features, pool.labelled_mask, budget, key=key)
