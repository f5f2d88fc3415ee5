"""The active learning experiment (protocol §1): trials x cycles, checkpointed after every cycle.

Each cycle: a fresh learner is trained on the labelled set and tested; then (except in the last
cycle) a random `subset` of the unlabelled pool (or the whole pool) and the labelled set are
embedded by the learner, the sampler picks `budget` subset points, and they join the labelled set.

Keys: one `config.seed`; trial t uses `fold_in(key(seed), t)`, its cycle c `fold_in(trial, c + 1)`
(split into training, subset and sampler keys), so any cycle can be recomputed from the labelled
set alone and a resumed run equals an uninterrupted one.

What is computed for the sampler is what it declares it needs (`samplers.Sampler.needs`): one
eval pass gives the embeddings and class probabilities (and predicted losses when the learner was
trained with a loss-prediction module, which the LearningLoss sampler asks for); VAAL gets the
preprocessed images; Random gets nothing and costs no pass.

Workdir (see `jax_seqgcn.workdir`): locked for the run; `config.json` (the resolved config, also
stored in every checkpoint), `results.jsonl` (one line per trial x cycle),
`labelled/trial{t}_cycle{c}.npy` (indices trained on), `summary.md`, `curve.png`, and
`checkpoints/` (orbax; the source of truth the other files are rewritten from on resume). With
`config.al.save_embeddings`, also `embeddings/trial{t}_cycle{c}.npz` for every selection: the
learner embeddings (float16) of the subset and labelled set, the labelled mask and the picks
(`jax_seqgcn.embeddings` documents the arrays); a sampler that needs no embedding then costs one
extra eval pass, which is not counted in `embed_s`.

Every config field is checked before the data is loaded, and the data-dependent ones (pool size,
targets, image size) right after, before the workdir is written to.
"""

import contextlib
import json
import math
import pathlib
import time
from typing import List, Optional

import jax
import ml_collections
import numpy as np

from jax_seqgcn import augment
from jax_seqgcn import checks
from jax_seqgcn import data as data_lib
from jax_seqgcn import embeddings as embeddings_lib
from jax_seqgcn import models
from jax_seqgcn import parallel
from jax_seqgcn import precision
from jax_seqgcn import results as results_lib
from jax_seqgcn import samplers
from jax_seqgcn import train
from jax_seqgcn import workdir as workdir_lib

CONFIG_FILE = workdir_lib.CONFIG_FILE
# config.sampler keys that are not sampler options.
_SAMPLER_META = ("name",)
# Pool fields computed by the learner's eval pass.
_FORWARD_FIELDS = ("features", "probabilities", "predicted_losses")


class ConfigError(ValueError):
  """A configuration that cannot run; raised before any training."""


class RunError(RuntimeError):
  """A run that cannot go on (diverged training, unreadable data); earlier cycles are kept."""


def _config_dict(config) -> dict:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def validate_config(config: ml_collections.ConfigDict, pool_size: Optional[int] = None, *,
                    in_memory: bool = False) -> None:
  """Raises `ConfigError` (one message listing every problem) for a config that cannot run.

  Checks every section (data, learner, train, al, sampler and the chosen sampler's options)
  without loading anything, so a bad field costs no training.

  Args:
    config: experiment config (see configs/default.py).
    pool_size: size of the training split, to check that the cycles fit in the pool.
    in_memory: the caller builds the `Dataset` itself (`jax-seqgcn select --images`), so
      `data.name` need only name a preprocessing (`augment.PREPROCESSING`), not a loader.
  """
  problems = []
  sampler = samplers.SAMPLERS.get(config.sampler.name)
  if sampler is None:
    problems.append(f"unknown sampler {config.sampler.name!r}; valid: "
                    f"{', '.join(samplers.SAMPLERS)}")
  datasets = tuple(augment.PREPROCESSING) if in_memory else data_lib.DATASETS
  if config.data.name not in datasets:
    problems.append(f"unknown dataset {config.data.name!r}; valid: {', '.join(datasets)}")
  if config.learner.name not in models.LEARNERS:
    problems.append(f"unknown learner {config.learner.name!r}; valid: "
                    f"{', '.join(models.LEARNERS)}")
  if config.learner.task not in train.TASKS:
    problems.append(f"unknown learner.task {config.learner.task!r}; valid: "
                    f"{', '.join(train.TASKS)}")
  elif (sampler is not None and config.learner.task != "classification"
        and "probabilities" in sampler.needs):
    problems.append(f"sampler {sampler.name} needs class probabilities, which a "
                    f"{config.learner.task} learner does not give")
  al = config.al
  for name in ("trials", "cycles", "initial", "budget", "subset"):
    if not checks.is_int(al[name]) or al[name] <= 0:
      problems.append(f"al.{name} must be a positive int, got {al[name]!r}")
  for name in ("epochs", "batch_size", "eval_batch_size"):
    if not checks.is_int(config.train[name]) or config.train[name] <= 0:
      problems.append(f"train.{name} must be a positive int, got {config.train[name]!r}")
  if not isinstance(_save_embeddings(config), bool):
    problems.append(f"al.save_embeddings must be True or False, got {al.save_embeddings!r}")
  problems += _train_problems(config.train)
  try:
    precision.check_compute_dtype(_compute_dtype(config))
  except ValueError as err:
    problems.append(f"train.{err}")
  if sampler is not None:
    try:
      sampler.resolve_options(sampler_options(config))
    except ValueError as err:
      problems.append(f"sampler {sampler.name}: {err}")
  if not problems and not al.whole_pool and not al.upper_bound and al.cycles > 1:
    if al.subset < al.budget:
      problems.append(f"al.subset ({al.subset}) is smaller than al.budget ({al.budget})")
  if not problems and pool_size is not None and not al.upper_bound:
    needed = al.initial + (al.cycles - 1) * al.budget
    if needed > pool_size:
      problems.append(f"al.initial + (al.cycles - 1) * al.budget = {needed} is larger than the "
                      f"pool of {pool_size} training examples")
  if problems:
    raise ConfigError("bad config:\n  - " + "\n  - ".join(problems))


def _train_problems(t) -> List[str]:
  problems = []
  if not checks.is_finite_real(t.learning_rate) or t.learning_rate <= 0:
    problems.append(f"train.learning_rate must be a finite number > 0, got {t.learning_rate!r}")
  for name in ("momentum", "weight_decay", "gamma"):
    if not checks.is_finite_real(t[name]) or t[name] < 0:
      problems.append(f"train.{name} must be a finite number >= 0, got {t[name]!r}")
  milestones = t.milestones if isinstance(t.milestones, (tuple, list)) else [t.milestones]
  if not all(checks.is_int(m) and m >= 0 for m in milestones):
    problems.append(f"train.milestones must be epochs (ints >= 0), got {t.milestones!r}")
  return problems


def _check_data(config, dataset) -> None:
  """Data-dependent checks: pool size, targets matching the task, image size for the learner."""
  validate_config(config, pool_size=len(dataset.train_images))
  targets = np.asarray(dataset.train_targets)
  task = config.learner.task
  if task == "classification" and not (targets.ndim == 1
                                       and np.issubdtype(targets.dtype, np.integer)):
    raise ConfigError(f"learner.task is classification but {config.data.name}'s targets are "
                      f"{targets.dtype} of shape {targets.shape} (need [N] int class labels)")
  if task == "regression" and (targets.ndim != 2 or targets.shape[1] % 3):
    raise ConfigError(f"learner.task is regression but {config.data.name}'s targets have shape "
                      f"{targets.shape} (need [N, J*3] joint coordinates)")
  try:
    models.check_input_shape(config.learner.name, dataset.train_images.shape[1:])
  except ValueError as err:
    raise ConfigError(str(err)) from err


def sampler_options(config) -> dict:
  """The `config.sampler` entries the chosen sampler takes (the others belong to other samplers)."""
  sampler = samplers.get_sampler(config.sampler.name)
  return {k: v for k, v in config.sampler.items()
          if k not in _SAMPLER_META and k in sampler.options}


def _fit_kwargs(config) -> dict:
  t = config.train
  milestones = t.milestones if isinstance(t.milestones, (tuple, list)) else (t.milestones,)
  return dict(task=config.learner.task, epochs=t.epochs, batch_size=t.batch_size,
              learning_rate=t.learning_rate, momentum=t.momentum,
              weight_decay=t.weight_decay, milestones=tuple(milestones), gamma=t.gamma,
              compute_dtype=_compute_dtype(config))


def _added_field(config, dotted: str):
  # A config written before the field existed (e.g. a resumed workdir's) means the value
  # older runs had, which `workdir.ADDED_FIELDS` holds.
  section, name = dotted.split(".")
  return config[section].get(name, workdir_lib.ADDED_FIELDS[dotted])


def _compute_dtype(config) -> str:
  return _added_field(config, "train.compute_dtype")


def _save_embeddings(config):
  return _added_field(config, "al.save_embeddings")


def _comparable(config) -> dict:
  return json.loads(config.to_json_best_effort(sort_keys=True))


class _Run:
  """State of one experiment: data, learner, sampler, checkpoints, records so far."""

  def __init__(self, config, workdir: pathlib.Path, dataset: data_lib.Dataset):
    self.config, self.workdir, self.dataset = config, workdir, dataset
    if config.data.max_test:
      self.dataset = self.dataset._replace(
          test_images=self.dataset.test_images[:config.data.max_test],
          test_targets=self.dataset.test_targets[:config.data.max_test])
    self.task = config.learner.task
    num_outputs = (self.dataset.num_classes if self.task == "classification"
                   else self.dataset.train_targets.shape[1])
    self.model = models.get_learner(config.learner.name, num_classes=num_outputs,
                                    channels=self.dataset.train_images.shape[-1])
    self.preprocessing = augment.preprocessing_for(config.data.name)
    self.sampler = samplers.get_sampler(config.sampler.name)
    self.options = self.sampler.resolve_options(sampler_options(config))
    self.loss_prediction = None
    if "predicted_losses" in self.sampler.needs:
      self.loss_prediction = samplers.learning_loss.loss_prediction_from_options(
          self.options, config.train.epochs)
    self.mesh = parallel.make_mesh()
    self.store = workdir_lib.CheckpointStore(workdir / "checkpoints")
    self.resolved = _comparable(config)
    self.records: List[results_lib.Record] = []

  def cycle_key(self, trial: int, cycle: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.config.seed), trial),
                              cycle + 1)

  def initial_labelled(self, trial: int) -> np.ndarray:
    pool = len(self.dataset.train_images)
    if self.config.al.upper_bound:
      return np.arange(pool)
    perm = jax.random.permutation(jax.random.fold_in(self.cycle_key(trial, -1), 0), pool)
    # int64 like a restored checkpoint's, so resumed and uninterrupted runs save identical files.
    return np.asarray(perm[:self.config.al.initial], np.int64)

  def train_and_test(self, key, labelled, prefix):
    state = self.train(key, labelled, prefix)
    return state, self.test(state)

  def train(self, key, labelled, prefix, *, stream=None):
    """A fresh learner trained on the pool images `labelled` ([L] indices).

    Progress lines go to `stream` (None: stderr); a non-finite epoch loss raises `RunError`.
    """
    every = max(1, self.config.train.epochs // 5)
    shown = (train.text_progress(every=every, prefix=prefix, stream=stream)
             if parallel.is_main_process() else None)

    def progress(epoch, epochs, metrics):
      # Stop at the first non-finite epoch loss rather than record a diverged learner.
      if not math.isfinite(metrics["loss"]):
        raise RunError(f"{prefix.strip()}: the learner's training loss is {metrics['loss']} at "
                       f"epoch {epoch}; it diverged (train.learning_rate "
                       f"{self.config.train.learning_rate}). Earlier cycles are saved.")
      if shown is not None:
        shown(epoch, epochs, metrics)

    extra = {} if self.loss_prediction is None else {"loss_prediction": self.loss_prediction}
    return train.fit(key, self.model, self.dataset.train_images[labelled],
                     self.dataset.train_targets[labelled], preprocessing=self.preprocessing,
                     mesh=self.mesh, progress=progress, **_fit_kwargs(self.config), **extra)

  def test(self, state) -> float:
    """The test metric of a trained learner on the dataset's test split."""
    return train.evaluate(state, self.model, self.dataset.test_images,
                          self.dataset.test_targets, task=self.task,
                          batch_size=self.config.train.eval_batch_size,
                          preprocessing=self.preprocessing, mesh=self.mesh,
                          compute_dtype=_compute_dtype(self.config))

  def forward(self, state, nodes: np.ndarray) -> dict:
    """`train.forward_pool` of the training images `nodes` [M] (every process takes part)."""
    return train.forward_pool(state, self.model, self.dataset.train_images, nodes,
                              task=self.task, batch_size=self.config.train.eval_batch_size,
                              preprocessing=self.preprocessing, mesh=self.mesh,
                              compute_dtype=_compute_dtype(self.config))

  def pool(self, state, nodes: np.ndarray, labelled_mask: np.ndarray) -> samplers.Pool:
    """The `Pool` of `nodes` with just the fields the sampler needs."""
    fields = {}
    if self.sampler.needs & set(_FORWARD_FIELDS):
      out = self.forward(state, nodes)
      out["features"] = out.pop("embedding")
      fields.update({k: out[k] for k in _FORWARD_FIELDS if k in self.sampler.needs})
    if "images" in self.sampler.needs:
      fields["images"] = augment.preprocess_all(self.dataset.train_images, nodes,
                                                self.preprocessing)
    return samplers.Pool(labelled_mask, **fields)

  def select(self, key, state, labelled, save_to: Optional[pathlib.Path] = None):
    """Returns (new labelled set, seconds embedding, seconds sampling).

    With `save_to`, also writes what the sampler saw there (`embeddings.save`; main process).
    """
    al = self.config.al
    subset_key, sampler_key = jax.random.split(key)
    unlabelled = np.setdiff1d(np.arange(len(self.dataset.train_images)), labelled)
    if not al.whole_pool and al.subset < len(unlabelled):
      unlabelled = np.asarray(jax.random.choice(subset_key, unlabelled, (al.subset,),
                                                replace=False))
    start = time.perf_counter()
    # Node order as the reference: the unlabelled subset first, then the labelled set.
    nodes = np.concatenate([unlabelled, labelled])
    pool = self.pool(state, nodes, np.arange(len(nodes)) >= len(unlabelled))
    embed_s = time.perf_counter() - start
    start = time.perf_counter()
    picks = np.asarray(self.sampler(sampler_key, pool, al.budget, **self.options))
    sample_s = time.perf_counter() - start
    if save_to is not None:
      features = pool.features
      if features is None:  # the sampler needed none: one extra pass, not counted in embed_s
        features = self.forward(state, nodes)["embedding"]
      if parallel.is_main_process():
        embeddings_lib.save(save_to, nodes, features, pool.labelled_mask, picks)
    return np.concatenate([labelled, unlabelled[picks]]), embed_s, sample_s

  # Checkpoints: global step = trial * cycles + cycle, saved once that cycle is complete.
  def save(self, step: int, next_labelled: np.ndarray) -> None:
    tree = {"labelled": np.asarray(next_labelled, np.int64),
            "results": results_lib.records_to_array(self.records),
            "seed": np.int64(self.config.seed),
            "config": workdir_lib.encode_config(self.resolved)}
    self.store.save(step, tree)
    self.write_outputs()

  def restore(self):
    """(last complete step, labelled set after it), or (-1, None); refuses another run's."""
    step, tree = self.store.restore_latest()
    if tree is None:
      return -1, None
    if "config" in tree:
      workdir_lib.check_same_run(self.workdir, workdir_lib.decode_config(tree["config"]),
                                 self.resolved, f"checkpoint {step}")
    self.records = results_lib.records_from_array(np.asarray(tree["results"]))
    return step, np.asarray(tree["labelled"])

  def write_outputs(self) -> None:
    if not parallel.is_main_process():
      return
    results_lib.write_jsonl(self.workdir / "results.jsonl", self.records)
    label = self.config.sampler.name if not self.config.al.upper_bound else "upper bound"
    runs = {label: self.records}
    scale = 100.0 if self.task == "classification" else 1.0
    metric = "accuracy %" if self.task == "classification" else "mean joint error"
    table = results_lib.markdown_table(runs, metric_name=metric, scale=scale)
    (self.workdir / "summary.md").write_text(
        f"# {self.config.data.name}, {self.config.learner.name}, {label}\n\n{table}")
    results_lib.plot_curves(runs, self.workdir / "curve.png", scale=scale,
                            ylabel="test accuracy (%)" if scale == 100.0 else metric,
                            title=f"{self.config.data.name}: {label}")


def _load_data(config) -> data_lib.Dataset:
  try:
    return data_lib.load_dataset(config.data.name, source=config.data.source,
                                 data_dir=config.data.data_dir, path=config.data.path)
  except (ValueError, OSError, ImportError) as err:
    # ImportError: tfds without TensorFlow; the message says what to install.
    raise RunError(f"data: {err}") from err


def run(config: ml_collections.ConfigDict, workdir) -> List[results_lib.Record]:
  """Runs (or resumes, or extends with more trials) the experiment of `config` in `workdir`.

  Args:
    config: experiment config (configs/default.py documents every field).
    workdir: output directory (`~` is expanded). An existing one with the same config is resumed
      at the first unfinished cycle (a larger `al.trials` adds trials); one holding a different
      config, or in use by another run, is refused.
  Returns:
    All records (trial x cycle), also written to `workdir/results.jsonl`.
  Raises:
    ConfigError: a bad config (before any data is loaded or any file written).
    workdir.WorkdirError: the workdir is in use or holds another run (before any training).
    RunError: the data cannot be read, or the learner diverged (earlier cycles are kept).
  """
  workdir = pathlib.Path(workdir).expanduser()
  validate_config(config)
  # Only the main process writes, so only it locks.
  holder = workdir_lib.lock(workdir) if parallel.is_main_process() else contextlib.nullcontext()
  with holder:
    return _run_locked(config, workdir)


def _run_locked(config, workdir: pathlib.Path) -> List[results_lib.Record]:
  resolved = _comparable(config)
  saved = workdir_lib.read_config(workdir)
  workdir_lib.check_same_run(workdir, saved, resolved, workdir_lib.CONFIG_FILE)
  dataset = _load_data(config)
  _say(f"data: {data_lib.describe(dataset)}")
  _check_data(config, dataset)
  exp = _Run(config, workdir, dataset)
  al = config.al
  cycles = 1 if al.upper_bound else al.cycles
  last_step, labelled = exp.restore()
  if last_step >= al.trials * cycles:
    raise ConfigError(f"{workdir} already holds {last_step // cycles + 1} trials; al.trials="
                      f"{al.trials} cannot remove them (use al.trials >= "
                      f"{last_step // cycles + 1})")
  # Every process has read config.json before the main one rewrites it (same branch for all).
  parallel.sync_processes("loop: config.json checked")
  if parallel.is_main_process():
    workdir_lib.write_config(workdir, resolved)
  if last_step >= 0:
    _say(f"resuming {workdir} after trial {last_step // cycles + 1} cycle "
         f"{last_step % cycles + 1}")
    exp.write_outputs()
  try:
    for step in range(last_step + 1, al.trials * cycles):
      trial, cycle = divmod(step, cycles)
      if cycle == 0:
        labelled = exp.initial_labelled(trial)
      prefix = f"trial {trial + 1}/{al.trials} cycle {cycle + 1}/{cycles} "
      if parallel.is_main_process():
        np.save(_labelled_path(workdir, trial, cycle), labelled)
      train_key, select_key = jax.random.split(exp.cycle_key(trial, cycle))
      start = time.perf_counter()
      state, metric = exp.train_and_test(train_key, labelled, prefix)
      train_s = time.perf_counter() - start
      embed_s = sample_s = 0.0
      next_labelled = labelled
      if cycle < cycles - 1:
        save_to = embeddings_lib.path(workdir, trial, cycle) if _save_embeddings(config) else None
        next_labelled, embed_s, sample_s = exp.select(select_key, state, labelled, save_to)
      exp.records.append(results_lib.Record(trial, cycle, len(labelled), metric, train_s,
                                            embed_s, sample_s))
      exp.save(step, next_labelled)
      _say(f"{prefix}| labelled {len(labelled)} | test {metric:.4f} | train {train_s:.1f} s, "
           f"embed {embed_s:.1f} s, sample {sample_s:.1f} s")
      labelled = next_labelled
  finally:
    exp.store.close()
  return exp.records


def _say(message: str) -> None:
  """Progress output (stdout, main process only)."""
  if parallel.is_main_process():
    print(message, flush=True)


def _labelled_path(workdir: pathlib.Path, trial: int, cycle: int) -> pathlib.Path:
  path = workdir / "labelled" / f"trial{trial}_cycle{cycle}.npy"
  path.parent.mkdir(parents=True, exist_ok=True)
  return path
