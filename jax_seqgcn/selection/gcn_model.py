"""The sampler's networks and their loss: `GCN`, `MLPDiscriminator`, Eq. 6, torch-style Adam.

Protocol §3 (paper Eqs. 5-6, reference `GCN`, `BCEAdjLoss`). Training lives in
`selection.gcn_training` (any graph) and `selection.gcn_fused` (the factored two-layer GCN);
`selection.graph` is the public entry (`train_gcn`) and re-exports these names.

Dropout (a named deviation): the hidden layers' dropout masks come from `dropout_keep`, a
counter-based hash of (row, column) seeded by two words drawn from the key, not from
`jax.random.bernoulli`. Threefry bits cost more than the GCN's own matrix products on a CPU
(0.30 s against 0.19 s per step at 128k nodes, measured); the hash costs almost nothing and,
being a function of the global row index, gives the same mask however the nodes are split
over devices. Keep probability is 1 - round(rate * 2**32) / 2**32.
"""

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_seqgcn.selection.adjacency import HIGHEST
from jax_seqgcn.selection.adjacency import propagate

Params = Any

ARCHITECTURES = ("gcn", "mlp")
# The sampler GCN's options and their defaults (the reference's, see `train_gcn`); the GCN
# samplers, their registry entries and configs/default.py all read them from here.
GCN_DEFAULTS = dict(hidden=128, dropout_rate=0.3, num_layers=2, lambda_=1.2, steps=200,
                    learning_rate=1e-3, weight_decay=5e-4, adjacency="auto")


def _lowbias32(x):
  # A 32-bit integer hash with low bias (xorshift-multiply, C. Wellons' "lowbias32"); a bijection.
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def dropout_threshold(rate: float) -> int:
  """The uint32 threshold of `dropout_keep`: a hash below it drops the element."""
  return min(int(round(float(rate) * 2.0 ** 32)), 2 ** 32 - 1)


def dropout_keep(key: jax.Array, shape, rate: float, row_offset=0) -> jax.Array:
  """[rows, width] bool keep mask of dropout at `rate`, a pure function of (key, row, column).

  Element (i, j) is kept iff lowbias32(lowbias32((row_offset + i) ^ s0) + j * phi + s1) >=
  `dropout_threshold(rate)`, with (s0, s1) = `jax.random.bits(key, (2,), uint32)` and phi the
  32-bit golden ratio. The rows of a shard at `row_offset` get the same mask as those rows of the
  whole array.

  Args:
    key: PRNG key (one per step and layer).
    shape: static (rows, width).
    rate: static drop probability in [0, 1).
    row_offset: global index of row 0 (int or traced int32 scalar).
  Returns:
    [rows, width] bool, True where the element is kept.
  """
  seeds = jax.random.bits(key, (2,), jnp.uint32)
  rows = (jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
          + jnp.asarray(row_offset).astype(jnp.uint32))
  cols = jax.lax.broadcasted_iota(jnp.uint32, shape, 1)
  bits = _lowbias32(_lowbias32(rows ^ seeds[0]) + cols * jnp.uint32(0x9E3779B9) + seeds[1])
  return bits >= jnp.uint32(dropout_threshold(rate))


def apply_dropout(x: jax.Array, key: jax.Array, rate: float) -> jax.Array:
  """Dropout of [rows, width] `x` as flax's (`where(keep, x / (1 - rate), 0)`) with the
  `dropout_keep` mask; the identity when `rate` is 0."""
  if rate == 0.0:
    return x
  return jnp.where(dropout_keep(key, x.shape, rate), x / (1.0 - rate), 0.0)


def layer_key(dropout_key: jax.Array, layer: int) -> jax.Array:
  """The dropout key of hidden layer `layer` (0-based) for one step's `dropout_key`."""
  return jax.random.fold_in(dropout_key, layer)


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


def _dropout_key(module, dropout_key):
  return module.make_rng("dropout") if dropout_key is None else dropout_key


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
  def __call__(self, features, adjacency, *, train: bool, propagated_features=None,
               dropout_key=None):
    """Scores every node.

    Args:
      features: [N, dim] node features V (the sampler passes L2-normalised embeddings).
      adjacency: dense [N, N] or `FactoredAdjacency`.
      train: enables dropout (`dropout_keep` masks from `dropout_key`, or else from the
        'dropout' rng).
      propagated_features: optional [N, dim] = A @ features, to skip that product.
      dropout_key: optional PRNG key of this step's dropout (layer i uses `layer_key(key, i)`).
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
      if train and self.dropout_rate > 0:
        h = apply_dropout(h, layer_key(_dropout_key(self, dropout_key), i), self.dropout_rate)
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
  def __call__(self, features, adjacency=None, *, train: bool, propagated_features=None,
               dropout_key=None):
    """Scores every node from its own features alone.

    Args:
      features: [N, dim]; `adjacency` and `propagated_features` are accepted and ignored.
      train, dropout_key: as `GCN`.
    Returns:
      (scores [N], embedding [N, width + 1]) as `GCN`.
    """
    del adjacency, propagated_features
    if self.num_layers not in (1, 2, 3):
      raise ValueError(f"num_layers must be 1, 2 or 3, got {self.num_layers}")
    names = {1: ["gc3"], 2: ["gc1", "gc3"], 3: ["gc1", "gc2", "gc3"]}[self.num_layers]
    h = features
    for layer, name in enumerate(names):
      fan_in = h.shape[-1]
      bias_init = lambda key, shape, dtype, fan_in=fan_in: jax.random.uniform(
          key, shape, dtype, -1.0 / np.sqrt(fan_in), 1.0 / np.sqrt(fan_in))
      width = 1 if name == "gc3" else self.hidden
      out = nn.Dense(width, kernel_init=_uniform_fan_in, bias_init=bias_init,
                     param_dtype=self.param_dtype, precision=HIGHEST, name=name)(h)
      if name == "gc3":
        return nn.sigmoid(out[:, 0]), jnp.concatenate([h, out], axis=-1)
      h = nn.relu(out)
      if train and self.dropout_rate > 0:
        h = apply_dropout(h, layer_key(_dropout_key(self, dropout_key), layer),
                          self.dropout_rate)
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


def network(unit_features, *, hidden, dropout_rate, num_layers, architecture):
  """The `GCN` (architecture "gcn") or `MLPDiscriminator` ("mlp") of these options, with
  parameters of the features' dtype."""
  cls = MLPDiscriminator if architecture == "mlp" else GCN
  return cls(hidden, dropout_rate, num_layers, param_dtype=unit_features.dtype)
