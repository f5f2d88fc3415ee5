"""Learning Loss (Yoo & Kweon 2019) as an option of learner training: the ranking loss and
the joint objective that `training.fit(..., loss_prediction=LossPrediction(...))` optimises.

A `LossNet` (`jax_seqgcn.models.lossnet`) reads the learner's 4 stage outputs and predicts
each example's task loss. It is trained with the learner, on the same batches, by

    loss = mean task loss + weight * ranking_loss(predicted, true per-example losses)

where the ranking loss is the reference's `LossPredLoss` (`train_test.py`): in a batch of B
examples, example i is paired with example B-1-i for i < B/2 (the first half against the
reversed second half); the target sign of a pair is +1 if the first one's true loss is larger
and -1 otherwise (ties included), from true losses that are not differentiated; the pair's loss
is max(0, margin - sign * (predicted_i - predicted_j)); the result is the mean over the pairs.
From epoch `detach_epoch` on, the stage features reach the LossNet through `stop_gradient`:
the ranking term then trains the LossNet only and no longer shapes the learner.

Batches and fillers: a batch may end with zero-weight filler copies (see `training.fit`). Only
real examples are paired, as if the batch held only them (torch's smaller last batch): the
r real examples, in batch order, form pairs (k, r-1-k) for k < r // 2. An odd r leaves its
middle example unpaired (the reference asserts even batches instead), and r < 2 gives 0.

The state keeps the LossNet beside the learner: `TrainState.loss_net` (the module, static)
and `TrainState.loss_net_params`, with one optimiser state over `(params, loss_net_params)`.
The optimiser applies per parameter, so this equals the reference's two SGD optimisers with
the same lr, momentum, weight decay and milestones.
"""

import math
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_seqgcn.models.lossnet import LossNet

# The reference trains 200 epochs and detaches the stage features after epoch 120 (60%).
DEFAULT_DETACH_FRACTION = 0.6


class LossPrediction(NamedTuple):
  """Settings of the joint LossNet training (reference values as defaults).

  Attributes:
    weight: weight of the ranking loss in the total loss (reference `WEIGHT` = 1.0).
    margin: hinge margin of the ranking loss (reference `MARGIN` = 1.0).
    detach_epoch: first 0-based epoch whose stage features are detached for the LossNet;
      None = `detach_epoch_for(epochs)`, 60% of the epochs. The reference trains 200 epochs
      and detaches after epoch 120 (`EPOCHL`), i.e. 60% of the epochs: 120 here. (Its test
      is `epoch > 120` on 0-based epochs, which keeps one more epoch attached: pass 121 to
      copy that exactly.) A value >= epochs never detaches; 0 always does.
    hidden: width of the LossNet's per-stage Dense layers (reference 128).
  """
  weight: float = 1.0
  margin: float = 1.0
  detach_epoch: Optional[int] = None
  hidden: int = 128


def detach_epoch_for(epochs: int, fraction: float = DEFAULT_DETACH_FRACTION) -> int:
  """The detach epoch at `fraction` of `epochs`, rounded half up (200 -> 120, 15 -> 9)."""
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"the detach fraction must be in [0, 1], got {fraction}.")
  # The epsilon rounds exact halves up despite float error (0.58 * 25 = 14.499999...).
  return int(math.floor(fraction * int(epochs) + 0.5 + 1e-9))


def resolve(loss_prediction: LossPrediction, epochs: int) -> LossPrediction:
  """Checked settings with Python scalars and an int `detach_epoch`.

  Raises:
    ValueError: a negative or non-finite weight or margin, a negative detach epoch, a hidden
      width < 1, or not a `LossPrediction`.
  """
  if not isinstance(loss_prediction, LossPrediction):
    raise ValueError(f"loss_prediction must be a LossPrediction or None, got "
                     f"{type(loss_prediction).__name__}.")
  weight, margin = float(loss_prediction.weight), float(loss_prediction.margin)
  for name, value in (("weight", weight), ("margin", margin)):
    if not math.isfinite(value) or value < 0:
      raise ValueError(f"loss_prediction.{name} must be finite and >= 0, got {value}.")
  detach_epoch = loss_prediction.detach_epoch
  detach_epoch = detach_epoch_for(epochs) if detach_epoch is None else detach_epoch
  if int(detach_epoch) != detach_epoch or detach_epoch < 0:
    raise ValueError(f"loss_prediction.detach_epoch must be an int >= 0, got {detach_epoch}.")
  hidden = loss_prediction.hidden
  if int(hidden) != hidden or hidden < 1:
    raise ValueError(f"loss_prediction.hidden must be an int >= 1, got {hidden}.")
  return LossPrediction(weight, margin, int(detach_epoch), int(hidden))


class JointSettings(NamedTuple):
  """The values the jitted joint step reads, passed as arrays: changing them (or the epoch
  count) reuses the compiled epoch. The LossNet's width lives in the state's static module."""
  weight: Any
  margin: Any
  detach_epoch: Any


def joint_settings(loss_prediction: LossPrediction) -> JointSettings:
  """`JointSettings` of resolved settings, as NumPy scalars (float32, float32, int32)."""
  return JointSettings(np.float32(loss_prediction.weight), np.float32(loss_prediction.margin),
                       np.int32(loss_prediction.detach_epoch))


def make_loss_net(loss_prediction: Optional[LossPrediction]) -> Optional[LossNet]:
  """The LossNet module of some settings (None for None)."""
  if loss_prediction is None:
    return None
  return LossNet(hidden=int(loss_prediction.hidden))


def ranking_loss(predicted: jax.Array, losses: jax.Array, weights: Optional[jax.Array] = None,
                 *, margin: float = 1.0) -> jax.Array:
  """The reference's LossPredLoss over the real examples of a batch (see the module docstring).

  Args:
    predicted: [B] predicted losses.
    losses: [B] true per-example losses; not differentiated (stop_gradient).
    weights: optional [B]; examples with weight > 0 are real, the others fillers that are not
      paired. None = all real.
    margin: hinge margin.
  Returns:
    Scalar float32: mean over the r // 2 pairs of real examples (0 if r < 2).
  """
  predicted = predicted.astype(jnp.float32)
  losses = jax.lax.stop_gradient(losses.astype(jnp.float32))
  size = predicted.shape[0]
  real = jnp.ones((size,), bool) if weights is None else weights > 0
  # Real examples first, in batch order (a stable sort of the filler flags).
  order = jnp.argsort(jnp.logical_not(real).astype(jnp.int32), stable=True)
  num_real = jnp.sum(real.astype(jnp.int32))
  position = jnp.arange(size)
  first = order
  second = order[jnp.clip(num_real - 1 - position, 0, size - 1)]
  is_pair = position < num_real // 2
  sign = jnp.where(losses[first] - losses[second] > 0, 1.0, -1.0)
  hinge = jnp.maximum(0.0, margin - sign * (predicted[first] - predicted[second]))
  num_pairs = jnp.maximum(num_real // 2, 1).astype(jnp.float32)
  return jnp.sum(jnp.where(is_pair, hinge, 0.0)) / num_pairs


def detach_if(detached, stage_features: Sequence[jax.Array]) -> tuple:
  """`stop_gradient` of each feature map where `detached` (a traced bool) is True.

  The values are unchanged either way, so a traced flag switches the gradient path without a
  recompile: the epoch number decides inside the jitted epoch.
  """
  return tuple(jnp.where(detached, jax.lax.stop_gradient(f), f) for f in stage_features)


def ranking_term(loss_net: LossNet, loss_net_params, stage_features: Sequence[jax.Array],
                 losses: jax.Array, weights: Optional[jax.Array], *, margin: float,
                 detached) -> tuple:
  """The ranking part of the joint loss for one batch.

  Args:
    loss_net: the `LossNet` module.
    loss_net_params: its parameters.
    stage_features: the learner's 4 stage outputs for the batch ([B, ...] each).
    losses: [B] true per-example task losses (not differentiated).
    weights: [B] 1 (real) / 0 (filler), or None.
    margin: hinge margin.
    detached: bool (may be traced); True = the features are seen through stop_gradient.
  Returns:
    (ranking loss scalar, predicted losses [B]).
  """
  predicted = loss_net.apply({"params": loss_net_params}, detach_if(detached, stage_features))
  return ranking_loss(predicted, losses, weights, margin=margin), predicted


def apply_joint_gradients(state, grads, loss_net_grads, **changes):
  """One optimiser step over `(params, loss_net_params)` (a `TrainState` holding a LossNet).

  Args:
    state: the state; its `opt_state` was initialised on `(params, loss_net_params)`.
    grads, loss_net_grads: gradients of the learner and LossNet parameters.
    **changes: other fields to replace (e.g. `batch_stats`).
  Returns:
    The updated state, step + 1.
  """
  params = (state.params, state.loss_net_params)
  updates, opt_state = state.tx.update((grads, loss_net_grads), state.opt_state, params)
  new_params, new_loss_net_params = optax.apply_updates(params, updates)
  return state.replace(step=state.step + 1, params=new_params,
                       loss_net_params=new_loss_net_params, opt_state=opt_state, **changes)
