"""The active learning experiment (SPEC §1): trials x cycles, checkpointed after every cycle.

Each cycle: a fresh learner is trained on the labelled set and tested; then (except in the last
cycle) a random `subset` of the unlabelled pool (or the whole pool) and the labelled set are
embedded by the learner, the sampler picks `budget` subset points, and they join the labelled set.

Keys: one `config.seed`; trial t uses `fold_in(key(seed), t)`, its cycle c `fold_in(trial, c + 1)`
(split into training, subset and sampler keys), so any cycle can be recomputed from the labelled
set alone and a resumed run equals an uninterrupted one.

Workdir: `config.json` (the resolved config), `results.jsonl` (one line per trial x cycle),
`labelled/trial{t}_cycle{c}.npy` (indices trained on), `summary.md`, `curve.png`, and
`checkpoints/` (orbax; the source of truth the other files are rewritten from on resume).
"""

import json
import pathlib
import sys
import time
from typing import List, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jax_seqgcn import augment
from jax_seqgcn import data as data_lib
from jax_seqgcn import models
from jax_seqgcn import parallel
from jax_seqgcn import results as results_lib
from jax_seqgcn import samplers
from jax_seqgcn import train

CONFIG_FILE = "config.json"
# config.sampler keys that are not sampler options.
_SAMPLER_META = ("name",)


class ConfigError(ValueError):
  """A configuration that cannot run; raised before any training."""


def _config_dict(config) -> dict:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def validate_config(config: ml_collections.ConfigDict, pool_size: Optional[int] = None) -> None:
  """Raises `ConfigError` (one message listing every problem) for a config that cannot run.

  Args:
    config: experiment config (see configs/default.py).
    pool_size: size of the training split, to check that the cycles fit in the pool.
  """
  problems = []
  if config.sampler.name not in samplers.SAMPLERS:
    problems.append(f"unknown sampler {config.sampler.name!r}; valid: "
                    f"{', '.join(samplers.SAMPLERS)}")
  if config.data.name not in data_lib.DATASETS:
    problems.append(f"unknown dataset {config.data.name!r}; valid: "
                    f"{', '.join(data_lib.DATASETS)}")
  if config.learner.name not in models.LEARNERS:
    problems.append(f"unknown learner {config.learner.name!r}; valid: "
                    f"{', '.join(models.LEARNERS)}")
  al = config.al
  for name in ("trials", "cycles", "initial", "budget", "subset"):
    if not isinstance(al[name], int) or al[name] <= 0:
      problems.append(f"al.{name} must be a positive int, got {al[name]!r}")
  for name in ("epochs", "batch_size", "eval_batch_size"):
    if not isinstance(config.train[name], int) or config.train[name] <= 0:
      problems.append(f"train.{name} must be a positive int, got {config.train[name]!r}")
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


def _check_workdir_config(workdir: pathlib.Path, config) -> None:
  path = workdir / CONFIG_FILE
  resolved = _config_dict(config)
  saved = json.loads(path.read_text()) if path.exists() else None
  # Multi-process: every process has looked before the main one creates the file, so none reads
  # it half written, and all of them take the same branch below.
  parallel.sync_processes("loop: config.json checked")
  if saved is not None:
    if saved != resolved:
      saved_flat, resolved_flat = _flatten(saved), _flatten(resolved)
      diff = sorted(k for k in saved_flat.keys() | resolved_flat.keys()
                    if saved_flat.get(k) != resolved_flat.get(k))
      raise ConfigError(
          f"{workdir} holds a run with a different config (differs in: {', '.join(diff)}). "
          "Use a new --workdir, or the same config to resume.")
  elif parallel.is_main_process():
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(resolved, indent=1, sort_keys=True) + "\n")


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def sampler_options(config) -> dict:
  """The `config.sampler` entries passed to the sampler (everything but its name)."""
  return {k: v for k, v in config.sampler.items() if k not in _SAMPLER_META}


def _fit_kwargs(config) -> dict:
  t = config.train
  return dict(task=config.learner.task, epochs=t.epochs, batch_size=t.batch_size,
              learning_rate=t.learning_rate, momentum=t.momentum,
              weight_decay=t.weight_decay, milestones=tuple(t.milestones), gamma=t.gamma)


class _Run:
  """State of one experiment: data, learner, checkpoint manager, records so far."""

  def __init__(self, config, workdir: pathlib.Path):
    self.config, self.workdir = config, workdir
    self.dataset = data_lib.load_dataset(config.data.name, source=config.data.source,
                                         data_dir=config.data.data_dir, path=config.data.path)
    _say(f"data: {data_lib.describe(self.dataset)}")
    validate_config(config, pool_size=len(self.dataset.train_images))
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
    self.mesh = parallel.make_mesh()
    self.manager = ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
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
    every = max(1, self.config.train.epochs // 5)
    progress = (train.text_progress(every=every, prefix=prefix)
                if parallel.is_main_process() else None)
    state = train.fit(key, self.model, self.dataset.train_images[labelled],
                      self.dataset.train_targets[labelled], preprocessing=self.preprocessing,
                      mesh=self.mesh, progress=progress, **_fit_kwargs(self.config))
    metric = train.evaluate(state, self.model, self.dataset.test_images,
                            self.dataset.test_targets, task=self.task,
                            batch_size=self.config.train.eval_batch_size,
                            preprocessing=self.preprocessing, mesh=self.mesh)
    return state, metric

  def select(self, key, state, labelled):
    """Returns (new labelled set, seconds embedding, seconds sampling)."""
    al = self.config.al
    subset_key, sampler_key = jax.random.split(key)
    unlabelled = np.setdiff1d(np.arange(len(self.dataset.train_images)), labelled)
    if not al.whole_pool and al.subset < len(unlabelled):
      unlabelled = np.asarray(jax.random.choice(subset_key, unlabelled, (al.subset,),
                                                replace=False))
    start = time.perf_counter()
    # Node order as the reference: the unlabelled subset first, then the labelled set.
    nodes = np.concatenate([unlabelled, labelled])
    features = train.extract_embeddings(state, self.model, self.dataset.train_images, nodes,
                                        batch_size=self.config.train.eval_batch_size,
                                        preprocessing=self.preprocessing, mesh=self.mesh)
    embed_s = time.perf_counter() - start
    start = time.perf_counter()
    mask = np.arange(len(nodes)) >= len(unlabelled)
    picks = np.asarray(self.sampler(sampler_key, features, mask, al.budget,
                                    **sampler_options(self.config)))
    sample_s = time.perf_counter() - start
    return np.concatenate([labelled, unlabelled[picks]]), embed_s, sample_s

  # Checkpoints: global step = trial * cycles + cycle, saved once that cycle is complete.
  def save(self, step: int, next_labelled: np.ndarray) -> None:
    tree = {"labelled": np.asarray(next_labelled, np.int64),
            "results": results_lib.records_to_array(self.records),
            "seed": np.int64(self.config.seed)}
    self.manager.save(step, args=ocp.args.StandardSave(tree))
    self.manager.wait_until_finished()
    self.write_outputs()

  def restore(self):
    step = self.manager.latest_step()
    if step is None:
      return -1, None
    tree = self.manager.restore(step, args=ocp.args.StandardRestore())
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


def run(config: ml_collections.ConfigDict, workdir) -> List[results_lib.Record]:
  """Runs (or resumes) the experiment described by `config` in `workdir`.

  Args:
    config: experiment config (configs/default.py documents every field).
    workdir: output directory; an existing one with the same config is resumed at the first
      unfinished cycle, one with a different config is refused.
  Returns:
    All records (trial x cycle), also written to `workdir/results.jsonl`.
  Raises:
    ConfigError: a bad config, or a workdir holding a different config (before any training).
  """
  workdir = pathlib.Path(workdir)
  validate_config(config)
  _check_workdir_config(workdir, config)
  exp = _Run(config, workdir)
  al = config.al
  cycles = 1 if al.upper_bound else al.cycles
  last_step, labelled = exp.restore()
  if last_step >= 0:
    _say(f"resuming {workdir} after trial {last_step // cycles + 1} cycle "
         f"{last_step % cycles + 1}")
    exp.write_outputs()
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
      next_labelled, embed_s, sample_s = exp.select(select_key, state, labelled)
    exp.records.append(results_lib.Record(trial, cycle, len(labelled), metric, train_s,
                                          embed_s, sample_s))
    exp.save(step, next_labelled)
    _say(f"{prefix}| labelled {len(labelled)} | test {metric:.4f} | train {train_s:.1f} s, "
         f"embed {embed_s:.1f} s, sample {sample_s:.1f} s")
    labelled = next_labelled
  exp.manager.close()
  return exp.records


def _say(message: str) -> None:
  """Progress output (stdout, main process only)."""
  if parallel.is_main_process():
    print(message, flush=True)


def _labelled_path(workdir: pathlib.Path, trial: int, cycle: int) -> pathlib.Path:
  path = workdir / "labelled" / f"trial{trial}_cycle{cycle}.npy"
  path.parent.mkdir(parents=True, exist_ok=True)
  return path
