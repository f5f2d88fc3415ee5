"""Learner train state: the optimisers, the schedule and a fresh replicated `TrainState`.

Models follow the learner interface of `jax_seqgcn.models`:
`model.apply(variables, x, train=bool, mutable=[...])` with `x` [B, H, W, C] float32 and
output `(outputs, embedding, stage_features)`: logits [B, classes] (or regression [B, J*3]),
embedding [B, D], and a tuple of 4 stage arrays. BatchNorm statistics live in the
'batch_stats' collection (absent for nets without BatchNorm).

Optimisers (protocol §2 of docs/protocol.md):
  * classification: SGD, momentum 0.9, coupled weight decay 5e-4 (torch `SGD(weight_decay=)`:
    the decay is added to the gradient before the momentum buffer), lr 0.1 multiplied by
    `gamma` = 0.1 at each milestone epoch (default 160 of 200), softmax cross-entropy;
  * regression: Adam lr 1e-3 (coupled weight decay, default 0), loss Eq. 2 (`fit.per_example_loss`).

The learning rate is a hyperparameter inside the optimiser state (`optax.inject_hyperparams`)
set at the start of every epoch, so the schedule steps per epoch whatever the number of
steps per epoch (equivalently: boundaries at `milestone * steps_per_epoch` steps).
"""

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from jax_seqgcn import models
from jax_seqgcn.training import loss_prediction as loss_prediction_lib
from jax_seqgcn.training import parallel

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


def check_task(task: str) -> None:
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
  check_task(task)

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


def mesh_platform(mesh) -> str:
  """The platform ("cpu", "gpu", "tpu", ...) of the devices of `mesh`."""
  return mesh.devices.flat[0].platform


def bind_platform(model, mesh):
  """`model` with its kernels bound to the platform of `mesh`'s devices, before any trace.

  See `jax_seqgcn.models.bind_platform`: a learner whose `platform` is None gets the mesh's
  (the clone, not the global backend, is what the cached jits see); others are returned as
  they are.
  """
  return models.bind_platform(model, mesh_platform(mesh))


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


# XLA options for compiling the initialisation on CPU: the LLVM backend at optimisation level 0.
# The program runs once, and its random initialisers (threefry, unrolled per parameter) are
# what XLA:CPU's default level compiles slowest: the tests' four-stage ResNet's init compiled in
# 12 s, 2 s at level 0 (the model's apply: 0.5 s). Same values, bit for bit
# (tests/test_train.py compares with `model.init` under a plain `jax.jit`).
CPU_INIT_OPTIONS = {"xla_backend_optimization_level": 0}


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

  jitted = jax.jit(init, out_shardings=parallel.replicated(mesh))
  if mesh.devices.flat[0].platform != "cpu":
    return jitted, info
  compiled = {}

  def run(key_data):
    shape = np.shape(key_data)
    if shape not in compiled:  # one compile per key shape (key implementation)
      compiled[shape] = jitted.lower(key_data).compile(compiler_options=CPU_INIT_OPTIONS)
    return compiled[shape](key_data)

  return run, info


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
  check_task(task)
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


def check_inputs(images, targets, task, batch_size, mesh, *, need_targets=True):
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
