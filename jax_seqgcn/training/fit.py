"""Learner training with the data kept on device: the loss, the jitted step and epoch, `fit`.

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

Regression loss (Eq. 2): targets [B, J*3] are viewed as [B, J, 3]; an example's loss is the
mean over its J joints of the squared Euclidean error (sum over x, y, z), and the batch loss is
the mean over examples.

Learning Loss. `fit(..., loss_prediction=LossPrediction(...))` trains a LossNet jointly with
the learner (see `jax_seqgcn.training.loss_prediction`); the state then also holds `loss_net`
and `loss_net_params`, and `inference.forward_pool` adds the predicted losses to its single
eval pass.
"""

import functools
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_seqgcn.training import augment
from jax_seqgcn.training import loss_prediction as loss_prediction_lib
from jax_seqgcn.training import parallel
from jax_seqgcn.training import precision
from jax_seqgcn.training.state import DEFAULTS
from jax_seqgcn.training.state import TRACE_COUNTS
from jax_seqgcn.training.state import LossPrediction
from jax_seqgcn.training.state import TrainState
from jax_seqgcn.training.state import _check_hashable
from jax_seqgcn.training.state import bind_platform
from jax_seqgcn.training.state import check_task
from jax_seqgcn.training.state import _init_with_info
from jax_seqgcn.training.state import _key_data
from jax_seqgcn.training.state import check_inputs
from jax_seqgcn.training.state import learning_rate_at_epoch
from jax_seqgcn.training.state import set_learning_rate

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


# fold_in constant of the learner's dropout masks within a step's augmentation key.
DROPOUT_STREAM = 0x64726F70


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
    # Mixed precision (see `jax_seqgcn.training.precision`): float32 master parameters cast for the
    # forward pass; the loss is computed in float32 (per_example_loss upcasts the outputs).
    variables = {"params": precision.cast_floating(params, dtype)}
    if state.batch_stats:
      variables["batch_stats"] = state.batch_stats
    # A learner with `dropout_rate` (MC dropout, for BALD) draws its masks from this stream;
    # the others ignore it, so their results do not change.
    (outputs, _, stage_features), mutated = model.apply(
        variables, x, train=True, mutable=["batch_stats"],
        rngs={"dropout": jax.random.fold_in(rng, DROPOUT_STREAM)})
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
    model: Flax learner; one whose `platform` is None gets the mesh's devices' platform
      (`models.bind_platform`).
    task: "classification" or "regression".
    preprocessing: `PreprocessSpec`, dataset name or None (see `augment.as_spec`).
    mesh: data mesh; None = all devices.
    compute_dtype: "float32" or "bfloat16" (see `jax_seqgcn.training.precision`).
  Returns:
    `step(state, images, targets, weights, key) -> (state, metrics)`: images [B, H, W, C]
    raw, targets [B] or [B, K], weights [B] float (1 real / 0 filler), all sharded
    `P('data')`; key a PRNG key (per-step rng `fold_in(key, state.step)`); state donated.
    metrics: dict of scalar sums 'loss_sum', 'count' (+ 'correct'). Plain learners only: a
    state holding a LossNet is trained by `fit(..., loss_prediction=...)`.
  """
  check_task(task)
  _check_hashable(model)
  mesh = parallel.make_mesh() if mesh is None else mesh
  return _step_fn(bind_platform(model, mesh), task, augment.as_spec(preprocessing), mesh,
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


def fit(key: jax.Array, model, images, targets, *, task: str = "classification",
        epochs: Optional[int] = None, batch_size: int = 128,
        learning_rate: Optional[float] = None, momentum: Optional[float] = None,
        weight_decay: Optional[float] = None, milestones: Optional[Sequence[int]] = None,
        gamma: Optional[float] = None, preprocessing=None, mesh=None,
        progress: Optional[Callable[[int, int, dict], None]] = None,
        loss_prediction: Optional[LossPrediction] = None,
        compute_dtype: str = "float32", initial_state=None, start_epoch: int = 0,
        on_epoch_end: Optional[Callable[[int, TrainState], None]] = None) -> TrainState:
  """Trains a fresh learner on a labelled set (see the module docstring for the semantics).

  Args:
    key: PRNG key (initialisation, shuffling, augmentation).
    model: Flax learner (hashable module). A learner whose `platform` is None is trained with
      the kernels of the mesh's devices' platform (`models.bind_platform`: CPU kernels on
      CPU, plain Flax/XLA on GPU/TPU); an explicit `platform` is kept.
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
      jitted epoch: no extra compile. See `jax_seqgcn.training.loss_prediction`.
    compute_dtype: "float32" (default) or "bfloat16": activations and convolutions in that
      dtype, parameters, optimiser state, BatchNorm statistics and the loss in float32 (see
      `jax_seqgcn.training.precision`).
    initial_state: continue a fit: the state after `start_epoch` epochs of a fit with the
      same arguments (a `TrainState`, or its leaves `jax.tree.leaves(state)` as host arrays,
      e.g. restored from a checkpoint); training goes on with epoch `start_epoch` and gives
      the uninterrupted fit's state bit for bit (shuffling and augmentation are functions of
      the key, the epoch and `state.step`). None: a fresh learner from epoch 0.
    start_epoch: the number of epochs `initial_state` has done (0 without it).
    on_epoch_end: optional `on_epoch_end(epoch, state)` called after each epoch (epoch
      counted from 1) and after `progress`, with the state before the next epoch donates its
      buffers (e.g. to save it; `experiment.loop` saves epoch checkpoints with it).
  Returns:
    The trained `TrainState` (replicated on the mesh); with `loss_prediction` it also holds
    the LossNet (`loss_net`, `loss_net_params`).
  Raises:
    ValueError: bad inputs or settings (e.g. a negative loss-prediction weight).
  """
  check_task(task)
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
  # The learner's kernels follow the mesh's devices (`models.conv`); bound before any trace,
  # so the cached jits below are keyed by the platform too.
  model = bind_platform(model, mesh)
  spec = augment.as_spec(preprocessing)
  images, targets = np.asarray(images), np.asarray(targets)
  check_inputs(images, targets, task, batch_size, mesh)
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
  start_epoch = int(start_epoch)
  if initial_state is not None:
    state = _continued_state(state, initial_state, mesh)
  elif start_epoch:
    raise ValueError(f"start_epoch={start_epoch} needs the initial_state after those epochs.")
  if not 0 <= start_epoch <= epochs:
    raise ValueError(f"start_epoch must be in [0, epochs={epochs}], got {start_epoch}.")
  for epoch in range(start_epoch, epochs):
    lr = learning_rate_at_epoch(epoch, learning_rate=learning_rate, milestones=milestones,
                                gamma=gamma)
    state, metrics = epoch_fn(state, device_images, device_targets, np.int32(num_real),
                              key_data, np.int32(epoch), np.float32(lr), settings)
    if progress is not None:
      progress(epoch + 1, epochs, {k: float(v) for k, v in parallel.to_host(metrics).items()})
    if on_epoch_end is not None:
      on_epoch_end(epoch + 1, state)
  return state


def _continued_state(fresh: TrainState, saved, mesh) -> TrainState:
  """`saved` (a `TrainState` or its leaves) on the structure of the `fresh` state, replicated;
  ValueError when its leaves do not match (another learner, optimiser or LossNet)."""
  leaves, treedef = jax.tree.flatten(fresh)
  saved = jax.tree.leaves(saved) if isinstance(saved, TrainState) else list(saved)
  if len(saved) != len(leaves):
    raise ValueError(f"initial_state has {len(saved)} arrays; this fit's state has "
                     f"{len(leaves)}.")
  for i, (mine, theirs) in enumerate(zip(leaves, saved)):
    dtype = np.dtype(getattr(theirs, "dtype", None) or np.asarray(theirs).dtype)
    if tuple(np.shape(theirs)) != mine.shape or dtype != mine.dtype:
      raise ValueError(f"initial_state array {i} is {dtype}{tuple(np.shape(theirs))}; this "
                       f"fit's is {mine.dtype}{mine.shape}.")
  saved = parallel.replicate(mesh, [np.asarray(parallel.to_host(x)) for x in saved])
  return jax.tree.unflatten(treedef, saved)
