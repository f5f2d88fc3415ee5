"""Graph convolutional network of the sequential GCN sampler, its loss and its training.

Implements protocol §3 (paper Eqs. 4-6, reference `GCN`, `BCEAdjLoss`) on the graph of
`selection.adjacency` (`normalized_adjacency`, `factored_adjacency`, `propagate`, re-exported
here):

* `GCN`: graph convolutions `A (X W) + b` (layer names `gc1`, `gc2`, `gc3` as in the reference),
  returning sigmoid scores and the CoreGCN embedding concat(hidden, logit).
* `gcn_loss`: Eq. 6. `train_gcn`: all Adam steps compiled once in a `lax.scan`.
"""

import logging
from typing import Any, Callable, NamedTuple, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_seqgcn import checks
# The graph (and its names, re-exported: `graph.propagate` etc. are public API).
from jax_seqgcn.selection.adjacency import ADJACENCY_MODES
from jax_seqgcn.selection.adjacency import HIGHEST
from jax_seqgcn.selection.adjacency import Adjacency
from jax_seqgcn.selection.adjacency import FactoredAdjacency
from jax_seqgcn.selection.adjacency import IdentityAdjacency
from jax_seqgcn.selection.adjacency import OnesAdjacency
from jax_seqgcn.selection.adjacency import agreed_memory_bytes
from jax_seqgcn.selection.adjacency import available_memory_bytes
from jax_seqgcn.selection.adjacency import build_adjacency
from jax_seqgcn.selection.adjacency import column_sums
from jax_seqgcn.selection.adjacency import choose_adjacency
from jax_seqgcn.selection.adjacency import factored_adjacency
from jax_seqgcn.selection.adjacency import l2_normalize
from jax_seqgcn.selection.adjacency import normalized_adjacency
from jax_seqgcn.selection.adjacency import propagate

Params = Any
_LOG = logging.getLogger(__name__)


ARCHITECTURES = ("gcn", "mlp")
# The sampler GCN's options and their defaults (the reference's, see `train_gcn`); the GCN
# samplers, their registry entries and configs/default.py all read them from here.
GCN_DEFAULTS = dict(hidden=128, dropout_rate=0.3, num_layers=2, lambda_=1.2, steps=200,
                    learning_rate=1e-3, weight_decay=5e-4, adjacency="auto")


def _uniform_fan_out(key, shape, dtype):
  # Reference GraphConvolution.reset_parameters: U(-1/sqrt(out), 1/sqrt(out)) for W and b.
  bound = 1.0 / np.sqrt(shape[-1])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class GraphConv(nn.Module):
  """One graph convolution `A (X W) + b` (reference `GraphConvolution`).

  Attributes:
    features: output width.
    param_dtype: dtype of W and b.
  """
  features: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, adjacency, propagated_input=None):
    """x: [N, k_in]; returns [N, features]. `propagated_input` = A @ x if already known."""
    kernel = self.param("kernel", _uniform_fan_out, (x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", _uniform_fan_out, (self.features,), self.param_dtype)
    if propagated_input is not None:
      # (A X) W == A (X W): reuse A X when X is fixed across training steps.
      return jnp.matmul(propagated_input, kernel, precision=HIGHEST) + bias
    return propagate(adjacency, jnp.matmul(x, kernel, precision=HIGHEST)) + bias


class GCN(nn.Module):
  """The sampler's GCN (protocol §3, paper Eq. 5, reference `GCN`).

  Layers `gc1` (dim -> hidden), `gc2` (hidden -> hidden, only with num_layers=3) and `gc3`
  (-> 1 logit), ReLU and dropout after each hidden layer, sigmoid on the logit.

  Attributes:
    hidden: hidden width h (reference default 128; the paper's text says 512).
    dropout_rate: dropout after each hidden layer, training mode only.
    num_layers: 1, 2 (default) or 3 graph convolutions (protocol §5 ablation).
    param_dtype: dtype of the weights.
  """
  hidden: int = GCN_DEFAULTS["hidden"]
  dropout_rate: float = GCN_DEFAULTS["dropout_rate"]
  num_layers: int = GCN_DEFAULTS["num_layers"]
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features, adjacency, *, train: bool, propagated_features=None):
    """Scores every node.

    Args:
      features: [N, dim] node features V (the sampler passes L2-normalised embeddings).
      adjacency: dense [N, N] or `FactoredAdjacency`.
      train: enables dropout (needs the 'dropout' rng).
      propagated_features: optional [N, dim] = A @ features, to skip that product.
    Returns:
      (scores [N] in (0, 1), embedding [N, width + 1]) where embedding = concat(last hidden
      layer output (features for num_layers=1), pre-sigmoid logit): the CoreGCN embedding.
    """
    if self.num_layers not in (1, 2, 3):
      raise ValueError(f"num_layers must be 1, 2 or 3, got {self.num_layers}")
    names = {1: ["gc3"], 2: ["gc1", "gc3"], 3: ["gc1", "gc2", "gc3"]}[self.num_layers]
    h = features
    for i, name in enumerate(names[:-1]):
      h = GraphConv(self.hidden, self.param_dtype, name=name)(
          h, adjacency, propagated_features if i == 0 else None)
      h = nn.relu(h)
      h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    logit = GraphConv(1, self.param_dtype, name=names[-1])(
        h, adjacency, propagated_features if len(names) == 1 else None)
    return nn.sigmoid(logit[:, 0]), jnp.concatenate([h, logit], axis=-1)


def _uniform_fan_in(key, shape, dtype):
  # torch nn.Linear's default: U(+-1/sqrt(fan_in)) for the kernel [in, out]; biases use the
  # same bound, passed through the kernel's fan-in below.
  bound = 1.0 / np.sqrt(shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class MLPDiscriminator(nn.Module):
  """UncertainDiscriminator's network: `GCN` with every graph convolution replaced by a dense
  layer `X W + b` (no graph), initialised as torch `nn.Linear`.

  Same layer names, widths, ReLU/dropout and outputs as `GCN`, so on equal parameters it equals
  `GCN` applied with `IdentityAdjacency` (tested).

  Attributes: as `GCN`.
  """
  hidden: int = GCN_DEFAULTS["hidden"]
  dropout_rate: float = GCN_DEFAULTS["dropout_rate"]
  num_layers: int = GCN_DEFAULTS["num_layers"]
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features, adjacency=None, *, train: bool, propagated_features=None):
    """Scores every node from its own features alone.

    Args:
      features: [N, dim]; `adjacency` and `propagated_features` are accepted and ignored.
      train: enables dropout (needs the 'dropout' rng).
    Returns:
      (scores [N], embedding [N, width + 1]) as `GCN`.
    """
    del adjacency, propagated_features
    if self.num_layers not in (1, 2, 3):
      raise ValueError(f"num_layers must be 1, 2 or 3, got {self.num_layers}")
    names = {1: ["gc3"], 2: ["gc1", "gc3"], 3: ["gc1", "gc2", "gc3"]}[self.num_layers]
    h = features
    for name in names:
      fan_in = h.shape[-1]
      bias_init = lambda key, shape, dtype, fan_in=fan_in: jax.random.uniform(
          key, shape, dtype, -1.0 / np.sqrt(fan_in), 1.0 / np.sqrt(fan_in))
      width = 1 if name == "gc3" else self.hidden
      out = nn.Dense(width, kernel_init=_uniform_fan_in, bias_init=bias_init,
                     param_dtype=self.param_dtype, precision=HIGHEST, name=name)(h)
      if name == "gc3":
        return nn.sigmoid(out[:, 0]), jnp.concatenate([h, out], axis=-1)
      h = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(out))
    raise AssertionError("unreachable")


def _masked_mean(values, mask):
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.sum(mask)


def gcn_loss(scores: jax.Array, labelled_mask: jax.Array, lambda_: float = 1.2) -> jax.Array:
  """Eq. 6: -mean_{labelled} log s - lambda * mean_{unlabelled} log(1 - s).

  Args:
    scores: [N] sigmoid scores in (0, 1).
    labelled_mask: [N] bool, True for labelled nodes.
    lambda_: weight of the unlabelled term (1.2 in the paper).
  Returns:
    scalar loss (reference `BCEAdjLoss`, computed from the scores exactly as it does).
  """
  return (-_masked_mean(jnp.log(scores), labelled_mask)
          - lambda_ * _masked_mean(jnp.log(1.0 - scores), ~labelled_mask))


def gcn_loss_from_logits(logits, labelled_mask, lambda_=1.2):
  """`gcn_loss` on pre-sigmoid logits [N] via log-sigmoid: equal in value, finite when saturated.

  `train_gcn` uses this form (a named deviation from the reference, which takes log of the
  float32 sigmoid and returns inf/NaN once a score rounds to 0 or 1).
  """
  return (-_masked_mean(jax.nn.log_sigmoid(logits), labelled_mask)
          - lambda_ * _masked_mean(jax.nn.log_sigmoid(-logits), ~labelled_mask))


class GCNResult(NamedTuple):
  """Output of `train_gcn`.

  Attributes:
    params: trained GCN parameters.
    scores: [N] eval-mode sigmoid scores after training.
    embedding: [N, hidden + 1] eval-mode CoreGCN embedding after training.
    losses: [steps] training loss before each step's update.
  """
  params: Params
  scores: jax.Array
  embedding: jax.Array
  losses: jax.Array


def adam_coupled(learning_rate, weight_decay) -> optax.GradientTransformation:
  """torch `Adam(lr, weight_decay)`: L2 decay added to the gradient *before* the Adam moments."""
  return optax.chain(optax.add_decayed_weights(weight_decay), optax.scale_by_adam(),
                     optax.scale(-learning_rate))


def _network(unit_features, *, hidden, dropout_rate, num_layers, architecture):
  cls = MLPDiscriminator if architecture == "mlp" else GCN
  return cls(hidden, dropout_rate, num_layers, param_dtype=unit_features.dtype)


def train_setup(key, unit_features, params, *, hidden, dropout_rate, num_layers, adjacency_mode,
                architecture="gcn"):
  """The fixed part of GCN training: the graph, A V, initial parameters and Adam state.

  Args: as `train_steps` (`key` only initialises `params` when they are None).
  Returns:
    (adjacency, propagated [N, dim] = A V or None, params, opt_state), the inputs of
    `train_chunk` and `train_evaluate`.
  """
  model = _network(unit_features, hidden=hidden, dropout_rate=dropout_rate,
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
  model = _network(unit_features, hidden=hidden, dropout_rate=dropout_rate,
                   num_layers=num_layers, architecture=architecture)
  dropout_key = jax.random.split(key)[1]
  tx = adam_coupled(learning_rate, weight_decay)

  def loss_fn(p, step):
    _, embedding = model.apply({"params": p}, unit_features, adjacency, train=True,
                               propagated_features=propagated,
                               rngs={"dropout": jax.random.fold_in(dropout_key, step)})
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
  model = _network(unit_features, hidden=hidden, dropout_rate=dropout_rate,
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


def _train_in_chunks(key, unit, labelled_mask, params, lambda_, learning_rate, weight_decay, *,
                     steps, chunk_steps, on_chunk, adjacency_mode, **net):
  """`train_steps`' arithmetic as compiled parts: `train_setup_jit`, ceil(steps / chunk_steps)
  calls of `train_chunk_jit` of one length (the last may hold a few no-op steps), each followed
  by `on_chunk(first_step, losses)`, and `train_evaluate_jit`."""
  count = max(1, -(-steps // chunk_steps))
  # At least 2: XLA inlines a one-step loop, fusing it otherwise and rounding differently.
  length = max(2, -(-steps // count))
  adjacency, av, params, opt_state = train_setup_jit(key, unit, params,
                                                     adjacency_mode=adjacency_mode, **net)
  losses = []
  for first in range(0, steps, length):
    params, opt_state, chunk = train_chunk_jit(
        key, unit, labelled_mask, adjacency, av, params, opt_state, first, steps, lambda_,
        learning_rate, weight_decay, steps=length, **net)
    chunk = np.asarray(chunk)[:steps - first]
    losses.append(chunk)
    if on_chunk is not None:
      on_chunk(first, chunk)
  scores, embedding = train_evaluate_jit(unit, adjacency, av, params, **net)
  return GCNResult(params, scores, embedding,
                   jnp.asarray(np.concatenate(losses) if losses else np.zeros((0,), unit.dtype)))


def check_gcn_options(*, hidden, dropout_rate, num_layers, lambda_, steps, learning_rate,
                      weight_decay, adjacency, architecture="gcn") -> None:
  """Raises ValueError (every problem in one message) for GCN options that cannot train.

  Called by `train_gcn`, by the GCN samplers' option checks (so `jax-seqgcn select` too) and,
  before any learner training, by the experiment loop. Besides types and signs, `steps` is at
  most 10**6 and `hidden` at most 65536: larger values ran out of memory or ran for days in a
  probe, so they are refused up front, saying why.
  """
  # Upper bounds (value, why); bools are refused as ints by `checks.is_int`.
  max_steps = (10 ** 6, "the per-step loss history and time grow with it")
  max_hidden = (65536, "one [nodes, hidden] array per GCN layer")
  problems = []
  if adjacency not in ADJACENCY_MODES:
    problems.append(f"adjacency must be one of {ADJACENCY_MODES}, got {adjacency!r}")
  if architecture not in ARCHITECTURES:
    problems.append(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
  if not checks.is_int(hidden) or hidden < 1:
    problems.append(f"hidden must be an int >= 1, got {hidden!r}")
  elif hidden > max_hidden[0]:
    problems.append(f"hidden must be <= {max_hidden[0]}, got {hidden!r}: {max_hidden[1]}")
  if not checks.is_int(num_layers) or num_layers not in (1, 2, 3):
    problems.append(f"num_layers must be 1, 2 or 3, got {num_layers!r}")
  if not checks.is_int(steps) or steps < 0:
    problems.append(f"steps must be an int >= 0, got {steps!r}")
  elif steps > max_steps[0]:
    problems.append(f"steps must be <= {max_steps[0]}, got {steps!r}: {max_steps[1]}")
  if not checks.is_real(dropout_rate) or not 0.0 <= dropout_rate < 1.0:
    problems.append(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
  for name, value in (("learning_rate", learning_rate), ("lambda_", lambda_)):
    if not checks.is_real(value) or not 0.0 < value < np.inf:
      problems.append(f"{name} must be a finite number > 0, got {value!r}")
  if not checks.is_real(weight_decay) or not 0.0 <= weight_decay < np.inf:
    problems.append(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
  if problems:
    raise ValueError("bad GCN option(s): " + "; ".join(problems))


def train_gcn(key: jax.Array, features: jax.Array, labelled_mask: jax.Array, *,
              hidden: int = GCN_DEFAULTS["hidden"],
              dropout_rate: float = GCN_DEFAULTS["dropout_rate"],
              lambda_: float = GCN_DEFAULTS["lambda_"],
              steps: int = GCN_DEFAULTS["steps"],
              learning_rate: float = GCN_DEFAULTS["learning_rate"],
              weight_decay: float = GCN_DEFAULTS["weight_decay"],
              num_layers: int = GCN_DEFAULTS["num_layers"], params: Params = None,
              adjacency: str = GCN_DEFAULTS["adjacency"],
              architecture: str = "gcn", chunk_steps: int = GCN_CHUNK_STEPS,
              on_chunk: Optional[Callable[[int, np.ndarray], None]] = None) -> GCNResult:
  """Trains the GCN to tell labelled from unlabelled nodes (paper Eq. 6), full graph, Adam.

  Node features are L2-normalised here (as the reference does before `aff_to_adj`). The `steps`
  Adam steps (lr, coupled L2 decay as torch `Adam(weight_decay=...)`) run in compiled
  `lax.scan` chunks of at most `chunk_steps` (all in one program when `steps <= chunk_steps`),
  with the same result however they are chunked; one compile per (shape, static option)
  combination. Dropout draws from `key`.
  Defaults are the reference's (`GCN_DEFAULTS`; hidden 128 where the paper's text says 512).

  Args:
    key: PRNG key for initialisation and dropout.
    features: [N, dim] node features (learner embeddings), N >= 2.
    labelled_mask: [N] bool, True for labelled nodes; both classes must be present.
    hidden, dropout_rate, num_layers: GCN architecture (see `GCN`).
    lambda_: Eq. 6 weight of the unlabelled term.
    steps: number of full-graph Adam steps (static).
    learning_rate, weight_decay: Adam settings.
    params: optional initial parameters (e.g. `params_from_torch(np.load('gcn_init.npz'))`).
    adjacency: "dense" (N x N matrix, as the reference), "factored" (never forms it; the same
      operator up to float rounding), "auto" (the cheaper that fits, see `choose_adjacency`), or
      the ablations "identity" (A = I) and "ones" (`OnesAdjacency`, matrix-free).
    architecture: "gcn", or "mlp" for `MLPDiscriminator` (UncertainDiscriminator; no graph).
    chunk_steps: most Adam steps per compiled chunk (`GCN_CHUNK_STEPS`), >= 2.
    on_chunk: optional `on_chunk(first_step, losses)` called after each chunk with its [k]
      host losses (progress of a long training; `samplers` report them as "gcn"/"mlp").
  Returns:
    `GCNResult(params, scores [N], embedding [N, hidden + 1], losses [steps])`; scores and
    embedding come from an eval-mode (no dropout) pass after training.
  Raises:
    ValueError: bad features (non-finite, degenerate column sums), a mask of the wrong length or
      without both labelled and unlabelled nodes, a bad option.
    FloatingPointError: training diverged (non-finite scores or embedding).
  """
  check_gcn_options(hidden=hidden, dropout_rate=dropout_rate, num_layers=num_layers,
                    lambda_=lambda_, steps=steps, learning_rate=learning_rate,
                    weight_decay=weight_decay, adjacency=adjacency, architecture=architecture)
  if not checks.is_int(chunk_steps) or chunk_steps < 2:
    raise ValueError(f"chunk_steps must be an int >= 2, got {chunk_steps!r}")
  features = checks.features(features)
  labelled_mask = checks.mask(labelled_mask, features.shape[0], need_both=True)
  unit = l2_normalize(features)
  uses_similarity = architecture == "gcn" and adjacency in ("auto", "dense", "factored")
  if uses_similarity:
    checks.column_sums(column_sums(unit))
  if adjacency == "auto":
    adjacency = choose_adjacency(unit.shape[0], unit.shape[1], unit.dtype)
  if params is not None:
    params = jax.tree.map(lambda p: jnp.asarray(p, unit.dtype), params)
  net = dict(hidden=int(hidden), dropout_rate=float(dropout_rate), num_layers=int(num_layers),
             adjacency_mode=adjacency, architecture=architecture)
  result = _train_in_chunks(key, unit, labelled_mask, params, lambda_, learning_rate,
                            weight_decay, steps=int(steps), chunk_steps=int(chunk_steps),
                            on_chunk=on_chunk, **net)
  if not (np.isfinite(np.asarray(result.scores)).all()
          and np.isfinite(np.asarray(result.embedding)).all()):
    raise FloatingPointError(
        f"the sampler's {architecture.upper()} diverged: non-finite scores or embedding after "
        f"{steps} steps at learning_rate {learning_rate} (the features themselves are finite); "
        "try a smaller sampler learning_rate")
  return result


def params_from_torch(state_dict) -> Params:
  """Converts the reference's GCN `state_dict` (e.g. `np.load('gcn_init.npz')`) to `GCN` params.

  Torch names `gc1.weight` [dim, hidden], `gc1.bias`, `gc3.weight` [hidden, 1], `gc3.bias` (and
  `gc2.*` when present and used by a 3-layer GCN) map to `{'gc1': {'kernel', 'bias'}, ...}`; the
  reference's layout is already (in, out). Unused entries (`linear.*`) are ignored.

  Args:
    state_dict: mapping from torch names to arrays.
  Returns:
    params for a 2-layer `GCN` (add `gc2` to the result yourself for 3 layers).
  """
  params = {}
  for layer in ("gc1", "gc3"):
    params[layer] = {"kernel": jnp.asarray(state_dict[f"{layer}.weight"]),
                     "bias": jnp.asarray(state_dict[f"{layer}.bias"])}
  chex.assert_rank(params["gc1"]["kernel"], 2)
  return params
