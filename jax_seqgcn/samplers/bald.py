"""Bayesian uncertainty from MC dropout: BALD and PowerBALD.

Both read `pool.mc_probabilities` [T, N, C]: T class-probability predictions of the learner with
dropout active before its head (`config.learner.mc_dropout` > 0; the cycle computes them with
`training.mc_dropout_probabilities` only for a sampler that needs them, T = the `bald_samples`
option).

* `BALD` (Houlsby et al. 2011; Gal et al. 2017): the `budget` unlabelled nodes with the largest
  mutual information between the prediction and the parameters,
  I = H[mean_t p_t] - mean_t H[p_t], in nats (`bald_scores`).
* `PowerBALD` (Kirsch et al. 2023): `budget` nodes drawn without replacement with probability
  proportional to I^beta (`power_beta`), by Gumbel top-k (`power.power_sample`).

Inside `samplers.on_mesh(mesh)` over several devices (or processes), the [T, N, C] field is
split over the mesh axis 'data' along N (each device scores N / devices nodes), and the ranking
is a global top-k (`selection.sharding.global_top_k`; `power.power_sample_on_mesh`): the
picks are the single-device picks.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jax_seqgcn import checks
from jax_seqgcn.samplers import base
from jax_seqgcn.samplers import power
from jax_seqgcn.selection import sharding

DEFAULT_SAMPLES = 20
OPTIONS = dict(bald_samples=DEFAULT_SAMPLES)


def bald_scores(mc_probabilities: jax.Array) -> jax.Array:
  """Mutual information of each node, from T stochastic predictions.

  Args:
    mc_probabilities: [T, N, C] rows summing to 1.
  Returns:
    [N] float, in [0, log C]: H[mean_t p_t] - mean_t H[p_t] (clipped at 0 against rounding).
  """
  chex.assert_rank(mc_probabilities, 3)
  p = mc_probabilities.astype(jnp.promote_types(mc_probabilities.dtype, jnp.float32))
  entropy = lambda q: jnp.sum(jax.scipy.special.entr(q), axis=-1)
  return jnp.maximum(entropy(jnp.mean(p, axis=0)) - jnp.mean(entropy(p), axis=0), 0.0)


def check_options(options) -> None:
  """ValueError unless `bald_samples` is an int in [1, 1000] (the [T, N, C] field grows with T)."""
  samples = options.get("bald_samples", DEFAULT_SAMPLES)
  if not checks.is_int(samples) or not 1 <= samples <= 1000:
    raise ValueError(f"bald_samples must be an int in [1, 1000] (the pool holds T x N x C "
                     f"probabilities), got {samples!r}")


def _check_field(pool: base.Pool, name: str) -> None:
  # `Sampler.__call__` has checked presence, rank and N (`base.validate_pool`); BALD also
  # needs two classes or more.
  if np.shape(pool.mc_probabilities)[2] < 2:
    raise ValueError(f"{name}: mc_probabilities must have C >= 2 classes, got shape "
                     f"{np.shape(pool.mc_probabilities)}")


@functools.partial(jax.jit, static_argnames=("budget",))
def _top(mc_probabilities, labelled_mask, *, budget):
  return base.top_unlabelled(bald_scores(mc_probabilities), labelled_mask, budget)


@functools.partial(jax.jit, static_argnames=("budget",))
def _power(key, mc_probabilities, labelled_mask, beta, *, budget):
  # Scores and draw in one program, as on a mesh (`power.power_sample_on_mesh`): a BALD of 0
  # (identical passes) rounds the same way in both.
  return power.power_sample(key, bald_scores(mc_probabilities), labelled_mask, budget, beta)


def _local_top(mc_probabilities, available, *, budget):
  """`_top` on one shard of the nodes (inside `sharding.map_rows`): [budget] global picks."""
  return sharding.top_available(bald_scores(mc_probabilities), available, budget=budget)


@base.register("BALD", needs=("mc_probabilities",), options=OPTIONS, check=check_options,
               description="largest mutual information of T MC-dropout predictions")
def _bald(key, pool: base.Pool, budget: int, **options) -> jax.Array:
  del key, options  # deterministic; bald_samples is read when the field is computed
  _check_field(pool, "BALD")
  mesh = base.current_mesh()
  if sharding.spans_devices(mesh):  # inside `base.on_mesh`: the nodes split over the devices
    return jnp.asarray(sharding.map_rows(
        _local_top, mesh, (pool.mc_probabilities, ~np.asarray(pool.labelled_mask, bool)),
        axes=(1, 0), budget=int(budget)))
  return _top(jnp.asarray(pool.mc_probabilities), jnp.asarray(pool.labelled_mask),
              budget=int(budget))


@base.register("PowerBALD", needs=("mc_probabilities",),
               options=dict(OPTIONS, power_beta=power.DEFAULT_BETA),
               check=lambda options: (check_options(options), power.check_options(options)),
               description="draws with probability proportional to BALD^beta (Gumbel top-k)")
def _power_bald(key, pool: base.Pool, budget: int, **options) -> jax.Array:
  _check_field(pool, "PowerBALD")
  mesh = base.current_mesh()
  if sharding.spans_devices(mesh):
    return power.power_sample_on_mesh(mesh, key, bald_scores, pool.mc_probabilities,
                                      pool.labelled_mask, int(budget), options["power_beta"],
                                      node_axis=1)
  return _power(key, jnp.asarray(pool.mc_probabilities), jnp.asarray(pool.labelled_mask),
                float(options["power_beta"]), budget=int(budget))
