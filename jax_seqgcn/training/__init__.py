"""Learner training: train state, `fit`, eval-mode passes, progress, preprocessing, meshes.

Modules, each importing only `models` and the modules above it in this list:

* `precision`: the compute dtype (`compute_dtype="bfloat16"`) and its casts.
* `parallel`: the data mesh, shardings and multi-host helpers.
* `augment`: per-dataset preprocessing and augmentation (`PreprocessSpec`, `preprocess`).
* `loss_prediction`: Learning Loss's LossNet trained jointly with the learner.
* `state`: optimisers, learning-rate schedule, `TrainState`, `init_train_state`.
* `fit`: the loss, the jitted step and epoch, and `fit`.
* `inference`: `predict`, `extract_embeddings`, `forward_pool`, `evaluate`.
* `mc_dropout`: `mc_dropout_probabilities`, the T stochastic predictions of BALD.
* `progress`: `text_progress`, a console `progress` callback for `fit`.
"""

from jax_seqgcn.training.augment import PREPROCESSING
from jax_seqgcn.training.augment import PreprocessSpec
from jax_seqgcn.training.augment import preprocess
from jax_seqgcn.training.augment import preprocessing_for
from jax_seqgcn.training.fit import epoch_order
from jax_seqgcn.training.fit import fit
from jax_seqgcn.training.fit import make_train_step
from jax_seqgcn.training.fit import padded_capacity
from jax_seqgcn.training.fit import per_example_loss
from jax_seqgcn.training.inference import evaluate
from jax_seqgcn.training.inference import extract_embeddings
from jax_seqgcn.training.inference import forward_pool
from jax_seqgcn.training.inference import predict
from jax_seqgcn.training.mc_dropout import mc_dropout_probabilities
from jax_seqgcn.training.parallel import initialize_distributed
from jax_seqgcn.training.parallel import is_main_process
from jax_seqgcn.training.parallel import make_mesh
from jax_seqgcn.training.progress import text_progress
from jax_seqgcn.training.state import DEFAULTS
from jax_seqgcn.training.state import TRACE_COUNTS
from jax_seqgcn.training.state import TASKS
from jax_seqgcn.training.state import LossPrediction
from jax_seqgcn.training.state import TrainState
from jax_seqgcn.training.state import init_train_state
from jax_seqgcn.training.state import learning_rate_at_epoch
from jax_seqgcn.training.state import make_optimizer
from jax_seqgcn.training.state import set_learning_rate
