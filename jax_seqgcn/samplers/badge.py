"""BADGE (Ash et al., ICLR 2020): k-means++ seeding on gradient embeddings.

The gradient embedding of node i is the gradient of the cross-entropy loss with respect to the
last (linear) layer's weights, taken at the label the learner predicts, y_i = argmax_c p_ic:

    g_i = a_i (outer) h_i,   a_i = onehot(y_i) - p_i  [C],   h_i = penultimate features [D],

laid out class-major, block c = a_ic h_i (the authors' `get_grad_embedding` in JordanAsh/badge,
query_strategies/strategy.py, writes `out[j] * (1 - p_c)` for the predicted class and
`out[j] * (-p_c)` for the others). That is minus the loss gradient (p - onehot) h with no extra
scale and no bias term; the sign changes neither norms nor distances, so it does not matter here.

Selection follows the authors' `init_centers` (query_strategies/badge_sampling.py):

* only the unlabelled nodes take part: the authors embed `idxs_unlabeled` only, so labelled nodes
  are neither candidates nor initial centres (unlike CoreSet);
* the first centre is the unlabelled node with the largest |g_i| (first index on ties, as
  `np.argmax`);
* every later centre is drawn with probability proportional to D^2, the squared distance to the
  nearest centre so far, among the nodes not yet picked (the authors redraw a picked index; we
  give picked nodes weight 0, which is the same distribution).
* When every remaining candidate coincides with a centre (all D^2 = 0; the authors stop in the
  debugger there), we draw uniformly among them instead.

Cost: the [N, C*D] embeddings are never formed. With |g_i|^2 = |a_i|^2 |h_i|^2,

    |g_i - g_j|^2 = |g_i|^2 + |g_j|^2 - 2 (a_i . a_j)(h_i . h_j),

so each pick costs one [N, D] @ [D] and one [N, C] @ [C] product, inside one `lax.fori_loop`
that carries the running [N] minimum of D^2 (no N x N matrix either). The expansion can round to
tiny negatives for near-identical embeddings; those are clamped to 0, and picked nodes are
masked out explicitly because rounding leaves their own distance slightly above 0.

Inside `samplers.on_mesh(mesh)` over several devices (or processes), the registered sampler
runs `badge_sharded.kmeans_pp_seeding_sharded`: the same seeding with the node arrays split
over the mesh axis 'data' (see that module for when its picks can differ in float32).
"""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from jax_seqgcn.samplers import base
from jax_seqgcn.samplers import uncertainty
from jax_seqgcn.selection import sharding

# Full float32 products on every backend (TPU: not bfloat16 passes); see selection/__init__.py.
HIGHEST = jax.lax.Precision.HIGHEST


class GradientFactors(NamedTuple):
  """The factors of the gradient embeddings g_i = residual_i (outer) features_i.

  Attributes:
    residual: [N, C] onehot(argmax p_i) - p_i.
    features: [N, D] penultimate-layer features h_i.
    sq_norms: [N] |g_i|^2 = |residual_i|^2 |features_i|^2.
  """
  residual: jax.Array
  features: jax.Array
  sq_norms: jax.Array


class BadgeState(NamedTuple):
  """Seeding loop state.

  Attributes:
    min_sq_dist: [N] squared distance of each node to its nearest centre so far.
    available: [N] bool, unlabelled and not picked yet.
    picks: [budget] int32 centres so far (the rest zeros).
  """
  min_sq_dist: jax.Array
  available: jax.Array
  picks: jax.Array


def gradient_factors(features: jax.Array, probabilities: jax.Array) -> GradientFactors:
  """The factors of every node's gradient embedding, without forming the [N, C*D] embeddings.

  Args:
    features: [N, D] penultimate-layer features.
    probabilities: [N, C] softmax outputs.
  Returns:
    `GradientFactors` in at least float32.
  """
  features, probabilities = jnp.asarray(features), jnp.asarray(probabilities)
  chex.assert_rank([features, probabilities], 2)
  chex.assert_equal_shape_prefix([features, probabilities], 1)
  dtype = jnp.promote_types(jnp.result_type(features, probabilities), jnp.float32)
  features = features.astype(dtype)
  probabilities = probabilities.astype(dtype)
  predicted = jax.nn.one_hot(jnp.argmax(probabilities, axis=-1), probabilities.shape[-1],
                             dtype=dtype)
  residual = predicted - probabilities
  sq_norms = jnp.sum(jnp.square(residual), -1) * jnp.sum(jnp.square(features), -1)
  return GradientFactors(residual, features, sq_norms)


def sq_distances_to(factors: GradientFactors, centre: jax.Array) -> jax.Array:
  """Squared distances |g_i - g_centre|^2 from every node's gradient embedding to one node's.

  Args:
    factors: `gradient_factors(features, probabilities)` of N nodes.
    centre: int scalar, a node index.
  Returns:
    [N] float, >= 0 (rounding below 0 is clamped); about 0, not exactly, at `centre`.
  """
  return sq_distances_to_row(factors, factors.residual[centre], factors.features[centre],
                             factors.sq_norms[centre])


def sq_distances_to_row(factors: GradientFactors, residual: jax.Array, features: jax.Array,
                        sq_norm: jax.Array) -> jax.Array:
  """`sq_distances_to` given the centre's factors (e.g. a row gathered from another device).

  Args:
    factors: `gradient_factors` of N nodes.
    residual: [C] the centre's residual.
    features: [D] the centre's features.
    sq_norm: scalar, the centre's |g|^2.
  Returns:
    [N] float, >= 0.
  """
  residual_dot = jnp.matmul(factors.residual, residual, precision=HIGHEST)
  feature_dot = jnp.matmul(factors.features, features, precision=HIGHEST)
  sq_dist = factors.sq_norms + sq_norm - 2.0 * residual_dot * feature_dot
  return jnp.maximum(sq_dist, 0.0)


def draw_proportional(key, weights):
  """One index drawn with probability proportional to `weights` [N] (>= 0, positive sum).

  Inverse CDF: one uniform and one cumulative sum per pick (Gumbel-max would need N random
  draws and N logs). A zero weight leaves the cumulative sum unchanged (adding 0 is exact), so
  its index is never the first one above the target. float32 limits each index's probability to
  about 2e-7 of the total mass (the uniform's grid plus one rounding of the sum): a relative
  error of about 0.2% for a node holding 1e-4 of the mass.

  Args:
    key: PRNG key.
    weights: [N] float weights.
  Returns:
    int32 scalar index; never one of weight 0.
  """
  cdf = jnp.cumsum(weights)
  target = jax.random.uniform(key, dtype=cdf.dtype) * cdf[-1]
  pick = jnp.searchsorted(cdf, target, side="right")
  # u * total can round up to the total: take the last index with positive weight instead.
  return jnp.where(pick < cdf.shape[0], pick, jnp.argmax(cdf)).astype(jnp.int32)


def kmeans_pp_seeding(key, features, probabilities, labelled_mask, *, budget):
  """k-means++ seeding of `budget` unlabelled nodes on the gradient embeddings (module docstring).

  The program `badge` compiles (through `kmeans_pp_seeding_jit`), unchecked and traceable, e.g.
  for `jax.make_jaxpr` or `jax.vmap` over keys; `badge` validates its inputs first.

  Args:
    key: PRNG key for the D^2 draws.
    features: [N, D] penultimate-layer features.
    probabilities: [N, C] softmax outputs.
    labelled_mask: [N] bool.
    budget: number of picks (static), at most the number of unlabelled nodes.
  Returns:
    [budget] int32 node indices in pick order.
  """
  factors = gradient_factors(features, probabilities)
  available = ~jnp.asarray(labelled_mask, bool)
  first = jnp.argmax(jnp.where(available, factors.sq_norms, -jnp.inf)).astype(jnp.int32)

  def body(t, state):
    sq_dist = jnp.minimum(state.min_sq_dist, sq_distances_to(factors, state.picks[t - 1]))
    # Labelled and picked nodes get weight 0. A pick's own distance is only about 0 after
    # rounding, so it must be masked here, not left to D^2.
    weights = jnp.where(state.available, sq_dist, 0.0)
    # Every remaining candidate sits on a centre (e.g. one-hot probabilities make g = 0):
    # D^2 sampling is undefined, so draw uniformly among them.
    weights = jnp.where(jnp.sum(weights) > 0.0, weights, state.available.astype(weights.dtype))
    pick = draw_proportional(jax.random.fold_in(key, t), weights)
    return BadgeState(sq_dist, state.available.at[pick].set(False), state.picks.at[t].set(pick))

  state = BadgeState(
      min_sq_dist=jnp.full(available.shape, jnp.inf, factors.sq_norms.dtype),
      available=available.at[first].set(False),
      picks=jnp.zeros((budget,), jnp.int32).at[0].set(first))
  return jax.lax.fori_loop(1, budget, body, state).picks


# `kmeans_pp_seeding` compiled once per shape and budget. `badge` and the registry entry call it
# through this module attribute, so it can be replaced (e.g. by a wrapper that counts traces).
kmeans_pp_seeding_jit = jax.jit(kmeans_pp_seeding, static_argnames="budget")


def badge(key: jax.Array, features: jax.Array, probabilities: jax.Array,
          labelled_mask: jax.Array, budget: int) -> jax.Array:
  """BADGE: k-means++ seeding on the gradient embeddings of the unlabelled nodes.

  Args:
    key: PRNG key for the D^2 draws (the first pick is deterministic).
    features: [N, D] penultimate-layer features of the learner (eval mode).
    probabilities: [N, C] the learner's softmax outputs, C >= 2.
    labelled_mask: [N] bool; labelled nodes are never picked and are not centres.
    budget: number of picks, 1 <= budget <= number of unlabelled nodes.
  Returns:
    [budget] int32 distinct unlabelled node indices, in pick order.
  Raises:
    ValueError: missing or malformed features or probabilities, a bad mask or budget.
  """
  uncertainty.check_probabilities(probabilities, "BADGE")
  pool = base.validate_pool(
      base.Pool(labelled_mask, features=features, probabilities=probabilities), budget,
      ("features", "probabilities"), name="BADGE")
  return _badge(key, pool, budget)


@base.register("BADGE", needs=("features", "probabilities"),
               description="k-means++ seeding on last-layer gradient embeddings (Ash et al. 2020)")
def _badge(key, pool: base.Pool, budget: int) -> jax.Array:
  uncertainty.check_probabilities(pool.probabilities, "BADGE")
  mesh = base.current_mesh()
  if sharding.spans_devices(mesh):  # inside `base.on_mesh`: the nodes split over the devices
    # Imported here: badge_sharded builds on this module.
    from jax_seqgcn.samplers import badge_sharded  # pylint: disable=import-outside-toplevel
    return badge_sharded.kmeans_pp_seeding_sharded(key, pool.features, pool.probabilities,
                                                   pool.labelled_mask, budget=int(budget),
                                                   mesh=mesh)
  return kmeans_pp_seeding_jit(key, jnp.asarray(pool.features), jnp.asarray(pool.probabilities),
                               jnp.asarray(pool.labelled_mask), budget=int(budget))
