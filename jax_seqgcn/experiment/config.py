"""Experiment configs: every field checked before any work, and what the loop reads from them.

`validate_config` checks every section (data, learner, train, al, sampler and the chosen
sampler's options) without loading anything; `check_data` adds the data-dependent checks (pool
size, targets, image size). `fit_kwargs` and `sampler_options` turn a config into the arguments
of `training.fit` and of the sampler. Fields added after workdirs were written take the value
older runs had (`workdir.ADDED_FIELDS`).
"""

from typing import List, Optional

import ml_collections
import numpy as np

from jax_seqgcn import checks
from jax_seqgcn import models
from jax_seqgcn import samplers
from jax_seqgcn.data import datasets as data_lib
from jax_seqgcn.experiment import workdir as workdir_lib
from jax_seqgcn.training import augment
from jax_seqgcn.training import precision
from jax_seqgcn.training import state as state_lib

# config.sampler keys that are not sampler options.
_SAMPLER_META = ("name",)
# config.data fields that cap how many examples are used (today only the test split's).
_DATA_LIMITS = ("max_test",)


class ConfigError(ValueError):
  """A configuration that cannot run; raised before any training."""


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
  seed = config.get("seed", 0)
  if not checks.is_int(seed) or not 0 <= seed < 2 ** 32:
    # jax.random.key wraps wider seeds (-1 == 2**32 - 1) or overflows after training started.
    problems.append(f"seed must be an int in [0, 2**32), got {seed!r}")
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
  if config.learner.task not in state_lib.TASKS:
    problems.append(f"unknown learner.task {config.learner.task!r}; valid: "
                    f"{', '.join(state_lib.TASKS)}")
  elif (sampler is not None and config.learner.task != "classification"
        and "probabilities" in sampler.needs):
    problems.append(f"sampler {sampler.name} needs class probabilities, which a "
                    f"{config.learner.task} learner does not give")
  mc_dropout = config.learner.get("mc_dropout", 0.0)
  if not checks.is_real(mc_dropout) or not 0.0 <= mc_dropout < 1.0:
    problems.append(f"learner.mc_dropout must be a number in [0, 1), got {mc_dropout!r}")
  elif mc_dropout and config.learner.task != "classification":
    problems.append("learner.mc_dropout is a dropout before a classifier's head; the "
                    f"{config.learner.task} learner has none")
  elif sampler is not None and "mc_probabilities" in sampler.needs and not mc_dropout:
    problems.append(f"sampler {sampler.name} needs MC-dropout predictions: set "
                    "learner.mc_dropout > 0 (the dropout rate before the learner's head, "
                    "used in training and in the T passes; e.g. 0.5)")
  al = config.al
  for name in ("trials", "cycles", "initial", "budget", "subset"):
    if not checks.is_int(al[name]) or al[name] <= 0:
      problems.append(f"al.{name} must be a positive int, got {al[name]!r}")
  for name in ("epochs", "batch_size", "eval_batch_size"):
    if not checks.is_int(config.train[name]) or config.train[name] <= 0:
      problems.append(f"train.{name} must be a positive int, got {config.train[name]!r}")
  # The data limits: 0 means the whole split; a negative one would slice from the end.
  for name in _DATA_LIMITS:
    value = config.data.get(name, 0)
    if not checks.is_int(value) or value < 0:
      problems.append(f"data.{name} must be an int >= 0 (0: the whole split), got {value!r}")
  if not isinstance(save_embeddings(config), bool):
    problems.append(f"al.save_embeddings must be True or False, got {al.save_embeddings!r}")
  problems += _train_problems(config.train)
  try:
    precision.check_compute_dtype(compute_dtype(config))
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
  every = t.get("checkpoint_every", 0)
  if not checks.is_int(every) or every < 0:
    problems.append(f"train.checkpoint_every must be an int >= 0 (0: no epoch checkpoints), "
                    f"got {every!r}")
  return problems


def check_data(config, dataset) -> None:
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


def fit_kwargs(config) -> dict:
  """`training.fit` keyword arguments of `config.train` (the sampler's own are added later)."""
  t = config.train
  milestones = t.milestones if isinstance(t.milestones, (tuple, list)) else (t.milestones,)
  return dict(epochs=t.epochs, batch_size=t.batch_size, learning_rate=t.learning_rate,
              momentum=t.momentum, weight_decay=t.weight_decay, milestones=tuple(milestones),
              gamma=t.gamma, compute_dtype=compute_dtype(config))


def _added_field(config, dotted: str):
  # A config written before the field existed (e.g. a resumed workdir's) means the value
  # older runs had, which `workdir.ADDED_FIELDS` holds.
  section, name = dotted.split(".")
  return config[section].get(name, workdir_lib.ADDED_FIELDS[dotted])


def compute_dtype(config) -> str:
  return _added_field(config, "train.compute_dtype")


def save_embeddings(config):
  return _added_field(config, "al.save_embeddings")
