"""The active learning experiment (protocol §1): trials x cycles, checkpointed after every cycle.

Each cycle is `experiment.cycle.run_cycle`: a fresh learner is trained on the labelled set and
tested; then (except in the last cycle) a random `subset` of the unlabelled pool (or the whole
pool) and the labelled set are embedded by the learner, the sampler picks `budget` subset points,
and they join the labelled set. This module adds the config, the workdir and the resume logic.

Keys: one `config.seed`; trial t uses `fold_in(key(seed), t)`, its cycle c `fold_in(trial, c + 1)`
(split into training, subset and sampler keys), so any cycle can be recomputed from the labelled
set alone and a resumed run equals an uninterrupted one.

Workdir (see `experiment.workdir`): locked for the run; `config.json` (the resolved config, also
stored in every checkpoint), `results.jsonl` (one line per trial x cycle),
`labelled/trial{t}_cycle{c}.npy` (indices trained on), `summary.md`, `curve.png`, and
`checkpoints/` (orbax; the source of truth the other files are rewritten from on resume), and
while a cycle trains `checkpoints_epoch/` (its latest epoch checkpoint, every
`config.train.checkpoint_every` epochs; `experiment.preemption`: resume inside a cycle,
SIGTERM). With
`config.al.save_embeddings`, also `embeddings/trial{t}_cycle{c}.npz` for every selection: the
learner embeddings (float16) of the subset and labelled set, the labelled mask and the picks
(`experiment.embeddings` documents the arrays); a sampler that needs no embedding then costs
one extra eval pass, which is not counted in `embed_s`. Metrics (`experiment.metrics`, main
process): TensorBoard event files `events.out.tfevents.*` and `metrics.jsonl` (per epoch, per
sampler stage that reports, per cycle), without duplicates on resume.

Every config field is checked before the data is loaded, and the data-dependent ones (pool size,
targets, image size) right after, before the workdir is written to.

Resume checks the side files against the checkpoint, which holds every trial's labelled set:
a missing or damaged `labelled/*.npy` is rewritten (one line says so); a damaged or stale
`embeddings/*.npz` is removed, and missing ones are named in one warning line (they cannot be
recomputed without retraining). A full disk stops the run with one line (`workdir.DiskFullError`,
the checkpoints intact) and the rerun resumes; a diverging sampler is a `RunError`.
"""

import contextlib
import math
import pathlib
import sys
from typing import Dict, List, Optional

import jax
import ml_collections
import numpy as np

from jax_seqgcn import models
from jax_seqgcn.data import datasets as data_lib
from jax_seqgcn.experiment import config as config_lib
from jax_seqgcn.experiment import cycle as cycle_lib
from jax_seqgcn.experiment import embeddings as embeddings_lib
from jax_seqgcn.experiment import metrics as metrics_lib
from jax_seqgcn.experiment import preemption
from jax_seqgcn.experiment import results as results_lib
from jax_seqgcn.experiment import workdir as workdir_lib
from jax_seqgcn.training import augment
from jax_seqgcn.training import parallel
from jax_seqgcn.training import progress as progress_lib

CONFIG_FILE = workdir_lib.CONFIG_FILE
# The config checks live in `experiment.config`; these names are the loop's API too.
ConfigError = config_lib.ConfigError
validate_config = config_lib.validate_config
sampler_options = config_lib.sampler_options
fit_kwargs = config_lib.fit_kwargs
# The per-cycle test metric's name in the metrics (`experiment.metrics`).
_TEST_TAG = {"classification": "test/accuracy", "regression": "test/mean_joint_error"}


class RunError(RuntimeError):
  """A run that cannot go on (diverged training, unreadable data); earlier cycles are kept."""


# SIGTERM stopped the run after saving (`experiment.preemption`); rerunning resumes it.
Preempted = preemption.Preempted


def make_setup(config, dataset: data_lib.Dataset, *, mesh=None) -> cycle_lib.CycleSetup:
  """The `cycle.CycleSetup` of a config for `dataset` (learner sized to its classes/targets)."""
  task = config.learner.task
  num_outputs = (dataset.num_classes if task == "classification"
                 else dataset.train_targets.shape[1])
  # MC dropout (BALD) only when asked for: no learner attribute otherwise (DeepPrior has none).
  dropout = ({"dropout_rate": float(config.learner.mc_dropout)}
             if config.learner.get("mc_dropout", 0.0) else {})
  model = models.get_learner(config.learner.name, num_classes=num_outputs,
                             channels=dataset.train_images.shape[-1], **dropout)
  return cycle_lib.make_setup(
      model=model, sampler=config.sampler.name, task=task,
      preprocessing=augment.preprocessing_for(config.data.name),
      options=sampler_options(config), fit_kwargs=fit_kwargs(config),
      eval_batch_size=config.train.eval_batch_size, mesh=mesh)


def progress_callback(config, prefix: str, *, stream=None, record=None,
                      num_examples: Optional[int] = None):
  """`fit`'s per-epoch callback: a `RunError` at the first non-finite loss, text lines (main
  process only, to `stream`; None: stderr) five times per training, and, given
  `record(epoch, metrics)` (e.g. `experiment.metrics.MetricsWriter.write_epoch`), every epoch's
  metrics, with 'images_per_s' added when `num_examples` (the labelled set's size) is given."""
  every = max(1, config.train.epochs // 5)
  shown = (progress_lib.text_progress(every=every, prefix=prefix, stream=stream)
           if parallel.is_main_process() else None)
  rate = metrics_lib.images_per_second(num_examples) if num_examples else None

  def progress(epoch, epochs, metrics):
    # Stop at the first non-finite epoch loss rather than record a diverged learner.
    if not math.isfinite(metrics["loss"]):
      raise RunError(f"{prefix.strip()}: the learner's training loss is {metrics['loss']} at "
                     f"epoch {epoch}; it diverged (train.learning_rate "
                     f"{config.train.learning_rate}). Earlier cycles are saved.")
    if shown is not None:
      shown(epoch, epochs, metrics)
    if record is not None:
      record(epoch, dict(metrics, images_per_s=rate()) if rate is not None else metrics)

  return progress


def _sampler_reporter(writer: metrics_lib.MetricsWriter, trial: int, cycle: int, prefix: str,
                      *, stream=None):
  """`training.progress.reporting`'s callback for a cycle's sampler stages: their per-step
  values to `writer` (`sampler/<stage>/<name>`) and one progress line per report (main process,
  to `stream`; None: stderr)."""

  def reporter(stage, values, first_step, total_steps):
    writer.write_sampler(trial, cycle, stage, values, first_step)
    if parallel.is_main_process():
      done = first_step + max((len(v) for v in values.values()), default=0)
      last = " ".join(f"{k} {v[-1]:.4g}" for k, v in sorted(values.items()) if len(v))
      of = f"/{total_steps}" if total_steps else ""
      print(f"{prefix}sampler {stage} step {done}{of} {last}", file=stream or sys.stderr,
            flush=True)

  return reporter


class _Run:
  """State of one experiment in its workdir: the setup, the checkpoints, the records so far."""

  def __init__(self, config, workdir: pathlib.Path, dataset: data_lib.Dataset):
    self.config, self.workdir, self.dataset = config, workdir, dataset
    if config.data.max_test:
      self.dataset = self.dataset._replace(
          test_images=self.dataset.test_images[:config.data.max_test],
          test_targets=self.dataset.test_targets[:config.data.max_test])
    self.task = config.learner.task
    self.setup = make_setup(config, self.dataset)
    self.store = workdir_lib.CheckpointStore(workdir / "checkpoints")
    self.resolved = workdir_lib.config_to_dict(config)
    self.records: List[results_lib.Record] = []
    # {trial: its latest labelled set}: a finished trial's final set holds every cycle's set as
    # a prefix (picks are appended), so the checkpoint can restore any labelled/*.npy.
    self.trial_sets: Dict[int, np.ndarray] = {}
    self.said_batch = False
    # The running cycle's latest epoch checkpoint (`experiment.preemption`).
    self.epoch_checkpoints = preemption.make(config, workdir)
    # TensorBoard events and metrics.jsonl; opened by `_run_locked` once the resume point is
    # known (`experiment.metrics`). Disabled until then.
    self.metrics = metrics_lib.MetricsWriter(workdir, enabled=False)

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

  def run_cycle(self, trial: int, cycle: int, labelled: np.ndarray,
                prefix: str) -> cycle_lib.CycleResult:
    """`cycle.run_cycle` of (trial, cycle); saves what the sampler saw when asked to."""
    al = self.config.al
    last = cycle == (1 if al.upper_bound else al.cycles) - 1
    batch = cycle_lib.train_batch_size(self.setup, len(labelled))
    if batch < self.config.train.batch_size and not self.said_batch:
      self.said_batch = True  # once: the labelled set grows, the rule stays
      _say(f"note: train.batch_size {self.config.train.batch_size} is larger than the labelled "
           f"set ({len(labelled)}); while it is, each epoch trains on the whole labelled set "
           "as one batch")
    resume = self.epoch_checkpoints.fit_kwargs(trial, cycle, labelled)
    self.metrics.start_cycle(trial, cycle, resume.get("start_epoch", 0))
    record = lambda epoch, metrics: self.metrics.write_epoch(trial, cycle, epoch, metrics)
    try:
      with progress_lib.reporting(_sampler_reporter(self.metrics, trial, cycle, prefix)):
        result = cycle_lib.run_cycle(
            self.setup, self.cycle_key(trial, cycle), self.dataset, labelled,
            budget=None if last else al.budget, subset=None if al.whole_pool else al.subset,
            progress=progress_callback(self.config, prefix, record=record,
                                       num_examples=len(labelled)),
            **resume)
    except FloatingPointError as err:  # a sampler's own training diverged (GCN, VAAL)
      raise RunError(f"{prefix.strip()}: {err}. Earlier cycles are saved.") from err
    if result.selection is not None and config_lib.save_embeddings(self.config):
      selection = result.selection
      features = selection.pool.features
      if features is None:  # the sampler needed none: one extra pass, not counted in embed_s
        features = cycle_lib.forward(self.setup, result.state, self.dataset.train_images,
                                     selection.nodes)["embedding"]
      if parallel.is_main_process():
        embeddings_lib.save(embeddings_lib.path(self.workdir, trial, cycle), selection.nodes,
                            features, selection.pool.labelled_mask, selection.picks)
    return result

  # Checkpoints: global step = trial * cycles + cycle, saved once that cycle is complete.
  def save(self, step: int, next_labelled: np.ndarray) -> None:
    trial = step // self.cycles
    self.trial_sets[trial] = np.asarray(next_labelled, np.int64)
    tree = {"labelled": self.trial_sets[trial],
            "results": results_lib.records_to_array(self.records),
            "seed": np.int64(self.config.seed),
            "config": workdir_lib.encode_config(self.resolved)}
    # The earlier trials' final sets, one after the other (orbax saves no empty array); not
    # known after resuming an older checkpoint that lacks them.
    past = [self.trial_sets.get(t) for t in range(trial)]
    if past and all(p is not None for p in past):
      tree["past_labelled"] = np.concatenate(past)
    self.store.save(step, tree)
    self.write_outputs()

  @property
  def cycles(self) -> int:
    return 1 if self.config.al.upper_bound else self.config.al.cycles

  def restore(self):
    """(last complete step, labelled set after it), or (-1, None); refuses another run's."""
    step, tree = self.store.restore_latest()
    if tree is None:
      return -1, None
    if "config" in tree:
      workdir_lib.check_same_run(self.workdir, workdir_lib.decode_config(tree["config"]),
                                 self.resolved, f"checkpoint {step}")
    self.records = results_lib.records_from_array(np.asarray(tree["results"]))
    labelled = np.asarray(tree["labelled"], np.int64)
    self.trial_sets = results_lib.trial_sets(self.records, step // self.cycles, labelled,
                                  tree.get("past_labelled"))
    return step, labelled

  def check_side_files(self) -> None:
    """Rewrites the missing or damaged labelled sets of the completed cycles from the
    checkpoint; removes damaged or stale saved selections and names the missing ones (they
    cannot be recomputed without retraining). One line for each kind of repair."""
    if not parallel.is_main_process():
      return
    al, rewritten, unknown, lost = self.config.al, [], [], []
    save_embeddings = config_lib.save_embeddings(self.config)
    for r in self.records:
      known = self.trial_sets.get(r.trial)
      path = _labelled_path(self.workdir, r.trial, r.cycle)
      expected = None if known is None or len(known) < r.n_labelled else known[:r.n_labelled]
      if expected is None:
        if not results_lib.is_int_vector(path, r.n_labelled):
          unknown.append(path.name)
      elif not results_lib.equal_file(path, expected):
        np.save(path, expected)
        rewritten.append(path.name)
      if save_embeddings and r.cycle < self.cycles - 1:  # a cycle that selected
        after = (None if known is None or len(known) < r.n_labelled + al.budget
                 else known[:r.n_labelled + al.budget])
        file = embeddings_lib.path(self.workdir, r.trial, r.cycle)
        problem = embeddings_lib.selection_problem(file, expected, after)
        if problem:
          if problem != "missing":
            file.unlink()
          lost.append(f"{file.name} ({problem}{'' if problem == 'missing' else ', removed'})")
    where = self.workdir / "labelled"
    if rewritten:
      _say(f"rewrote {len(rewritten)} labelled set(s) in {where} from the checkpoint (missing or "
           f"damaged): {', '.join(rewritten)}")
    if unknown:
      _warn(f"{', '.join(unknown)} in {where} are missing or damaged and this checkpoint (from "
            "an older version) cannot restore them")
    if lost:
      _warn(f"saved selections in {self.workdir / embeddings_lib.DIRECTORY} that cannot be "
            f"recomputed without retraining: {', '.join(lost)}")

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
  # SIGTERM saves at the next epoch boundary and raises `preemption.Preempted`.
  try:
    with holder, preemption.sigterm_saves(), workdir_lib.quiet_orbax():
      return _run_locked(config, workdir)
  except Exception as err:  # pylint: disable=broad-except
    # Any write may meet a full disk (event files, results, checkpoints): one line; what is
    # saved stays consistent (files are replaced atomically, orbax commits by renaming).
    if workdir_lib.disk_full(err) and not isinstance(err, workdir_lib.DiskFullError):
      raise workdir_lib.disk_full_error(f"writing to {workdir}") from None
    raise


def _run_locked(config, workdir: pathlib.Path) -> List[results_lib.Record]:
  resolved = workdir_lib.config_to_dict(config)
  saved = workdir_lib.read_config(workdir)
  workdir_lib.check_same_run(workdir, saved, resolved, workdir_lib.CONFIG_FILE)
  dataset = _load_data(config)
  _say(f"data: {data_lib.describe(dataset)}")
  config_lib.check_data(config, dataset)
  exp = _Run(config, workdir, dataset)
  al = config.al
  cycles = 1 if al.upper_bound else al.cycles
  last_step, labelled = _agreed(*exp.restore())
  if last_step >= al.trials * cycles:
    raise ConfigError(f"{workdir} already holds {last_step // cycles + 1} trials; al.trials="
                      f"{al.trials} cannot remove them (use al.trials >= "
                      f"{last_step // cycles + 1})")
  # Every process has read config.json before the main one rewrites it (same branch for all).
  parallel.sync_processes("loop: config.json checked")
  if parallel.is_main_process():
    workdir_lib.write_config(workdir, resolved)
  # Drops the metrics points of cycles after the last checkpoint (no duplicates on resume).
  exp.metrics = metrics_lib.MetricsWriter(workdir, enabled=parallel.is_main_process(),
                                          cycles=cycles, completed=last_step)
  if last_step >= 0:
    _say(f"resuming {workdir} after trial {last_step // cycles + 1} cycle "
         f"{last_step % cycles + 1}")
    exp.check_side_files()
    exp.write_outputs()
  try:
    for step in range(last_step + 1, al.trials * cycles):
      trial, cycle = divmod(step, cycles)
      if cycle == 0:
        labelled = parallel.broadcast_from_main(exp.initial_labelled(trial))
      prefix = f"trial {trial + 1}/{al.trials} cycle {cycle + 1}/{cycles} "
      if parallel.is_main_process():
        np.save(_labelled_path(workdir, trial, cycle), labelled)
      result = exp.run_cycle(trial, cycle, labelled, prefix)
      selection = result.selection
      next_labelled = labelled if selection is None else selection.next_labelled
      embed_s = 0.0 if selection is None else selection.embed_s
      sample_s = 0.0 if selection is None else selection.sample_s
      metric, train_s = result.metric, result.train_s
      exp.records.append(results_lib.Record(trial, cycle, len(labelled), metric, train_s,
                                            embed_s, sample_s))
      # Before the checkpoint: after a crash in between, the cycle is unfinished and its
      # resumed run writes these points again, once (`MetricsWriter.start_cycle`).
      exp.metrics.write_cycle(trial, cycle, len(labelled), {
          _TEST_TAG[exp.task]: metric, "time/train_s": train_s, "time/embed_s": embed_s,
          "time/sample_s": sample_s})
      exp.save(step, next_labelled)
      _say(f"{prefix}| labelled {len(labelled)} | test {metric:.4f} | train {train_s:.1f} s, "
           f"embed {embed_s:.1f} s, sample {sample_s:.1f} s")
      labelled = next_labelled
      exp.epoch_checkpoints.clear()  # the cycle is saved: its epoch checkpoint is stale
      exp.epoch_checkpoints.check_between_cycles(trial, cycle, step == al.trials * cycles - 1)
  except BaseException:
    # The error in flight is the one to report: closing after it (e.g. waiting for an epoch
    # checkpoint that the same full disk failed) must not replace it.
    _close(exp, quiet=True)
    raise
  _close(exp, quiet=False)
  return exp.records


def _close(exp: _Run, *, quiet: bool) -> None:
  """Closes the checkpoint stores and the metrics; with `quiet`, their errors are dropped."""
  for close in (exp.store.close, exp.epoch_checkpoints.close, exp.metrics.close):
    try:
      close()
    except Exception:  # pylint: disable=broad-except
      if not quiet:
        raise


def _warn(message: str) -> None:
  """One warning line on stderr (main process only)."""
  if parallel.is_main_process():
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _agreed(last_step: int, labelled):
  """Process 0's (last complete step, labelled set) in every process (one run, one state)."""
  last_step = int(parallel.broadcast_from_main(np.int64(last_step)))
  if last_step < 0:
    return last_step, None
  size = len(labelled) if labelled is not None else -1
  size = int(parallel.broadcast_from_main(np.int64(size)))
  mine = labelled if labelled is not None and len(labelled) == size else np.zeros(size)
  return last_step, parallel.broadcast_from_main(np.asarray(mine, np.int64))


def _say(message: str) -> None:
  """Progress output (stdout, main process only)."""
  if parallel.is_main_process():
    print(message, flush=True)


def _labelled_path(workdir: pathlib.Path, trial: int, cycle: int) -> pathlib.Path:
  path = workdir / "labelled" / f"trial{trial}_cycle{cycle}.npy"
  path.parent.mkdir(parents=True, exist_ok=True)
  return path
