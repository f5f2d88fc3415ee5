"""GCN training as separately compiled parts, for any graph and architecture.

`train_setup` (the graph, A V, initial parameters), `train_chunk` (Adam steps in one
`lax.scan`, chunked with no-op padding so one compiled length serves a whole run),
`train_evaluate` (the eval-mode pass), and `train_steps` (all three in one traceable program,
for inspection). `graph.train_gcn` checks inputs and runs these through the `*_jit` attributes
here, except for the factored two-layer GCN, which `selection.gcn_fused` trains faster with the
same arithmetic.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_seqgcn.selection.adjacency import IdentityAdjacency
from jax_seqgcn.selection.adjacency import build_adjacency
from jax_seqgcn.selection.adjacency import propagate
from jax_seqgcn.selection.gcn_model import GCNResult
from jax_seqgcn.selection.gcn_model import adam_coupled
from jax_seqgcn.selection.gcn_model import gcn_loss_from_logits
from jax_seqgcn.selection.gcn_model import network


def train_setup(key, unit_features, params, *, hidden, dropout_rate, num_layers, adjacency_mode,
                architecture="gcn"):
  """The fixed part of GCN training: the graph, A V, initial parameters and Adam state.

  Args: as `train_steps` (`key` only initialises `params` when they are None).
  Returns:
    (adjacency, propagated [N, dim] = A V or None, params, opt_state), the inputs of
    `train_chunk` and `train_evaluate`.
  """
  model = network(unit_features, hidden=hidden, dropout_rate=dropout_rate,
                   num_layers=num_layers, architecture=architecture)
  if architecture == "mlp":
    adjacency, av = IdentityAdjacency(), None
  else:
    adjacency = build_adjacency(unit_features, adjacency_mode)
    # A and V are fixed over all steps, so the first layer's A V is computed once.
    av = propagate(adjacency, unit_features) if num_layers > 1 else None
  if params is None:
    params = model.init(jax.random.split(key)[0], unit_features, adjacency, train=False,
                        propagated_features=av)["params"]
  # Adam's state does not depend on the learning rate or decay (traced later).
  return adjacency, av, params, adam_coupled(0.0, 0.0).init(params)


def train_chunk(key, unit_features, labelled_mask, adjacency, propagated, params, opt_state,
                first_step, total_steps, lambda_, learning_rate, weight_decay, *, hidden,
                dropout_rate, num_layers, steps, architecture="gcn"):
  """Adam steps first_step .. first_step + steps - 1 in one `lax.scan`; steps at or past
  `total_steps` (traced) leave the parameters unchanged, so one compiled chunk length serves
  every chunk of a run. Step s's dropout draws from fold_in(split(key)[1], s), whatever the
  chunking: a run cut into chunks equals the run in one scan.

  Returns:
    (params, opt_state, losses [steps]); the losses of no-op steps are not meaningful.
  """
  model = network(unit_features, hidden=hidden, dropout_rate=dropout_rate,
                   num_layers=num_layers, architecture=architecture)
  dropout_key = jax.random.split(key)[1]
  tx = adam_coupled(learning_rate, weight_decay)

  def loss_fn(p, step):
    _, embedding = model.apply({"params": p}, unit_features, adjacency, train=True,
                               propagated_features=propagated,
                               dropout_key=jax.random.fold_in(dropout_key, step))
    return gcn_loss_from_logits(embedding[:, -1], labelled_mask, lambda_)

  def step_fn(carry, step):
    loss, grads = jax.value_and_grad(loss_fn)(carry[0], step)
    updates, opt_state = tx.update(grads, carry[1], carry[0])
    new = (optax.apply_updates(carry[0], updates), opt_state)
    return jax.tree.map(lambda n, o: jnp.where(step < total_steps, n, o), new, carry), loss

  (params, opt_state), losses = jax.lax.scan(step_fn, (params, opt_state),
                                             first_step + jnp.arange(steps))
  return params, opt_state, losses


def train_evaluate(unit_features, adjacency, propagated, params, *, hidden, dropout_rate,
                   num_layers, architecture="gcn"):
  """The eval-mode (no dropout) pass after training: (scores [N], embedding [N, hidden + 1])."""
  model = network(unit_features, hidden=hidden, dropout_rate=dropout_rate,
                   num_layers=num_layers, architecture=architecture)
  return model.apply({"params": params}, unit_features, adjacency, train=False,
                     propagated_features=propagated)


def train_steps(key, unit_features, labelled_mask, params, lambda_, learning_rate, weight_decay,
                *, hidden, dropout_rate, num_layers, steps, adjacency_mode,
                architecture="gcn") -> GCNResult:
  """All of GCN training in one program: `train_setup`, `steps` Adam steps (`train_chunk`) and
  `train_evaluate`. Traceable and unchecked, for inspection (`jax.make_jaxpr`).

  `train_gcn` checks the inputs and options, L2-normalises the features and resolves "auto",
  then runs the same three parts as separately compiled programs (`train_setup_jit`,
  `train_chunk_jit` chunk by chunk, `train_evaluate_jit`).

  Args:
    key: PRNG key for initialisation and dropout.
    unit_features: [N, dim] L2-normalised node features.
    labelled_mask: [N] bool.
    params: initial parameters, or None to initialise from `key`.
    lambda_, learning_rate, weight_decay: scalars, traced.
    hidden, dropout_rate, num_layers, steps, architecture: as `train_gcn`; static
      (`TRAIN_STATIC_ARGNAMES`).
    adjacency_mode: "dense", "factored", "identity" or "ones" (not "auto"); static.
  Returns:
    `GCNResult`.
  """
  net = dict(hidden=hidden, dropout_rate=dropout_rate, num_layers=num_layers,
             architecture=architecture)
  adjacency, av, params, opt_state = train_setup(key, unit_features, params,
                                                 adjacency_mode=adjacency_mode, **net)
  params, _, losses = train_chunk(key, unit_features, labelled_mask, adjacency, av, params,
                                  opt_state, 0, steps, lambda_, learning_rate, weight_decay,
                                  steps=steps, **net)
  scores, embedding = train_evaluate(unit_features, adjacency, av, params, **net)
  return GCNResult(params, scores, embedding, losses)


TRAIN_STATIC_ARGNAMES = ("hidden", "dropout_rate", "num_layers", "steps", "adjacency_mode",
                         "architecture")
# The parts, compiled once per shape and static option. `train_gcn` calls them through these
# module attributes, so they can be replaced (e.g. to count traces).
train_setup_jit = jax.jit(train_setup, static_argnames=("hidden", "dropout_rate", "num_layers",
                                                        "adjacency_mode", "architecture"))
train_chunk_jit = jax.jit(train_chunk, static_argnames=("hidden", "dropout_rate", "num_layers",
                                                        "steps", "architecture"))
train_evaluate_jit = jax.jit(train_evaluate, static_argnames=("hidden", "dropout_rate",
                                                              "num_layers", "architecture"))
# `train_gcn`'s default most steps per compiled chunk (the reference's 200 steps: 4 chunks), so
# a long training reports its losses as it goes; the chunking does not change the result.
GCN_CHUNK_STEPS = 50


def chunk_length(steps: int, chunk_steps: int) -> int:
  """The one compiled chunk length of a run: ceil(steps / ceil(steps / chunk_steps)), at least 2
  (XLA inlines a one-step loop, fusing it otherwise and rounding differently)."""
  count = max(1, -(-steps // chunk_steps))
  return max(2, -(-steps // count))


def run_chunks(chunk, params, opt_state, *, steps, chunk_steps, on_chunk):
  """Runs `chunk(params, opt_state, first_step, length) -> (params, opt_state, losses)` over
  steps 0 .. steps - 1 in chunks of `chunk_length`, calling `on_chunk(first_step, losses)` after
  each. Returns (params, host losses [steps])."""
  length = chunk_length(steps, chunk_steps)
  losses = []
  for first in range(0, steps, length):
    params, opt_state, part = chunk(params, opt_state, first, length)
    part = np.asarray(part)[:steps - first]
    losses.append(part)
    if on_chunk is not None:
      on_chunk(first, part)
  return params, (np.concatenate(losses) if losses else np.zeros((0,), np.float32))


def train_in_chunks(key, unit, labelled_mask, params, lambda_, learning_rate, weight_decay, *,
                    steps, chunk_steps, on_chunk, adjacency_mode, **net) -> GCNResult:
  """`train_steps`' arithmetic as compiled parts: `train_setup_jit`, `run_chunks` of
  `train_chunk_jit` (the last chunk may hold a few no-op steps), and `train_evaluate_jit`."""
  adjacency, av, params, opt_state = train_setup_jit(key, unit, params,
                                                     adjacency_mode=adjacency_mode, **net)

  def chunk(params, opt_state, first, length):
    return train_chunk_jit(key, unit, labelled_mask, adjacency, av, params, opt_state, first,
                           steps, lambda_, learning_rate, weight_decay, steps=length, **net)

  params, losses = run_chunks(chunk, params, opt_state, steps=steps, chunk_steps=chunk_steps,
                              on_chunk=on_chunk)
  scores, embedding = train_evaluate_jit(unit, adjacency, av, params, **net)
  return GCNResult(params, scores, embedding, jnp.asarray(losses, unit.dtype))
