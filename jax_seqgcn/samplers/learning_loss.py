"""Learning Loss (Yoo & Kweon 2019): pick the unlabelled nodes with the largest predicted loss.

The predicted losses come from a LossNet trained jointly with the learner: the sampler's
`training_kwargs(options, epochs)` is `{"loss_prediction": loss_prediction_from_options(options,
epochs)}`, which `experiment.cycle` passes to `training.fit`; then
`training.forward_pool(...)["predicted_losses"]` gives `Pool.predicted_losses` from the same
eval pass as the embeddings. The reference (`selection_methods.py`, branch 'lloss') sorts the
subset by predicted loss and labels the last `budget` of that order, i.e. the largest.

Options (one flat namespace shared by all samplers, hence the prefix); they shape the
learner's training, not the pick:

* `lossnet_weight`: weight of the ranking loss in the learner's loss (reference 1.0);
* `lossnet_margin`: hinge margin of the ranking loss (reference 1.0);
* `lossnet_detach_fraction`: fraction of the epochs after which the stage features are
  detached for the LossNet (reference: epoch 120 of 200 = 0.6).

Inside `samplers.on_mesh(mesh)` over several devices (or processes), the predicted losses are
split over the mesh axis 'data' and ranked with a global top-k (`selection.sharding.
global_top_k`): the same picks, ties included.
"""

import math
import numbers
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jax_seqgcn.training import loss_prediction
from jax_seqgcn.samplers import base
from jax_seqgcn.selection import sharding

OPTIONS = {
    "lossnet_weight": 1.0,
    "lossnet_margin": 1.0,
    "lossnet_detach_fraction": loss_prediction.DEFAULT_DETACH_FRACTION,
}


def _number(options: Mapping[str, Any], name: str) -> float:
  value = options[name]
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
    raise ValueError(f"{name} must be a finite number, got {value!r}")
  return float(value)


def check_options(options: Mapping[str, Any]) -> None:
  """Raises ValueError unless weight, margin >= 0 and the detach fraction is in [0, 1]."""
  for name in ("lossnet_weight", "lossnet_margin"):
    if _number(options, name) < 0:
      raise ValueError(f"{name} must be >= 0, got {options[name]!r}")
  fraction = _number(options, "lossnet_detach_fraction")
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"lossnet_detach_fraction must be in [0, 1], got {fraction!r}")


def loss_prediction_from_options(options: Mapping[str, Any],
                                 epochs: int) -> loss_prediction.LossPrediction:
  """The `LossPrediction` for `training.fit` from sampler options and the epoch count.

  Args:
    options: a mapping holding any of the `lossnet_*` options (others are ignored, so the
      whole flat sampler section of a config works); missing ones take their defaults.
    epochs: the learner's number of epochs; the detach epoch is
      `loss_prediction.detach_epoch_for(epochs, lossnet_detach_fraction)` (15 -> 9, 200 -> 120).
  Returns:
    `LossPrediction(weight, margin, detach_epoch)` with the LossNet's default width (128).
  Raises:
    ValueError: a bad option value or a negative epoch count.
  """
  resolved = {name: options.get(name, default) for name, default in OPTIONS.items()}
  check_options(resolved)
  if int(epochs) != epochs or epochs < 0:
    raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
  return loss_prediction.LossPrediction(
      weight=float(resolved["lossnet_weight"]), margin=float(resolved["lossnet_margin"]),
      detach_epoch=loss_prediction.detach_epoch_for(
          int(epochs), float(resolved["lossnet_detach_fraction"])))


def learning_loss(key: jax.Array, predicted_losses: jax.Array, labelled_mask: jax.Array,
                  budget: int, **unused_options) -> jax.Array:
  """The `budget` unlabelled nodes with the largest predicted losses.

  Args:
    key: PRNG key (unused: the pick is deterministic; ties go to the lowest index).
    predicted_losses: [N] float, e.g. `training.forward_pool(...)["predicted_losses"]`.
    labelled_mask: [N] bool.
    budget: number of picks.
  Returns:
    [budget] int32 distinct unlabelled node indices, largest predicted loss first.
  """
  pool = base.validate_pool(base.Pool(labelled_mask, predicted_losses=predicted_losses),
                            budget, ("predicted_losses",), name="LearningLoss")
  return _learning_loss(key, pool, budget)


def _training(options: Mapping[str, Any], epochs: int) -> dict:
  return {"loss_prediction": loss_prediction_from_options(options, epochs)}


@base.register("LearningLoss", needs=("predicted_losses",), options=OPTIONS,
               check=check_options, training=_training,
               description="largest loss predicted by a LossNet trained with the learner "
                           "(Yoo & Kweon 2019)")
def _learning_loss(key, pool: base.Pool, budget: int, **unused_options) -> jax.Array:
  del key
  mesh = base.current_mesh()
  if sharding.spans_devices(mesh):  # inside `base.on_mesh`: the nodes split over the devices
    return jnp.asarray(sharding.map_rows(
        sharding.top_available, mesh,
        (pool.predicted_losses, ~np.asarray(pool.labelled_mask, bool)), budget=int(budget)))
  return base.top_unlabelled(jnp.asarray(pool.predicted_losses),
                             jnp.asarray(pool.labelled_mask), budget)
