"""jax-seqgcn: sequential graph convolutional samplers for deep active learning in JAX.

Public API (shapes in each docstring):

* Graph sampler core (`graph`): `normalized_adjacency`, `factored_adjacency`, `propagate`,
  `GCN`, `gcn_loss`, `train_gcn`, `params_from_torch`.
* Selection (`kcenter`, `kmedoids`, `samplers`): `k_center_greedy`, `k_medoids`; the registry
  `SAMPLERS` / `get_sampler(name)` of samplers called as `sampler(key, Pool(...), budget,
  **options)` (Random, CoreSet, UncertainGCN, CoreGCN, UncertainDiscriminator, LearningLoss,
  VAAL, FeatProp, Entropy, Margin, LeastConfidence, BADGE); features-first functions such as
  `samplers.core_gcn(key, features, labelled_mask, budget)`; the selection rules
  `uncertain_gcn_select`, `core_gcn_select`.
* Learners (`models`): `get_learner(name, ...)`, `LEARNERS`, `ResNet18`, `VGG11`, `DeepPrior`,
  `SmallCNN`.
* Data (`data`): `load_dataset`, `load_tfds`, `load_fashion_mnist_idx`, `load_npz`, `Dataset`.
* Training (`train`, `augment`, `parallel`, `loss_prediction`): `fit` (optionally with a
  jointly trained loss-prediction module, `LossPrediction`), `evaluate`, `extract_embeddings`,
  `forward_pool`, `predict`, `TrainState`, `preprocess`, `preprocessing_for`, `make_mesh`,
  `initialize_distributed`.
* Scale (`kcenter_sharded`): `k_center_greedy_sharded` over a device mesh.
* Experiments (`loop`, `workdir`, `results`): `run(config, workdir)`, results tables and curves.
* Inspection (`embeddings`, `tsne`): selections saved with `config.al.save_embeddings`, and
  t-SNE figures of them (scikit-learn, an optional extra).
* Own data (`folder`, `own_data`, the `jax-seqgcn` command line in `cli`): `select_features_file`,
  `select_image_folder` (one selection round, the loop's training), `load_learner`.
"""

from jax_seqgcn import augment
from jax_seqgcn import checks
from jax_seqgcn import data
from jax_seqgcn import embeddings
from jax_seqgcn import folder
from jax_seqgcn import graph
from jax_seqgcn import kcenter
from jax_seqgcn import kcenter_sharded
from jax_seqgcn import kmedoids
from jax_seqgcn import loss_prediction
from jax_seqgcn import loop
from jax_seqgcn import models
from jax_seqgcn import own_data
from jax_seqgcn import parallel
from jax_seqgcn import results
from jax_seqgcn import samplers
from jax_seqgcn import train
from jax_seqgcn import tsne
from jax_seqgcn import workdir
from jax_seqgcn.augment import PREPROCESSING
from jax_seqgcn.augment import PreprocessSpec
from jax_seqgcn.augment import preprocess
from jax_seqgcn.augment import preprocessing_for
from jax_seqgcn.data import DATASETS
from jax_seqgcn.data import Dataset
from jax_seqgcn.data import DatasetNotFoundError
from jax_seqgcn.data import describe
from jax_seqgcn.data import load_dataset
from jax_seqgcn.data import load_fashion_mnist_idx
from jax_seqgcn.data import load_npz
from jax_seqgcn.data import load_tfds
from jax_seqgcn.graph import FactoredAdjacency
from jax_seqgcn.graph import GCN
from jax_seqgcn.graph import GCNResult
from jax_seqgcn.graph import choose_adjacency
from jax_seqgcn.graph import factored_adjacency
from jax_seqgcn.graph import gcn_loss
from jax_seqgcn.graph import gcn_loss_from_logits
from jax_seqgcn.graph import normalized_adjacency
from jax_seqgcn.graph import params_from_torch
from jax_seqgcn.graph import propagate
from jax_seqgcn.graph import train_gcn
from jax_seqgcn.kcenter import k_center_greedy
from jax_seqgcn.kcenter_sharded import k_center_greedy_sharded
from jax_seqgcn.kmedoids import k_medoids
from jax_seqgcn.loss_prediction import LossPrediction
from jax_seqgcn.loop import run
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
from jax_seqgcn.parallel import initialize_distributed
from jax_seqgcn.parallel import is_main_process
from jax_seqgcn.parallel import make_mesh
from jax_seqgcn.samplers import uncertain_gcn_select
from jax_seqgcn.train import TrainState
from jax_seqgcn.train import evaluate
from jax_seqgcn.train import extract_embeddings
from jax_seqgcn.train import forward_pool
from jax_seqgcn.train import fit
from jax_seqgcn.train import predict
from jax_seqgcn.train import text_progress

__version__ = "0.1.0"
