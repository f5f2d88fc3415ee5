"""One active-learning cycle as pure steps: train -> test -> pool -> select. No files, no config.

The experiment loop (`experiment.loop`) and `jax-seqgcn select` (`apps.own_data`) both run a
cycle with these functions, so a user can also drive one by hand:

    setup = cycle.make_setup(model=jax_seqgcn.get_learner("small_cnn", num_classes=10,
                                                          channels=1),
                             sampler="CoreSet", preprocessing="fashion_mnist",
                             fit_kwargs=dict(epochs=15, batch_size=64, learning_rate=0.05))
    result = cycle.run_cycle(setup, key, dataset, labelled, budget=100, subset=2000)
    labelled = result.next_labelled

Keys: `run_cycle` splits its key into (train, select) and `select` its key into (subset,
sampler), as the loop has always done, so one cycle key fixes the whole cycle.

Several processes: every process trains and runs the sampler (the learner is one SPMD program),
but the candidate draw and the picks are process 0's, broadcast to all
(`parallel.broadcast_from_main`): one labelled set for the whole run, even where hosts would
round differently.

Node order, as the reference: the unlabelled candidates first, then the labelled set. What is
computed for the sampler is what it declares it needs (`samplers.Sampler.needs`): one eval pass
gives the embeddings, class probabilities and predicted losses; VAAL gets the preprocessed
images; Random gets nothing and costs no pass. What a sampler needs from the learner's training
(Learning Loss's jointly trained LossNet) comes from the sampler itself
(`samplers.Sampler.training_kwargs`).
"""

import inspect
import time
from typing import Any, Callable, Dict, NamedTuple, Optional

import jax
import numpy as np

from jax_seqgcn import samplers
from jax_seqgcn import training
from jax_seqgcn.data.datasets import Dataset
from jax_seqgcn.selection.sharding import spans_devices
from jax_seqgcn.training import augment
from jax_seqgcn.training import parallel
from jax_seqgcn.training import precision
from jax_seqgcn.training import state as state_lib

# Pool fields computed by the learner's eval pass.
FORWARD_FIELDS = ("features", "probabilities", "predicted_losses")
# `training.fit`'s batch when `fit_kwargs` names none.
_FIT_BATCH_SIZE = inspect.signature(training.fit).parameters["batch_size"].default


class CycleSetup(NamedTuple):
  """What stays fixed from cycle to cycle (build it with `make_setup`).

  Attributes:
    model: the Flax learner (hashable module), trained afresh every cycle.
    task: "classification" or "regression".
    preprocessing: the `augment.PreprocessSpec` of the images.
    sampler: the registered `samplers.Sampler`.
    options: its resolved options (registry defaults overridden by the caller's).
    fit_kwargs: keyword arguments of `training.fit` (epochs, batch_size, learning rate, ...,
      compute_dtype and what the sampler adds, e.g. `loss_prediction`).
    eval_batch_size: fixed batch of the eval passes.
    mesh: the data mesh every pass runs on.
  """
  model: Any
  task: str
  preprocessing: augment.PreprocessSpec
  sampler: samplers.Sampler
  options: Dict[str, Any]
  fit_kwargs: Dict[str, Any]
  eval_batch_size: int
  mesh: Any

  @property
  def compute_dtype(self) -> str:
    return self.fit_kwargs.get("compute_dtype", "float32")


def make_setup(*, model, sampler, task: str = "classification", preprocessing=None,
               options: Optional[Dict[str, Any]] = None,
               fit_kwargs: Optional[Dict[str, Any]] = None, eval_batch_size: int = 256,
               mesh=None) -> CycleSetup:
  """Checks and bundles a cycle's fixed parts.

  Args:
    model: Flax learner (`models.get_learner(...)`).
    sampler: a registry name or a `samplers.Sampler`.
    task: "classification" or "regression".
    preprocessing: `augment.PreprocessSpec`, a dataset name, or None (scaling only).
    options: sampler options over the registry defaults.
    fit_kwargs: `training.fit` keyword arguments (not key, model, images, targets,
      preprocessing, mesh, progress); the sampler's own training needs are added.
    eval_batch_size: batch of the eval passes (a multiple of the device count).
    mesh: data mesh; None = `parallel.make_mesh()` (all devices).
  Returns:
    A `CycleSetup`.
  Raises:
    ValueError: an unknown task or sampler, or a bad sampler option.
  """
  state_lib.check_task(task)
  sampler = sampler if isinstance(sampler, samplers.Sampler) else samplers.get_sampler(sampler)
  resolved = sampler.resolve_options(dict(options or {}))
  fit_kwargs = dict(fit_kwargs or {})
  precision.check_compute_dtype(fit_kwargs.get("compute_dtype", "float32"))
  epochs = fit_kwargs.get("epochs", state_lib.DEFAULTS[task]["epochs"])
  fit_kwargs.update(sampler.training_kwargs(resolved, epochs))
  return CycleSetup(model, task, augment.as_spec(preprocessing), sampler, resolved,
                    fit_kwargs, int(eval_batch_size),
                    parallel.make_mesh() if mesh is None else mesh)


def train_batch_size(setup: CycleSetup, num_labelled: int) -> int:
  """The batch `train_learner` uses for `num_labelled` examples: `fit_kwargs["batch_size"]`,
  at most the labelled count rounded up to the mesh's device count.

  A larger batch would only add zero-weight duplicates (`training.fit` fills the last batch),
  which cost memory (an out-of-memory error for a huge batch) and change BatchNorm's batch
  statistics; capped, any batch >= the labelled set trains the same, one batch of all of it,
  as the reference's torch DataLoader does.
  """
  batch = int(setup.fit_kwargs.get("batch_size", _FIT_BATCH_SIZE))
  shards = parallel.num_data_shards(setup.mesh)
  return min(batch, max(1, -(-int(num_labelled) // shards)) * shards)


def train_learner(setup: CycleSetup, key: jax.Array, images, targets, *,
                  progress: Optional[Callable[[int, int, dict], None]] = None,
                  **resume_kwargs):
  """A fresh learner trained on [L, H, W, C] `images` and their targets (`training.fit`), with
  batches of `train_batch_size(setup, L)`.

  `resume_kwargs`: `training.fit`'s `initial_state`, `start_epoch` (continue a saved fit) and
  `on_epoch_end` (e.g. save one), passed through.
  """
  fit_kwargs = dict(setup.fit_kwargs, batch_size=train_batch_size(setup, len(images)))
  return training.fit(key, setup.model, images, targets, task=setup.task,
             preprocessing=setup.preprocessing, mesh=setup.mesh, progress=progress,
             **resume_kwargs, **fit_kwargs)


def test_learner(setup: CycleSetup, state, images, targets) -> float:
  """The test metric (accuracy in [0, 1], or mean joint error) of a trained learner."""
  return training.evaluate(state, setup.model, images, targets, task=setup.task,
                           batch_size=setup.eval_batch_size, preprocessing=setup.preprocessing,
                           mesh=setup.mesh, compute_dtype=setup.compute_dtype)


def forward(setup: CycleSetup, state, images, nodes) -> Dict[str, np.ndarray]:
  """`training.forward_pool` of `images[nodes]` ([M] ints): embedding, probabilities, ..."""
  return training.forward_pool(state, setup.model, images, nodes, task=setup.task,
                               batch_size=setup.eval_batch_size,
                               preprocessing=setup.preprocessing, mesh=setup.mesh,
                               compute_dtype=setup.compute_dtype)


def embed_pool(setup: CycleSetup, state, images, nodes, labelled_mask,
               key: Optional[jax.Array] = None) -> samplers.Pool:
  """The `samplers.Pool` of `images[nodes]` with just the fields the sampler needs.

  Args:
    setup: the cycle's setup.
    state: the trained learner.
    images: [N, H, W, C] the whole training split (raw).
    nodes: [M] ints into `images`.
    labelled_mask: [M] bool, True for the labelled nodes.
    key: PRNG key of the MC-dropout passes; needed only for `mc_probabilities` (BALD), which
      are `training.mc_dropout_probabilities` of the pass's embeddings with the learner's
      `dropout_rate` and T = the sampler's `bald_samples` option.
  Raises:
    ValueError: the sampler needs MC-dropout predictions and the learner has no dropout.
  """
  fields = {}
  needs = setup.sampler.needs
  if needs & (set(FORWARD_FIELDS) | {"mc_probabilities"}):
    out = forward(setup, state, images, nodes)
    out["features"] = out.pop("embedding")
    fields.update({k: out[k] for k in FORWARD_FIELDS if k in needs})
    if "mc_probabilities" in needs:
      fields["mc_probabilities"] = mc_probabilities(setup, state, out["features"], key)
  if "images" in needs:
    fields["images"] = augment.preprocess_all(images, nodes, setup.preprocessing)
  return samplers.Pool(labelled_mask, **fields)


def mc_dropout_rate(setup: CycleSetup, key: Optional[jax.Array]) -> float:
  """The learner's dropout rate, for a sampler that needs MC-dropout predictions.

  Raises:
    ValueError: the learner has no dropout, or there is no key for the passes.
  """
  rate = getattr(setup.model, "dropout_rate", 0.0)
  if not rate or key is None:
    raise ValueError(f"sampler {setup.sampler.name} needs MC-dropout predictions: a "
                     "classification learner built with dropout_rate > 0 "
                     "(config.learner.mc_dropout) and a key")
  return rate


def mc_probabilities(setup: CycleSetup, state, features, key) -> np.ndarray:
  """[T, N, C] `training.mc_dropout_probabilities` of the pool's [N, D] embeddings, T = the
  sampler's `bald_samples` option; ValueError as `mc_dropout_rate`."""
  return np.asarray(training.mc_dropout_probabilities(
      key, state.params["head"], features, mc_dropout_rate(setup, key),
      setup.options.get("bald_samples", samplers.bald.DEFAULT_SAMPLES)))


def candidates(key: jax.Array, labelled, pool_size: int,
               subset: Optional[int] = None) -> np.ndarray:
  """The unlabelled nodes offered to the sampler: all of them, or a random `subset` of them.

  Args:
    key: PRNG key of the draw (unused when every unlabelled node is a candidate).
    labelled: [L] ints in [0, pool_size).
    pool_size: N, the size of the training split.
    subset: None for the whole pool, else the number of candidates drawn without replacement.
  Returns:
    [U] int64 candidate indices (ascending when not subsampled, else in draw order).
  """
  unlabelled = np.setdiff1d(np.arange(pool_size), labelled)
  if subset is not None and subset < len(unlabelled):
    unlabelled = np.asarray(jax.random.choice(key, unlabelled, (subset,), replace=False))
  return unlabelled


class Selection(NamedTuple):
  """What one selection did.

  Attributes:
    next_labelled: [L + budget] the labelled set followed by the picks (dataset indices).
    nodes: [M] the pool's dataset indices (candidates first, then the labelled set).
    pool: the `samplers.Pool` the sampler saw.
    picks: [budget] positions into `nodes`, in the sampler's order.
    embed_s: seconds spent building the pool (the eval pass).
    sample_s: seconds spent in the sampler.
  """
  next_labelled: np.ndarray
  nodes: np.ndarray
  pool: samplers.Pool
  picks: np.ndarray
  embed_s: float
  sample_s: float


def select(setup: CycleSetup, key: jax.Array, state, images, labelled, *, budget: int,
           subset: Optional[int] = None) -> Selection:
  """Draws the candidates, builds their pool with the labelled set, and runs the sampler.

  Args:
    setup: the cycle's setup.
    key: split into (candidate draw, sampler) keys.
    state: the trained learner.
    images: [N, H, W, C] the whole training split.
    labelled: [L] dataset indices of the labelled set.
    budget: number of picks.
    subset: see `candidates`.
  """
  subset_key, sampler_key = jax.random.split(key)
  # Process 0's draw and picks are the run's (see `parallel.broadcast_from_main`).
  unlabelled = parallel.broadcast_from_main(
      candidates(subset_key, labelled, len(images), subset))
  start = time.perf_counter()
  nodes = np.concatenate([unlabelled, labelled])
  # The MC-dropout passes (BALD) draw from their own stream of the sampler's key.
  pool = embed_pool(setup, state, images, nodes, np.arange(len(nodes)) >= len(unlabelled),
                    key=jax.random.fold_in(sampler_key, 1))
  embed_s = time.perf_counter() - start
  start = time.perf_counter()
  # Over several devices or processes, the samplers that can split the nodes do (one SPMD
  # program; `samplers.on_mesh`); process 0's picks stay the run's either way.
  with samplers.on_mesh(setup.mesh if spans_devices(setup.mesh) else None):
    picks = np.asarray(setup.sampler(sampler_key, pool, budget, **setup.options), np.int32)
  picks = parallel.broadcast_from_main(picks)
  sample_s = time.perf_counter() - start
  return Selection(np.concatenate([labelled, unlabelled[picks]]), nodes, pool, picks,
                   embed_s, sample_s)


class CycleResult(NamedTuple):
  """One cycle: the trained learner, its test metric, and the selection (None if none)."""
  state: Any
  metric: float
  train_s: float
  selection: Optional[Selection]

  @property
  def next_labelled(self) -> Optional[np.ndarray]:
    return None if self.selection is None else self.selection.next_labelled


def run_cycle(setup: CycleSetup, key: jax.Array, dataset: Dataset, labelled, *,
              budget: Optional[int], subset: Optional[int] = None,
              progress: Optional[Callable[[int, int, dict], None]] = None,
              **resume_kwargs) -> CycleResult:
  """Trains on `labelled`, tests, and (unless `budget` is None) selects `budget` more.

  Args:
    setup: the cycle's setup.
    key: the cycle's key, split into (train, select).
    dataset: train split (the pool) and test split.
    labelled: [L] ints into the train split.
    budget: picks to make; None for a last cycle, which selects nothing.
    subset: see `candidates`.
    progress: `training.fit`'s per-epoch callback.
    **resume_kwargs: `training.fit`'s `initial_state`, `start_epoch` and `on_epoch_end` (see
      `train_learner`): the loop continues a cycle from an epoch checkpoint with them.
  Returns:
    A `CycleResult`; `train_s` counts training (a resumed cycle's: from its restart) and
    testing.
  """
  train_key, select_key = jax.random.split(key)
  labelled = np.asarray(labelled)
  start = time.perf_counter()
  state = train_learner(setup, train_key, dataset.train_images[labelled],
                        dataset.train_targets[labelled], progress=progress, **resume_kwargs)
  metric = test_learner(setup, state, dataset.test_images, dataset.test_targets)
  train_s = time.perf_counter() - start
  selection = None
  if budget is not None:
    selection = select(setup, select_key, state, dataset.train_images, labelled,
                       budget=budget, subset=subset)
  return CycleResult(state, metric, train_s, selection)
