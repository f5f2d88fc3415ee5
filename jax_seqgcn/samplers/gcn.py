"""The sequential GCN samplers (UncertainGCN, CoreGCN) and the UncertainDiscriminator ablation.

* `UncertainGCN` (paper Eq. 7 as the reference applies it): train the GCN to tell labelled from
  unlabelled nodes, then pick the unlabelled nodes whose score is closest to `s_margin`.
* `CoreGCN` (Eq. 8): train the GCN, then k-center greedy on its embedding concat(hidden, logit)
  with the labelled nodes as centres.
* `UncertainDiscriminator` (the paper's ablation): the GCN replaced by a 2-layer MLP on the same
  features (`graph.MLPDiscriminator`), same loss (Eq. 6) and `s_margin` rule.

Options and defaults: `graph.GCN_DEFAULTS` (the reference's) plus `s_margin` = 0.1. The graph
ablations are options too: `num_layers` 1/2/3, `adjacency` "identity" (Eye) or "ones" (Ones).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jax_seqgcn import checks
from jax_seqgcn.selection import graph
from jax_seqgcn.selection.kcenter import k_center_greedy
from jax_seqgcn.selection.kcenter_sharded import k_center_greedy_sharded
from jax_seqgcn.selection.sharding import spans_devices
from jax_seqgcn.samplers import base
from jax_seqgcn.training import progress

S_MARGIN = 0.1
OPTIONS = dict(graph.GCN_DEFAULTS, s_margin=S_MARGIN)
_MLP_OPTIONS = {k: v for k, v in OPTIONS.items() if k != "adjacency"}


def check_options(options) -> None:
  """ValueError for GCN sampler options that cannot train (all problems in one message)."""
  gcn = {k: options.get(k, v) for k, v in graph.GCN_DEFAULTS.items()}
  graph.check_gcn_options(**gcn)
  s_margin = options.get("s_margin", S_MARGIN)
  # `checks.is_real`, not isinstance(int, float): True would pass as 1.
  if not checks.is_real(s_margin) or not 0.0 <= s_margin <= 1.0:
    raise ValueError(f"s_margin must be a number in [0, 1], got {s_margin!r}")


def uncertain_gcn_select(scores: jax.Array, labelled_mask: jax.Array, budget: int, *,
                         s_margin: float = S_MARGIN) -> jax.Array:
  """UncertainGCN's rule: the `budget` unlabelled nodes with the smallest |score - s_margin|.

  Args:
    scores: [N] GCN scores (eval mode), finite.
    labelled_mask: [N] bool.
    budget: number of picks, 1 <= budget <= number of unlabelled nodes.
    s_margin: the target score (0.1 in the reference).
  Returns:
    [budget] int32 indices, closest first (the reference lists the same set closest last).
  Raises:
    ValueError: shapes that differ, non-finite scores (a diverged GCN), a bad budget.
  """
  chex.assert_rank(scores, 1)
  chex.assert_equal_shape([scores, labelled_mask])
  if not np.isfinite(np.asarray(scores)).all():
    raise ValueError("scores has NaN or inf: the GCN diverged")
  pool = base.validate_pool(base.Pool(labelled_mask), budget)
  distance = jnp.abs(jnp.asarray(scores) - s_margin)
  return base.top_unlabelled(-distance, jnp.asarray(pool.labelled_mask), int(budget))


def core_gcn_select(embedding: jax.Array, labelled_mask: jax.Array, budget: int, *,
                    mesh=None) -> jax.Array:
  """CoreGCN's rule: k-center greedy on the GCN embedding with the labelled nodes as centres.

  Args:
    embedding: [N, hidden + 1] `GCNResult.embedding`.
    labelled_mask: [N] bool.
    budget: number of picks.
    mesh: optional mesh (axis 'data'): over several devices, `k_center_greedy_sharded` (the
      same picks).
  Returns:
    [budget] int32 indices in pick order.
  """
  if spans_devices(mesh):
    return k_center_greedy_sharded(embedding, labelled_mask, budget, mesh=mesh)
  return k_center_greedy(embedding, labelled_mask, budget)


def _train(key, pool, options, architecture="gcn"):
  gcn_options = {k: options[k] for k in graph.GCN_DEFAULTS if k in options}
  steps = gcn_options.get("steps", graph.GCN_DEFAULTS["steps"])

  def report(first_step, losses):  # after each compiled chunk: live progress of a long training
    progress.report(architecture, {"loss": losses}, first_step=first_step, total_steps=steps)

  return graph.train_gcn(key, pool.features, pool.labelled_mask, architecture=architecture,
                         on_chunk=report, mesh=base.current_mesh(), **gcn_options)


def _need_both(pool):
  # `pool` was validated by `Sampler.__call__`; only the GCN's extra requirement is left.
  if pool.labelled_mask.all() or not pool.labelled_mask.any():
    raise ValueError("the GCN samplers need at least one labelled and one unlabelled node")


@base.register("UncertainGCN", needs=("features",), options=OPTIONS, check=check_options,
               description="GCN on the learner features; unlabelled scores closest to s_margin")
def _uncertain_gcn(key, pool, budget, **options):
  _need_both(pool)
  result = _train(key, pool, options)
  return uncertain_gcn_select(result.scores, pool.labelled_mask, budget,
                              s_margin=options["s_margin"])


@base.register("CoreGCN", needs=("features",), options=OPTIONS, check=check_options,
               description="GCN on the learner features; k-center greedy on its embedding")
def _core_gcn(key, pool, budget, **options):
  _need_both(pool)
  return core_gcn_select(_train(key, pool, options).embedding, pool.labelled_mask, budget,
                         mesh=base.current_mesh())


@base.register("UncertainDiscriminator", needs=("features",), options=_MLP_OPTIONS,
               check=check_options,
               description="ablation: UncertainGCN with an MLP instead of the GCN (no graph)")
def _uncertain_discriminator(key, pool, budget, **options):
  _need_both(pool)
  result = _train(key, pool, options, architecture="mlp")
  return uncertain_gcn_select(result.scores, pool.labelled_mask, budget,
                              s_margin=options["s_margin"])


def uncertain_gcn(key: jax.Array, features: jax.Array, labelled_mask: jax.Array, budget: int,
                  **options) -> jax.Array:
  """UncertainGCN on a features array: train the GCN, then `uncertain_gcn_select`.

  Args:
    key: PRNG key (GCN initialisation and dropout).
    features: [N, dim] learner embeddings (L2-normalised inside); computed in float32
      (float16 and bfloat16 are upcast: in float16 the GCN's training overflows).
    labelled_mask: [N] bool, with at least one labelled node.
    budget: number of picks.
    **options: `s_margin` and the `train_gcn` options (hidden, dropout_rate, num_layers,
      lambda_, steps, learning_rate, weight_decay, adjacency); defaults as the reference.
  Returns:
    [budget] int32 indices of unlabelled nodes, closest to s_margin first.
  """
  return base.SAMPLERS["UncertainGCN"](key, base.Pool(labelled_mask, features=features), budget,
                                       **options)


def core_gcn(key: jax.Array, features: jax.Array, labelled_mask: jax.Array, budget: int,
             **options) -> jax.Array:
  """CoreGCN on a features array: train the GCN, then `core_gcn_select` on its embedding.

  Args and returns as `uncertain_gcn` (`s_margin` is accepted and unused); picks in k-center
  order.
  """
  return base.SAMPLERS["CoreGCN"](key, base.Pool(labelled_mask, features=features), budget,
                                  **options)


def uncertain_discriminator(key: jax.Array, features: jax.Array, labelled_mask: jax.Array,
                            budget: int, **options) -> jax.Array:
  """UncertainDiscriminator on a features array (options as `uncertain_gcn`, no `adjacency`)."""
  return base.SAMPLERS["UncertainDiscriminator"](
      key, base.Pool(labelled_mask, features=features), budget, **options)
