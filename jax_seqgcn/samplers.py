"""Active learning samplers with one shared signature, and a registry by name.

Every sampler is `sampler(key, features, labelled_mask, budget, **options) -> [budget] int32`:
`features` [N, dim] are learner embeddings of N nodes (the reference orders them as the unlabelled
subset first, then the labelled set, but any order works), `labelled_mask` [N] marks the labelled
ones, and the result holds `budget` distinct indices of unlabelled nodes. Options a sampler does
not use are ignored, so a loop can pass one options dict to any of them.

* `random`: uniform without replacement (the reference draws *with* replacement, which can pick
  duplicates; we don't: SPEC §5).
* `coreset`: k-center greedy on the raw embeddings, labelled nodes as centres (SPEC §4).
* `uncertain_gcn`: train the GCN, pick the unlabelled nodes whose score is closest to s_margin
  (SPEC §3, Eq. 7 as the reference applies it).
* `core_gcn`: train the GCN, k-center greedy on its embedding concat(hidden, logit) (Eq. 8).
"""

from typing import Callable, Dict

import chex
import jax
import jax.numpy as jnp

from jax_seqgcn import checks
from jax_seqgcn import graph
from jax_seqgcn.kcenter import k_center_greedy

Sampler = Callable[..., jax.Array]

# Options of the GCN samplers, with the reference's defaults (SPEC §3).
GCN_DEFAULTS = dict(hidden=128, dropout_rate=0.3, num_layers=2, lambda_=1.2, steps=200,
                    learning_rate=1e-3, weight_decay=5e-4, adjacency="auto")


def _validate(features, labelled_mask, budget, *, need_labelled=False):
  features = checks.features(features)
  labelled_mask = checks.mask(labelled_mask, features.shape[0])
  num_unlabelled = int(features.shape[0] - jnp.sum(labelled_mask))
  checks.budget(budget, num_unlabelled)
  if need_labelled and num_unlabelled == features.shape[0]:
    raise ValueError("this sampler needs at least one labelled node")
  return features, labelled_mask


def _gcn_options(options):
  unknown = set(options) - set(GCN_DEFAULTS) - {"s_margin"}
  if unknown:
    raise ValueError(f"unknown GCN sampler option(s) {sorted(unknown)}; valid: "
                     f"{sorted(GCN_DEFAULTS) + ['s_margin']}")
  return {k: options.get(k, v) for k, v in GCN_DEFAULTS.items()}


@jax.jit
def _random_scores(key, labelled_mask):
  return jnp.where(labelled_mask, -1.0, jax.random.uniform(key, labelled_mask.shape))


def random(key: jax.Array, features: jax.Array, labelled_mask: jax.Array, budget: int,
           **unused_options) -> jax.Array:
  """`budget` distinct unlabelled nodes uniformly at random (no replacement, unlike the reference).

  Args:
    key: PRNG key.
    features: [N, dim]; only its shape and validity are used.
    labelled_mask: [N] bool.
    budget: number of picks.
  Returns:
    [budget] int32 indices of unlabelled nodes.
  """
  _, labelled_mask = _validate(features, labelled_mask, budget)
  _, picks = jax.lax.top_k(_random_scores(key, labelled_mask), budget)
  return picks.astype(jnp.int32)


def coreset(key: jax.Array, features: jax.Array, labelled_mask: jax.Array, budget: int,
            **unused_options) -> jax.Array:
  """CoreSet: k-center greedy on the (not normalised) learner embeddings, SPEC §4.

  Args:
    key: PRNG key, used only for a cold start (no labelled node).
    features: [N, dim] learner embeddings.
    labelled_mask: [N] bool; labelled nodes are the initial centres.
    budget: number of picks.
  Returns:
    [budget] int32 indices of unlabelled nodes in pick order.
  """
  features, labelled_mask = _validate(features, labelled_mask, budget)
  return k_center_greedy(features, labelled_mask, budget, key=key)


def uncertain_gcn_select(scores: jax.Array, labelled_mask: jax.Array, budget: int, *,
                         s_margin: float = 0.1) -> jax.Array:
  """UncertainGCN's rule: the `budget` unlabelled nodes with the smallest |score - s_margin|.

  Args:
    scores: [N] GCN scores (eval mode).
    labelled_mask: [N] bool.
    budget: number of picks.
    s_margin: the target score (0.1 in the reference).
  Returns:
    [budget] int32 indices, closest first (the reference lists the same set closest last).
  """
  chex.assert_rank(scores, 1)
  chex.assert_equal_shape([scores, labelled_mask])
  distance = jnp.where(labelled_mask, jnp.inf, jnp.abs(scores - s_margin))
  _, picks = jax.lax.top_k(-distance, budget)
  return picks.astype(jnp.int32)


def core_gcn_select(embedding: jax.Array, labelled_mask: jax.Array, budget: int) -> jax.Array:
  """CoreGCN's rule: k-center greedy on the GCN embedding with the labelled nodes as centres.

  Args:
    embedding: [N, hidden + 1] `GCNResult.embedding`.
    labelled_mask: [N] bool.
    budget: number of picks.
  Returns:
    [budget] int32 indices in pick order.
  """
  return k_center_greedy(embedding, labelled_mask, budget)


def uncertain_gcn(key: jax.Array, features: jax.Array, labelled_mask: jax.Array, budget: int,
                  *, s_margin: float = 0.1, **gcn_options) -> jax.Array:
  """UncertainGCN (SPEC §3): train the GCN, then `uncertain_gcn_select`.

  Args:
    key: PRNG key (GCN initialisation and dropout).
    features: [N, dim] learner embeddings (L2-normalised inside).
    labelled_mask: [N] bool, with at least one labelled node.
    budget: number of picks.
    s_margin: target score.
    **gcn_options: `train_gcn` options (hidden, dropout_rate, num_layers, lambda_, steps,
      learning_rate, weight_decay, adjacency); defaults as the reference.
  Returns:
    [budget] int32 indices of unlabelled nodes.
  """
  features, labelled_mask = _validate(features, labelled_mask, budget, need_labelled=True)
  result = graph.train_gcn(key, features, labelled_mask, **_gcn_options(gcn_options))
  return uncertain_gcn_select(result.scores, labelled_mask, budget, s_margin=s_margin)


def core_gcn(key: jax.Array, features: jax.Array, labelled_mask: jax.Array, budget: int,
             *, s_margin: float = 0.1, **gcn_options) -> jax.Array:
  """CoreGCN (SPEC §3): train the GCN, then `core_gcn_select` on its embedding.

  Args and returns as `uncertain_gcn` (`s_margin` is accepted and unused).
  """
  del s_margin
  features, labelled_mask = _validate(features, labelled_mask, budget, need_labelled=True)
  result = graph.train_gcn(key, features, labelled_mask, **_gcn_options(gcn_options))
  return core_gcn_select(result.embedding, labelled_mask, budget)


SAMPLERS: Dict[str, Sampler] = {
    "Random": random,
    "CoreSet": coreset,
    "UncertainGCN": uncertain_gcn,
    "CoreGCN": core_gcn,
}


def get_sampler(name: str) -> Sampler:
  """The sampler registered under `name` (one of `SAMPLERS`), else a ValueError listing them."""
  if name not in SAMPLERS:
    raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLERS)}")
  return SAMPLERS[name]
