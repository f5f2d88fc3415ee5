"""The sequential GCN sampler's public entry: `train_gcn`, its option checks, torch weights.

Implements protocol §3 (paper Eqs. 4-6, reference `GCN`, `BCEAdjLoss`). The parts live in
sibling modules and are re-exported here (`graph.X` is public API for each of them):

* `selection.adjacency`: the graph (`normalized_adjacency`, `factored_adjacency`, `propagate`,
  `choose_adjacency`).
* `selection.gcn_model`: `GCN` (graph convolutions `A (X W) + b`, layer names `gc1`, `gc2`,
  `gc3` as in the reference, returning sigmoid scores and the CoreGCN embedding
  concat(hidden, logit)), `MLPDiscriminator`, `gcn_loss` (Eq. 6), `adam_coupled`, the dropout.
* `selection.gcn_training`: training in compiled chunks on any graph (`train_setup`,
  `train_chunk`, `train_evaluate`, `train_steps`).
* `selection.gcn_fused`: the factored two-layer GCN's training with hand-written gradients in
  linear memory, which `train_gcn` uses for that case (the default on large pools).
"""

import logging
from typing import Callable, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jax_seqgcn import checks
from jax_seqgcn.selection import gcn_fused
from jax_seqgcn.selection import gcn_sharded
from jax_seqgcn.selection import gcn_training
from jax_seqgcn.selection.sharding import spans_devices
# pylint: disable=unused-import  (re-exports)
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
from jax_seqgcn.selection.gcn_model import ARCHITECTURES
from jax_seqgcn.selection.gcn_model import GCN
from jax_seqgcn.selection.gcn_model import GCN_DEFAULTS
from jax_seqgcn.selection.gcn_model import GCNResult
from jax_seqgcn.selection.gcn_model import GraphConv
from jax_seqgcn.selection.gcn_model import MLPDiscriminator
from jax_seqgcn.selection.gcn_model import Params
from jax_seqgcn.selection.gcn_model import adam_coupled
from jax_seqgcn.selection.gcn_model import dropout_keep
from jax_seqgcn.selection.gcn_model import gcn_loss
from jax_seqgcn.selection.gcn_model import gcn_loss_from_logits
from jax_seqgcn.selection.gcn_training import GCN_CHUNK_STEPS
from jax_seqgcn.selection.gcn_training import TRAIN_STATIC_ARGNAMES
from jax_seqgcn.selection.gcn_training import train_chunk
from jax_seqgcn.selection.gcn_training import train_evaluate
from jax_seqgcn.selection.gcn_training import train_setup
from jax_seqgcn.selection.gcn_training import train_steps
# pylint: enable=unused-import

_LOG = logging.getLogger(__name__)


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
              on_chunk: Optional[Callable[[int, np.ndarray], None]] = None,
              mesh: Optional[Mesh] = None) -> GCNResult:
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
    mesh: optional mesh with an axis 'data' spanning several devices (or processes): the
      factored two-layer GCN then trains with the nodes split over it
      (`gcn_sharded.train_gcn_sharded`; "auto" means "factored" there) and returns host arrays,
      the same on every process. Other architectures, graphs and layer counts run on one
      device, as without a mesh (logged).
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
  options = dict(steps=int(steps), chunk_steps=int(chunk_steps), on_chunk=on_chunk)
  net = dict(hidden=int(hidden), dropout_rate=float(dropout_rate))
  if spans_devices(mesh):
    if architecture == "gcn" and adjacency in ("auto", "factored") and num_layers == 2:
      result = gcn_sharded.train_gcn_sharded(
          key, features, labelled_mask, mesh, lambda_=lambda_, learning_rate=learning_rate,
          weight_decay=weight_decay, params=params, **net, **options)
      return _checked(result, architecture, steps, learning_rate)
    _LOG.info("the %s (adjacency %r, %d layers) trains on one device: only the factored "
              "two-layer GCN is split over the mesh", architecture, adjacency, num_layers)
  features = checks.features(features)
  labelled_mask = checks.mask(labelled_mask, features.shape[0], need_both=True)
  if adjacency == "auto":
    adjacency = choose_adjacency(features.shape[0], features.shape[1], features.dtype)
  if params is not None:
    params = jax.tree.map(lambda p: jnp.asarray(p, features.dtype), params)
  if architecture == "gcn" and adjacency == "factored" and num_layers == 2:
    result = _train_fused(key, features, labelled_mask, params, lambda_, learning_rate,
                          weight_decay, **net, **options)
  else:
    unit = l2_normalize(features)
    if architecture == "gcn" and adjacency in ("dense", "factored"):
      checks.column_sums(column_sums(unit))
    result = gcn_training.train_in_chunks(
        key, unit, labelled_mask, params, lambda_, learning_rate, weight_decay,
        num_layers=int(num_layers), adjacency_mode=adjacency, architecture=architecture, **net,
        **options)
  return _checked(result, architecture, steps, learning_rate)


def _checked(result, architecture, steps, learning_rate):
  if not (np.isfinite(np.asarray(result.scores)).all()
          and np.isfinite(np.asarray(result.embedding)).all()):
    raise FloatingPointError(
        f"the sampler's {architecture.upper()} diverged: non-finite scores or embedding after "
        f"{steps} steps at learning_rate {learning_rate} (the features themselves are finite); "
        "try a smaller sampler learning_rate")
  return result


def _train_fused(key, features, labelled_mask, params, lambda_, learning_rate, weight_decay, *,
                 hidden, dropout_rate, steps, chunk_steps, on_chunk) -> GCNResult:
  """`train_gcn` for the factored two-layer GCN through `selection.gcn_fused` (same arithmetic
  as `gcn_training`, checked in tests/test_gcn_fused.py)."""
  norms, sums = gcn_fused.norms_and_column_sums_jit(features)
  checks.column_sums(sums)
  fused = gcn_fused.build_graph_jit(features, norms, sums)
  if params is None:
    params = gcn_fused.init_params(key, features.shape[1], hidden, dropout_rate, features.dtype)

  def chunk(params, opt_state, first, length):
    return gcn_fused.train_chunk_jit(key, fused, labelled_mask, ~labelled_mask, params,
                                     opt_state, first, steps, lambda_, learning_rate,
                                     weight_decay, dropout_rate=dropout_rate, steps=length)

  params, losses = gcn_training.run_chunks(chunk, params, gcn_fused.init_state(params),
                                           steps=steps, chunk_steps=chunk_steps,
                                           on_chunk=on_chunk)
  scores, embedding = gcn_fused.evaluate_jit(fused, params)
  return GCNResult(params, scores, embedding, jnp.asarray(losses, features.dtype))


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
