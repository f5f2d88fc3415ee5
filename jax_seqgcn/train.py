"""Learner training, evaluation and feature extraction, with the data kept on device.

Models follow the learner interface of `jax_seqgcn.models`:
`model.apply(variables, x, train=bool, mutable=[...])` with `x` [B, H, W, C] float32 and
output `(outputs, embedding, stage_features)`: logits [B, classes] (or regression [B, J*3]),
embedding [B, D], and a tuple of 4 stage arrays. BatchNorm statistics live in the
'batch_stats' collection (absent for nets without BatchNorm).

Optimisers (protocol §2):
  * classification: SGD, momentum 0.9, coupled weight decay 5e-4 (torch `SGD(weight_decay=)`:
    the decay is added to the gradient before the momentum buffer), lr 0.1 multiplied by
    `gamma` = 0.1 at each milestone epoch (default 160 of 200), softmax cross-entropy;
  * regression: Adam lr 1e-3 (coupled weight decay, default 0), loss Eq. 2: targets
    [B, J*3] are viewed as [B, J, 3]; an example's loss is the mean over its J joints of the
    squared Euclidean error (sum over x, y, z), and the batch loss is the mean over examples.

The learning rate is a hyperparameter inside the optimiser state (`optax.inject_hyperparams`)
set at the start of every epoch, so the schedule steps per epoch whatever the number of
steps per epoch (equivalently: boundaries at `milestone * steps_per_epoch` steps).

Epoch semantics (`fit`). The n labelled images (uint8) and targets are put on device once,
padded up to a bucketed capacity `padded_capacity(n, batch_size)` (a power-of-two number of
batches), so that a growing labelled set recompiles only when it crosses a bucket. One
epoch is one jitted call: a key-dependent permutation of the n real examples is cut into
ceil(n / batch_size) batches (a dynamic trip count, so no recompile inside a bucket); every
real example is used exactly once per epoch, like a torch DataLoader with
`shuffle=True, drop_last=False`. The last batch, if short, is filled up to `batch_size`
with duplicates of other real examples of the same epoch that carry loss weight 0: they
take part in BatchNorm's batch statistics (as real images, never padding garbage) but not
in the loss, which is the mean over the real examples of each batch (torch's smaller last
batch gives the same loss). Per-step augmentation keys are
`jax.random.fold_in(key, state.step)`.

Learning Loss. `fit(..., loss_prediction=LossPrediction(...))` trains a LossNet jointly with
the learner (see `jax_seqgcn.loss_prediction`); the state then also holds `loss_net` and
`loss_net_params`, and `forward_pool` adds the predicted losses to its single eval pass.
"""

import functools
import math
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from jax_seqgcn import augment
from jax_seqgcn import loss_prediction as loss_prediction_lib
from jax_seqgcn import parallel
from jax_seqgcn import precision
from jax_seqgcn.models import conv

TASKS = ("classification", "regression")

# Per-task defaults of `fit` (protocol §2).
DEFAULTS = {
    "classification": dict(epochs=200, learning_rate=0.1, momentum=0.9, weight_decay=5e-4,
                           milestones=(160,), gamma=0.1),
    "regression": dict(epochs=200, learning_rate=1e-3, momentum=0.9, weight_decay=0.0,
                       milestones=(), gamma=0.1),
}

# Python-side trace counters (tests use them to assert "no recompile").
TRACE_COUNTS = {"epoch": 0, "step": 0, "forward": 0}

LossPrediction = loss_prediction_lib.LossPrediction


class TrainState(train_state.TrainState):
  """Flax TrainState plus the BatchNorm statistics ({} for nets without BatchNorm).

  With Learning Loss (`fit(..., loss_prediction=...)`), also the LossNet: `loss_net` (the
  module, static) and `loss_net_params`, and `opt_state` is over `(params, loss_net_params)`.
  Both are None for a plain learner.
  """
  batch_stats: Any
  loss_net_params: Any = None
  loss_net: Any = struct.field(pytree_node=False, default=None)


def _check_task(task: str) -> None:
  if task not in TASKS:
    raise ValueError(f"task must be one of {TASKS}, got {task!r}.")


@functools.lru_cache(maxsize=64)
def make_optimizer(*, task: str, learning_rate: float, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> optax.GradientTransformation:
  """The optimiser of a task, with `learning_rate` injected into its state.

  Cached, so equal arguments give the identical object: `TrainState.tx` is static pytree
  data, and a new optimiser object per active-learning cycle would force a recompile.

  Args:
    task: "classification" (SGD with `momentum`) or "regression" (Adam; `momentum` unused).
    learning_rate: initial learning rate (changed per epoch via `set_learning_rate`).
    momentum: SGD momentum (torch semantics: buffer = momentum * buffer + grad).
    weight_decay: coupled L2: `weight_decay * param` is added to the gradient first.
  Returns:
    `optax.GradientTransformation` whose state has `hyperparams['learning_rate']`.
  """
  _check_task(task)

  def classification(learning_rate):
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(learning_rate, momentum=momentum or None))

  def regression(learning_rate):
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))

  build = classification if task == "classification" else regression
  return optax.inject_hyperparams(build)(learning_rate=learning_rate)


def learning_rate_at_epoch(epoch: int, *, learning_rate: float, milestones: Sequence[int],
                           gamma: float) -> float:
  """Step schedule (torch MultiStepLR): `learning_rate * gamma ** #{m in milestones: m <= epoch}`.

  Args:
    epoch: 0-based epoch index.
  Returns:
    Python float.
  """
  return float(learning_rate * gamma ** sum(int(epoch) >= int(m) for m in milestones))


def set_learning_rate(state: TrainState, learning_rate) -> TrainState:
  """Returns `state` with the injected learning rate replaced (works under jit)."""
  hyperparams = dict(state.opt_state.hyperparams)
  old = hyperparams["learning_rate"]
  hyperparams["learning_rate"] = jnp.asarray(learning_rate, dtype=jnp.asarray(old).dtype)
  return state.replace(opt_state=state.opt_state._replace(hyperparams=hyperparams))


@functools.lru_cache(maxsize=64)
def _apply_fn(model):
  # One bound method per equal model: `apply_fn` is static pytree data compared by ==, and
  # bound methods of distinct (even equal) modules compare unequal.
  return model.apply


def _check_hashable(model) -> None:
  try:
    hash(model)
  except TypeError as err:
    raise ValueError("The model must be hashable (jitted functions are cached per model); "
                     "use tuples rather than lists for module fields.") from err


def _key_data(key) -> np.ndarray:
  """Raw uint32 data of a typed or legacy key, as NumPy (replicable on any mesh)."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return np.asarray(key, dtype=np.uint32)


@functools.lru_cache(maxsize=32)
def _init_fn(model, input_shape, tx, mesh, loss_net):
  info = {}

  def init(key_data):
    x = jnp.zeros((1,) + input_shape, jnp.float32)
    key = jax.random.wrap_key_data(key_data)
    (outputs, embedding, stage_features), variables = model.init_with_output(
        {"params": key}, x, train=False)
    info.update(output_dim=outputs.shape[-1], embedding_dim=embedding.shape[-1])
    state = TrainState.create(apply_fn=_apply_fn(model), params=variables["params"], tx=tx,
                              batch_stats=variables.get("batch_stats", {}))
    if loss_net is None:
      return state
    # A key of its own: the learner's initialisation stays that of a plain fit.
    loss_net_params = loss_net.init(jax.random.fold_in(key, 2), stage_features)["params"]
    return state.replace(loss_net=loss_net, loss_net_params=loss_net_params,
                         opt_state=tx.init((state.params, loss_net_params)))

  return jax.jit(init, out_shardings=parallel.replicated(mesh)), info


def init_train_state(key: jax.Array, model, input_shape: Sequence[int], *,
                     task: str = "classification", learning_rate: Optional[float] = None,
                     momentum: Optional[float] = None, weight_decay: Optional[float] = None,
                     mesh=None, loss_prediction: Optional[LossPrediction] = None) -> TrainState:
  """Fresh learner variables and optimiser state, replicated on the mesh.

  Args:
    key: PRNG key for the parameters.
    model: Flax learner module (hashable).
    input_shape: (H, W, C) of one preprocessed image.
    task, learning_rate, momentum, weight_decay: see `make_optimizer`; None = `DEFAULTS`.
    mesh: data mesh; None = `parallel.make_mesh()` (all devices).
    loss_prediction: if set, the state also holds a fresh LossNet of that width (the
      learner's parameters are the same as without it).
  Returns:
    `TrainState` with step 0.
  """
  loss_net = None
  if loss_prediction is not None:
    loss_net = loss_prediction_lib.make_loss_net(loss_prediction_lib.resolve(loss_prediction, 1))
  state, _ = _init_with_info(key, model, input_shape, task=task, learning_rate=learning_rate,
                             momentum=momentum, weight_decay=weight_decay, mesh=mesh,
                             loss_net=loss_net)
  return state


def _init_with_info(key, model, input_shape, *, task, learning_rate, momentum, weight_decay,
                    mesh, loss_net=None):
  _check_task(task)
  _check_hashable(model)
  defaults = DEFAULTS[task]
  tx = make_optimizer(
      task=task,
      learning_rate=float(defaults["learning_rate"] if learning_rate is None else learning_rate),
      momentum=float(defaults["momentum"] if momentum is None else momentum),
      weight_decay=float(defaults["weight_decay"] if weight_decay is None else weight_decay))
  mesh = parallel.make_mesh() if mesh is None else mesh
  init, info = _init_fn(model, tuple(int(d) for d in input_shape), tx, mesh, loss_net)
  return init(_key_data(key)), info


def per_example_loss(outputs: jax.Array, targets: jax.Array, *, task: str) -> jax.Array:
  """Per-example training loss.

  Args:
    outputs: [B, C] logits, or [B, J*3] predicted joint coordinates.
    targets: [B] int labels, or [B, J*3] float coordinates.
    task: "classification" (softmax cross-entropy) or "regression" (Eq. 2: mean over the J
      joints of the squared Euclidean error).
  Returns:
    [B] float32.
  """
  if task == "classification":
    return optax.softmax_cross_entropy_with_integer_labels(outputs.astype(jnp.float32),
                                                           targets)
  diff = (outputs.astype(jnp.float32) - targets).reshape(outputs.shape[0], -1, 3)
  return jnp.mean(jnp.sum(diff**2, axis=-1), axis=-1)


def _train_step(state, images, targets, weights, rng, *, model, task, spec, batch_sharding,
                loss_prediction=None, detached=False, compute_dtype="float32"):
  """One SGD step on a [B, ...] raw batch; `weights` [B] are 1 (real) or 0 (filler).

  With `loss_prediction` (`loss_prediction.JointSettings`, may be traced), a joint learner +
  LossNet step; `detached` (a traced bool) puts the stage features behind stop_gradient for
  the LossNet.
  """
  TRACE_COUNTS["step"] += 1
  if (loss_prediction is None) != (state.loss_net_params is None):
    raise ValueError("A state holding a LossNet is trained with fit(..., loss_prediction=...) "
                     "and a plain state without it.")
  constrain = lambda x: jax.lax.with_sharding_constraint(x, batch_sharding)
  images, targets, weights = constrain(images), constrain(targets), constrain(weights)
  dtype = jnp.dtype(compute_dtype)
  x = augment.apply_spec(rng, images, spec, train=True).astype(dtype)

  def loss_fn(params, loss_net_params):
    # Mixed precision (see `jax_seqgcn.precision`): float32 master parameters cast for the
    # forward pass; the loss is computed in float32 (per_example_loss upcasts the outputs).
    variables = {"params": precision.cast_floating(params, dtype)}
    if state.batch_stats:
      variables["batch_stats"] = state.batch_stats
    (outputs, _, stage_features), mutated = model.apply(variables, x, train=True,
                                                        mutable=["batch_stats"])
    outputs, stage_features = precision.to_float32((outputs, stage_features))
    losses = per_example_loss(outputs, targets, task=task)
    loss_sum = jnp.sum(weights * losses)
    objective = loss_sum / jnp.maximum(jnp.sum(weights), 1.0)
    ranking = None
    if loss_prediction is not None:
      ranking, _ = loss_prediction_lib.ranking_term(
          state.loss_net, loss_net_params, stage_features, losses, weights,
          margin=loss_prediction.margin, detached=detached)
      objective = objective + loss_prediction.weight * ranking
    return objective, (mutated, outputs, loss_sum, ranking)

  batch_stats = lambda mutated: mutated.get("batch_stats", state.batch_stats)
  if loss_prediction is None:
    grads, (mutated, outputs, loss_sum, _) = jax.grad(loss_fn, has_aux=True)(state.params,
                                                                               None)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats(mutated))
    metrics = {"loss_sum": loss_sum, "count": jnp.sum(weights)}
  else:
    (grads, loss_net_grads), (mutated, outputs, loss_sum, ranking) = jax.grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state.params, state.loss_net_params)
    state = loss_prediction_lib.apply_joint_gradients(state, grads, loss_net_grads,
                                                      batch_stats=batch_stats(mutated))
    metrics = {"loss_sum": loss_sum, "count": jnp.sum(weights), "ranking_sum": ranking}
  if task == "classification":
    hits = (jnp.argmax(outputs, axis=-1) == targets).astype(jnp.float32)
    metrics["correct"] = jnp.sum(weights * hits)
  return state, metrics


def epoch_order(key: jax.Array, num_real, capacity: int):
  """The example order of one epoch over a padded labelled set.

  Args:
    key: PRNG key.
    num_real: int scalar n >= 1 (may be traced), the real examples are slots [0, n).
    capacity: static int C >= n, the padded length.
  Returns:
    indices: [C] int32; positions [0, n) hold a uniformly random permutation of the real
      slots, and position p >= n holds `indices[(p - n) % n]` (a real example, a duplicate).
    weights: [C] float32; 1 for positions [0, n), 0 after.
  """
  positions = jnp.arange(capacity)
  is_real = positions < num_real
  # 32 random bits per slot (float uniforms would tie often at ~50k slots). Padding slots get
  # the maximum; a real slot drawing it too still sorts first: the sort is stable and real
  # slots have the lower indices.
  bits = jax.random.bits(key, (capacity,), jnp.uint32)
  sort_key = jnp.where(is_real, bits, jnp.uint32(np.iinfo(np.uint32).max))
  permutation = jnp.argsort(sort_key, stable=True).astype(jnp.int32)
  fillers = permutation[(positions - num_real) % jnp.maximum(num_real, 1)]
  return jnp.where(is_real, permutation, fillers), is_real.astype(jnp.float32)


def _train_epoch(state, images, targets, num_real, key_data, epoch, learning_rate,
                 loss_prediction, *, model, task, spec, batch_size, batch_sharding,
                 compute_dtype):
  TRACE_COUNTS["epoch"] += 1
  key = jax.random.wrap_key_data(key_data)
  shuffle_key = jax.random.fold_in(jax.random.fold_in(key, 0), epoch)
  augment_key = jax.random.fold_in(key, 1)
  state = set_learning_rate(state, learning_rate)
  indices, weights = epoch_order(shuffle_key, num_real, images.shape[0])
  num_steps = (num_real + batch_size - 1) // batch_size

  def body(i, carry):
    state, sums = carry
    batch_indices = jax.lax.dynamic_slice_in_dim(indices, i * batch_size, batch_size)
    batch_weights = jax.lax.dynamic_slice_in_dim(weights, i * batch_size, batch_size)
    rng = jax.random.fold_in(augment_key, state.step)
    state, metrics = _train_step(state, images[batch_indices], targets[batch_indices],
                                 batch_weights, rng, model=model, task=task, spec=spec,
                                 batch_sharding=batch_sharding, loss_prediction=loss_prediction,
                                 detached=detached, compute_dtype=compute_dtype)
    return state, jax.tree.map(jnp.add, sums, metrics)

  zeros = {"loss_sum": 0.0, "count": 0.0}
  if task == "classification":
    zeros["correct"] = 0.0
  detached = False
  if loss_prediction is not None:
    zeros["ranking_sum"] = 0.0
    # Traced (epoch and detach_epoch are arguments): the switch costs no recompile.
    detached = epoch >= loss_prediction.detach_epoch
  zeros = jax.tree.map(lambda z: jnp.zeros((), jnp.float32), zeros)
  state, sums = jax.lax.fori_loop(0, num_steps, body, (state, zeros))
  count = jnp.maximum(sums["count"], 1.0)
  metrics = {"loss": sums["loss_sum"] / count, "learning_rate": jnp.float32(learning_rate)}
  if task == "classification":
    metrics["accuracy"] = sums["correct"] / count
  if loss_prediction is not None:
    metrics["ranking_loss"] = sums["ranking_sum"] / jnp.maximum(num_steps, 1)
  return state, metrics


@functools.lru_cache(maxsize=32)
def _epoch_fn(model, task, spec, batch_size, mesh, compute_dtype="float32"):
  # `loss_prediction` is None or `JointSettings` arrays: its structure (not its values) is
  # part of the trace, so a plain and a joint fit compile once each.
  fn = functools.partial(_train_epoch, model=model, task=task, spec=spec,
                         batch_size=batch_size, batch_sharding=parallel.data_sharding(mesh),
                         compute_dtype=compute_dtype)
  rep = parallel.replicated(mesh)
  return jax.jit(fn, in_shardings=rep, out_shardings=rep, donate_argnums=0)


def make_train_step(model, *, task: str = "classification", preprocessing=None, mesh=None,
                    compute_dtype: str = "float32"):
  """A jitted step for externally fed batches (e.g. each host feeding its part).

  Args:
    model: Flax learner.
    task: "classification" or "regression".
    preprocessing: `PreprocessSpec`, dataset name or None (see `augment.as_spec`).
    mesh: data mesh; None = all devices.
    compute_dtype: "float32" or "bfloat16" (see `jax_seqgcn.precision`).
  Returns:
    `step(state, images, targets, weights, key) -> (state, metrics)`: images [B, H, W, C]
    raw, targets [B] or [B, K], weights [B] float (1 real / 0 filler), all sharded
    `P('data')`; key a PRNG key (per-step rng `fold_in(key, state.step)`); state donated.
    metrics: dict of scalar sums 'loss_sum', 'count' (+ 'correct'). Plain learners only: a
    state holding a LossNet is trained by `fit(..., loss_prediction=...)`.
  """
  _check_task(task)
  _check_hashable(model)
  mesh = parallel.make_mesh() if mesh is None else mesh
  return _step_fn(model, task, augment.as_spec(preprocessing), mesh,
                  precision.check_compute_dtype(compute_dtype))


@functools.lru_cache(maxsize=32)
def _step_fn(model, task, spec, mesh, compute_dtype):
  batch = parallel.data_sharding(mesh)
  rep = parallel.replicated(mesh)

  def step(state, images, targets, weights, key_data):
    rng = jax.random.fold_in(jax.random.wrap_key_data(key_data), state.step)
    return _train_step(state, images, targets, weights, rng, model=model, task=task,
                       spec=spec, batch_sharding=batch, compute_dtype=compute_dtype)

  jitted = jax.jit(step, in_shardings=(rep, batch, batch, batch, rep), out_shardings=rep,
                   donate_argnums=0)
  return lambda state, images, targets, weights, key: jitted(state, images, targets, weights,
                                                            _key_data(key))


def padded_capacity(num_examples: int, batch_size: int) -> int:
  """Bucketed device length of a labelled set: batch_size * next power of two of the batches.

  E.g. batch 128: 1,000 -> 1,024; 1,100 -> 2,048; 5,000 -> 8,192. At most 2x memory, and a
  labelled set growing by a fixed budget recompiles only O(log n) times.
  """
  num_batches = max(1, math.ceil(num_examples / batch_size))
  return batch_size * (1 << (num_batches - 1).bit_length())


def _validate(images, targets, task, batch_size, mesh, *, need_targets=True):
  if images.ndim != 4:
    raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}.")
  if images.shape[0] == 0:
    raise ValueError("The labelled set is empty: fit/evaluate need at least one example.")
  if need_targets:
    if targets.shape[0] != images.shape[0]:
      raise ValueError(f"images and targets have different lengths: {images.shape[0]} vs "
                       f"{targets.shape[0]}.")
    if task == "classification":
      if targets.ndim != 1 or not np.issubdtype(targets.dtype, np.integer):
        raise ValueError(f"classification targets must be [N] integers, got "
                         f"{targets.dtype} {targets.shape}.")
      if targets.min() < 0:
        raise ValueError("classification labels must be non-negative.")
    elif targets.ndim != 2 or targets.shape[1] % 3:
      raise ValueError(f"regression targets must be [N, J*3], got shape {targets.shape}.")
  parallel.check_divisible(mesh, batch_size)


def fit(key: jax.Array, model, images, targets, *, task: str = "classification",
        epochs: Optional[int] = None, batch_size: int = 128,
        learning_rate: Optional[float] = None, momentum: Optional[float] = None,
        weight_decay: Optional[float] = None, milestones: Optional[Sequence[int]] = None,
        gamma: Optional[float] = None, preprocessing=None, mesh=None,
        progress: Optional[Callable[[int, int, dict], None]] = None,
        loss_prediction: Optional[LossPrediction] = None,
        compute_dtype: str = "float32") -> TrainState:
  """Trains a fresh learner on a labelled set (see the module docstring for the semantics).

  Args:
    key: PRNG key (initialisation, shuffling, augmentation).
    model: Flax learner (hashable module).
    images: [N, H, W, C] raw images (uint8; float images are not rescaled), host or device;
      multi-host: the same full set in every process.
    targets: [N] int labels (classification) or [N, J*3] float (regression).
    task: "classification" or "regression".
    epochs, learning_rate, momentum, weight_decay, milestones, gamma: None = `DEFAULTS[task]`
      (classification: 200, 0.1, 0.9, 5e-4, (160,), 0.1; regression: 200, Adam 1e-3, wd 0,
      no milestones). The lr is multiplied by `gamma` at the start of each milestone epoch.
    batch_size: global batch, a multiple of the mesh's device count.
    preprocessing: `augment.PreprocessSpec`, dataset name, or None (scaling only).
    mesh: data mesh; None = `parallel.make_mesh()` (all devices of all processes).
    progress: optional `progress(epoch, num_epochs, metrics)` called after each epoch
      (epoch counted from 1; metrics: Python floats 'loss', 'learning_rate' and, for
      classification, 'accuracy' on the augmented training batches; with loss prediction
      also 'ranking_loss', the mean over the epoch's steps). See `text_progress`.
    loss_prediction: None (a plain learner), or `LossPrediction(weight, margin, detach_epoch,
      hidden)` to train a LossNet jointly (Learning Loss): loss = mean task loss + weight *
      ranking loss, one optimiser with the same settings and lr schedule for both (as the
      reference's two SGD optimisers). From the 0-based epoch `detach_epoch` on, the stage
      features reach the LossNet through stop_gradient; None = 60% of `epochs`, as the
      reference, which detaches at epoch 120 of 200. The switch is a traced flag inside the
      jitted epoch: no extra compile. See `jax_seqgcn.loss_prediction`.
    compute_dtype: "float32" (default) or "bfloat16": activations and convolutions in that
      dtype, parameters, optimiser state, BatchNorm statistics and the loss in float32 (see
      `jax_seqgcn.precision`).
  Returns:
    The trained `TrainState` (replicated on the mesh); with `loss_prediction` it also holds
    the LossNet (`loss_net`, `loss_net_params`).
  Raises:
    ValueError: bad inputs or settings (e.g. a negative loss-prediction weight).
  """
  _check_task(task)
  precision.check_compute_dtype(compute_dtype)
  defaults = DEFAULTS[task]
  epochs = defaults["epochs"] if epochs is None else int(epochs)
  learning_rate = defaults["learning_rate"] if learning_rate is None else learning_rate
  milestones = tuple(defaults["milestones"] if milestones is None else milestones)
  gamma = defaults["gamma"] if gamma is None else gamma
  if epochs < 0:
    raise ValueError(f"epochs must be >= 0, got {epochs}.")
  if loss_prediction is not None:
    loss_prediction = loss_prediction_lib.resolve(loss_prediction, epochs)
  mesh = parallel.make_mesh() if mesh is None else mesh
  spec = augment.as_spec(preprocessing)
  images, targets = np.asarray(images), np.asarray(targets)
  _validate(images, targets, task, batch_size, mesh)
  if task == "regression":
    targets = targets.astype(np.float32)

  state, info = _init_with_info(key, model, images.shape[1:], task=task,
                                learning_rate=learning_rate, momentum=momentum,
                                weight_decay=weight_decay, mesh=mesh,
                                loss_net=loss_prediction_lib.make_loss_net(loss_prediction))
  if task == "classification" and targets.max() >= info["output_dim"]:
    raise ValueError(f"label {targets.max()} out of range for a model with "
                     f"{info['output_dim']} outputs.")
  num_real = images.shape[0]
  capacity = padded_capacity(num_real, batch_size)
  pad = [(0, capacity - num_real)]
  device_images, device_targets = parallel.replicate(mesh, (
      np.pad(images, pad + [(0, 0)] * (images.ndim - 1)),
      np.pad(targets, pad + [(0, 0)] * (targets.ndim - 1))))
  epoch_fn = _epoch_fn(model, task, spec, int(batch_size), mesh, compute_dtype)
  settings = (None if loss_prediction is None
              else loss_prediction_lib.joint_settings(loss_prediction))
  key_data = _key_data(jax.random.fold_in(key, 1))
  for epoch in range(epochs):
    lr = learning_rate_at_epoch(epoch, learning_rate=learning_rate, milestones=milestones,
                                gamma=gamma)
    state, metrics = epoch_fn(state, device_images, device_targets, np.int32(num_real),
                              key_data, np.int32(epoch), np.float32(lr), settings)
    if progress is not None:
      progress(epoch + 1, epochs, {k: float(v) for k, v in parallel.to_host(metrics).items()})
  return state


def _variables(state: TrainState) -> dict:
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return variables


@functools.lru_cache(maxsize=32)
def _forward_fn(model, spec, mesh, loss_net=None, compute_dtype="float32"):
  dtype = jnp.dtype(compute_dtype)

  def forward(variables, images):
    TRACE_COUNTS["forward"] += 1
    x = augment.apply_spec(None, images, spec, train=False).astype(dtype)
    learner = dict(variables["learner"], params=precision.cast_floating(
        variables["learner"]["params"], dtype))
    # Top level (no loop): XLA's own convolution is the fast one here, even on CPU.
    with conv.impl_scope("xla"):
      outputs, embedding, stage_features = precision.to_float32(
          model.apply(learner, x, train=False))
    if loss_net is None:
      return outputs, embedding
    return outputs, embedding, loss_net.apply({"params": variables["loss_net"]}, stage_features)

  return jax.jit(forward, in_shardings=(parallel.replicated(mesh), parallel.data_sharding(mesh)),
                 out_shardings=parallel.replicated(mesh))


def _forward(state, model, images, indices, *, batch_size, preprocessing, mesh,
             with_losses=False, compute_dtype="float32"):
  """Eval-mode (outputs [M, ...], embeddings [M, D]) as NumPy over fixed-size batches.

  With `with_losses` (a state holding a LossNet), also the predicted losses [M], from the
  same pass.
  """
  _check_hashable(model)
  mesh = parallel.make_mesh() if mesh is None else mesh
  images = np.asarray(images)
  _validate(images, None, None, batch_size, mesh, need_targets=False)
  indices = (np.arange(images.shape[0]) if indices is None
             else np.asarray(indices, dtype=np.int64).reshape(-1))
  if indices.size and (indices.min() < -images.shape[0] or indices.max() >= images.shape[0]):
    raise ValueError(f"indices out of range for {images.shape[0]} images.")
  loss_net = state.loss_net if with_losses else None
  fn = _forward_fn(model, augment.as_spec(preprocessing), mesh, loss_net,
                   precision.check_compute_dtype(compute_dtype))
  variables = {"learner": _variables(state)}
  if loss_net is not None:
    variables["loss_net"] = state.loss_net_params
  results = []
  for start in range(0, indices.size, batch_size):
    chunk = indices[start:start + batch_size]
    # Fixed batch shape (one compile for any count): pad with copies of the first index.
    padded = np.concatenate([chunk, np.full(batch_size - chunk.size, chunk[0])])
    results.append((chunk.size, fn(variables, parallel.shard_batch(mesh, images[padded]))))
  if not results:
    shapes = jax.eval_shape(
        fn, variables, jax.ShapeDtypeStruct((batch_size,) + images.shape[1:], images.dtype))
    return tuple(np.zeros((0,) + s.shape[1:], np.float32) for s in shapes)
  return tuple(np.concatenate([parallel.to_host(arrays[k])[:n] for n, arrays in results])
               for k in range(len(results[0][1])))


def predict(state: TrainState, model, images, indices=None, *, batch_size: int = 256,
            preprocessing=None, mesh=None, compute_dtype: str = "float32") -> np.ndarray:
  """Eval-mode network outputs (no augmentation).

  Args:
    state: trained `TrainState`.
    model: the learner it belongs to.
    images: [N, H, W, C] raw images (host NumPy; multi-host: the full set in every process).
    indices: optional [M] ints into `images`; None = all N.
    batch_size: fixed device batch (multiple of the device count); one compile for any M.
    preprocessing: `PreprocessSpec`, dataset name or None.
    mesh: data mesh; None = all devices.
    compute_dtype: "float32" or "bfloat16" for the pass (outputs are float32 either way).
  Returns:
    [M, C] float32 NumPy logits (or [M, J*3] coordinates).
  """
  return _forward(state, model, images, indices, batch_size=batch_size,
                  preprocessing=preprocessing, mesh=mesh, compute_dtype=compute_dtype)[0]


def extract_embeddings(state: TrainState, model, images, indices=None, *,
                       batch_size: int = 256, preprocessing=None, mesh=None,
                       compute_dtype: str = "float32") -> np.ndarray:
  """Eval-mode learner embeddings (the features the samplers use; protocol §2).

  Args: as `predict`.
  Returns:
    [M, D] float32 NumPy array, row i for `images[indices[i]]`.
  """
  return _forward(state, model, images, indices, batch_size=batch_size,
                  preprocessing=preprocessing, mesh=mesh, compute_dtype=compute_dtype)[1]


def forward_pool(state: TrainState, model, images, indices=None, *, task: str = "classification",
                 batch_size: int = 256, preprocessing=None, mesh=None,
                 compute_dtype: str = "float32") -> dict:
  """What the samplers can read about some images, from one eval-mode pass.

  Args: as `predict`; `task` decides whether class probabilities exist.
  Returns:
    dict of NumPy arrays, row i for `images[indices[i]]`: "embedding" [M, D] float32, for
    classification "probabilities" [M, C] float32 (softmax of the logits), and when the state
    holds a LossNet (`fit(..., loss_prediction=...)`) "predicted_losses" [M] float32, computed
    from the stage outputs of the same pass.
  """
  _check_task(task)
  with_losses = state.loss_net_params is not None
  outputs, embedding, *predicted = _forward(state, model, images, indices,
                                            batch_size=batch_size, preprocessing=preprocessing,
                                            mesh=mesh, with_losses=with_losses,
                                            compute_dtype=compute_dtype)
  result = {"embedding": embedding}
  if task == "classification":
    result["probabilities"] = np.asarray(jax.nn.softmax(outputs.astype(np.float32), axis=-1))
  if with_losses:
    result["predicted_losses"] = predicted[0].astype(np.float32)
  return result


def evaluate(state: TrainState, model, images, targets, *, task: str = "classification",
             batch_size: int = 256, preprocessing=None, mesh=None,
             compute_dtype: str = "float32") -> float:
  """Test metric in eval mode, no augmentation.

  Args:
    images: [N, H, W, C] raw images; targets: [N] int labels or [N, J*3] coordinates.
    task: "classification" -> accuracy in [0, 1]; "regression" -> mean joint error: the
      Euclidean distance per joint, averaged over joints and examples (targets' units).
    Others: as `predict`.
  Returns:
    Python float.
  """
  _check_task(task)
  images, targets = np.asarray(images), np.asarray(targets)
  mesh = parallel.make_mesh() if mesh is None else mesh
  _validate(images, targets, task, batch_size, mesh)
  outputs = predict(state, model, images, batch_size=batch_size, preprocessing=preprocessing,
                    mesh=mesh, compute_dtype=compute_dtype)
  if task == "classification":
    return float(np.mean(np.argmax(outputs, axis=-1) == targets))
  diff = (outputs.astype(np.float64) - targets).reshape(len(targets), -1, 3)
  return float(np.mean(np.sqrt(np.sum(diff**2, axis=-1))))


def text_progress(*, every: int = 1, stream=None, prefix: str = "") -> Callable:
  """A `progress` callback printing one line per `every` epochs with time per epoch and ETA.

  Create it right before `fit` (the clock starts here). The first epoch includes
  compilation, so the rate is measured from its end once possible.

  Args:
    every: print after every `every`-th epoch (and after the last).
    stream: file to print to; None = sys.stderr.
    prefix: text put before each line (e.g. "cycle 3 ").
  Returns:
    `progress(epoch, num_epochs, metrics)` callable.
  """
  start = {"time": time.perf_counter(), "first_done": None}

  def show(epoch: int, num_epochs: int, metrics: dict) -> None:
    now = time.perf_counter()
    if epoch == 1:
      start["first_done"] = now
    if epoch % every and epoch != num_epochs:
      return
    if epoch > 1 and start["first_done"] is not None:
      per_epoch = (now - start["first_done"]) / (epoch - 1)
    else:
      per_epoch = now - start["time"]
    eta = per_epoch * (num_epochs - epoch)
    values = " ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))
    print(f"{prefix}epoch {epoch}/{num_epochs} {values} | {per_epoch:.2f} s/epoch, "
          f"ETA {_format_seconds(eta)}", file=stream or sys.stderr, flush=True)

  return show


def _format_seconds(seconds: float) -> str:
  minutes, seconds = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"
