"""jax-seqgcn: sequential graph convolutional samplers for deep active learning in JAX.

Public API (shapes in each docstring; docs/library.md has the tables). Subpackages by layer,
each importing only the ones below it:

* `apps`: the `jax-seqgcn` command line (`cli`), one selection round on own data
  (`own_data`: `select_features_file`, `select_image_folder`, `load_learner`), t-SNE figures.
* `experiment`: `run(config, workdir)`, the trials x cycles loop with checkpoints; `cycle`, one
  I/O-free cycle (`make_setup`, `run_cycle`, `train_learner`, `embed_pool`, `select`);
  `results`, `workdir`, `embeddings`.
* `samplers`: the registry `SAMPLERS` / `get_sampler(name)` of samplers called as
  `sampler(key, Pool(...), budget, **options)`; `uncertain_gcn_select`, `core_gcn_select`.
* `training`: `fit`, `evaluate`, `predict`, `extract_embeddings`, `forward_pool`, `TrainState`,
  `LossPrediction`, preprocessing (`preprocess`, `preprocessing_for`) and meshes (`make_mesh`,
  `initialize_distributed`).
* `selection`: the pure algorithms: `normalized_adjacency`, `factored_adjacency`, `propagate`,
  `GCN`, `gcn_loss`, `train_gcn`, `params_from_torch`, `k_center_greedy`,
  `k_center_greedy_sharded`, `k_medoids`, `k_medoids_sharded`, `k_means`.
* `models`, `data`, `runtime`, `checks`: learners (`get_learner`, `ResNet18`, `VGG11`,
  `DeepPrior`, `SmallCNN`), datasets (`load_dataset`, `Dataset`), entry-point helpers, input checks.

`import jax_seqgcn` loads the library layers (models, data, training, selection, samplers); the
experiment and app layers (orbax, absl, ml_collections) load on first use of one of their names.
"""

import importlib

from jax_seqgcn import checks
from jax_seqgcn import data
from jax_seqgcn import models
from jax_seqgcn import samplers
from jax_seqgcn import selection
from jax_seqgcn import training
from jax_seqgcn.data import DATASETS
from jax_seqgcn.data import Dataset
from jax_seqgcn.data import DatasetNotFoundError
from jax_seqgcn.data import describe
from jax_seqgcn.data import load_dataset
from jax_seqgcn.data import load_fashion_mnist_idx
from jax_seqgcn.data import load_npz
from jax_seqgcn.data import load_tfds
from jax_seqgcn.models import LEARNERS
from jax_seqgcn.models import DeepPrior
from jax_seqgcn.models import ResNet18
from jax_seqgcn.models import SmallCNN
from jax_seqgcn.models import VGG11
from jax_seqgcn.models import check_input_shape
from jax_seqgcn.models import get_learner
from jax_seqgcn.samplers import SAMPLERS
from jax_seqgcn.samplers import Pool
from jax_seqgcn.samplers import Sampler
from jax_seqgcn.samplers import core_gcn_select
from jax_seqgcn.samplers import get_sampler
from jax_seqgcn.samplers import uncertain_gcn_select
from jax_seqgcn.selection import FactoredAdjacency
from jax_seqgcn.selection import GCN
from jax_seqgcn.selection import GCNResult
from jax_seqgcn.selection import choose_adjacency
from jax_seqgcn.selection import factored_adjacency
from jax_seqgcn.selection import gcn_loss
from jax_seqgcn.selection import gcn_loss_from_logits
from jax_seqgcn.selection import k_center_greedy
from jax_seqgcn.selection import k_center_greedy_sharded
from jax_seqgcn.selection import k_means
from jax_seqgcn.selection import k_medoids
from jax_seqgcn.selection import k_medoids_sharded
from jax_seqgcn.selection import normalized_adjacency
from jax_seqgcn.selection import params_from_torch
from jax_seqgcn.selection import propagate
from jax_seqgcn.selection import train_gcn
from jax_seqgcn.training import PREPROCESSING
from jax_seqgcn.training import LossPrediction
from jax_seqgcn.training import PreprocessSpec
from jax_seqgcn.training import TrainState
from jax_seqgcn.training import evaluate
from jax_seqgcn.training import extract_embeddings
from jax_seqgcn.training import fit
from jax_seqgcn.training import forward_pool
from jax_seqgcn.training import initialize_distributed
from jax_seqgcn.training import is_main_process
from jax_seqgcn.training import make_mesh
from jax_seqgcn.training import predict
from jax_seqgcn.training import preprocess
from jax_seqgcn.training import preprocessing_for
from jax_seqgcn.training import text_progress

__version__ = "0.1.0"

# Names of the upper layers, imported on first access (PEP 562): name -> (module, attribute).
_LAZY = {
    "apps": ("jax_seqgcn.apps", None),
    "experiment": ("jax_seqgcn.experiment", None),
    "runtime": ("jax_seqgcn.runtime", None),
    "run": ("jax_seqgcn.experiment.loop", "run"),
    "ConfigError": ("jax_seqgcn.experiment.loop", "ConfigError"),
    "RunError": ("jax_seqgcn.experiment.loop", "RunError"),
    "validate_config": ("jax_seqgcn.experiment.loop", "validate_config"),
    "CycleSetup": ("jax_seqgcn.experiment.cycle", "CycleSetup"),
    "CycleResult": ("jax_seqgcn.experiment.cycle", "CycleResult"),
    "Selection": ("jax_seqgcn.experiment.cycle", "Selection"),
    "make_setup": ("jax_seqgcn.experiment.cycle", "make_setup"),
    "run_cycle": ("jax_seqgcn.experiment.cycle", "run_cycle"),
    "select_features_file": ("jax_seqgcn.apps.own_data", "select_features_file"),
    "select_image_folder": ("jax_seqgcn.apps.own_data", "select_image_folder"),
    "load_learner": ("jax_seqgcn.apps.outputs", "load_learner"),
}


def __getattr__(name):
  if name not in _LAZY:
    raise AttributeError(f"module 'jax_seqgcn' has no attribute {name!r}")
  module, attribute = _LAZY[name]
  value = importlib.import_module(module)
  if attribute is not None:
    value = getattr(value, attribute)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_LAZY))
