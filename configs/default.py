"""Default experiment config: the paper's CIFAR-10 protocol (protocol §1-§3).

Override on the command line, e.g. `--config.sampler.name=CoreGCN --config.al.trials=3`.
"""

import ml_collections

from jax_seqgcn import samplers


def get_config():
  """Returns the default ConfigDict; every field is documented inline."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # trial t's key is fold_in(key(seed), t)

  config.data = ml_collections.ConfigDict()
  config.data.name = "cifar10"  # cifar10 | cifar100 | svhn_cropped | fashion_mnist | npz
  config.data.source = "auto"  # auto | tfds | idx | npz (see jax_seqgcn.data.datasets.load_dataset)
  config.data.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data_dir
  config.data.path = ml_collections.config_dict.placeholder(str)  # npz file / IDX directory
  config.data.max_test = 0  # evaluate on the first max_test test examples (0 = all)

  config.learner = ml_collections.ConfigDict()
  config.learner.name = "resnet18"  # resnet18 | vgg11 | deepprior | small_cnn
  config.learner.task = "classification"  # classification | regression
  # Dropout rate before the classifier head, in training and in BALD's MC passes (0: none).
  # BALD and PowerBALD need it > 0; it changes the learner, so it is part of the run.
  config.learner.mc_dropout = 0.0

  config.train = ml_collections.ConfigDict()  # protocol §2
  config.train.epochs = 200
  config.train.batch_size = 128
  config.train.learning_rate = 0.1
  config.train.momentum = 0.9
  config.train.weight_decay = 5e-4  # coupled L2 (torch SGD weight_decay)
  config.train.milestones = (160,)  # epochs at which lr *= gamma
  config.train.gamma = 0.1
  config.train.eval_batch_size = 256  # test and embedding extraction batches
  # "float32" or "bfloat16" (activations/convolutions; parameters, optimiser state,
  # BatchNorm statistics and the loss stay float32). bfloat16 is for GPUs/TPUs: slower on CPU.
  config.train.compute_dtype = "float32"
  # Save the learner's train state every this many epochs (and after a cycle's last epoch) in
  # workdir/checkpoints_epoch/, so a killed run resumes inside the cycle; 0 = only at cycle ends.
  # Costs docs/performance.md#epoch-checkpoints. SIGTERM saves at the next epoch in any case.
  config.train.checkpoint_every = 10

  config.al = ml_collections.ConfigDict()  # protocol §1
  config.al.trials = 5
  config.al.cycles = 10
  config.al.initial = 1000  # random labelled set of cycle 0
  config.al.budget = 1000  # picks per cycle
  config.al.subset = 10000  # random unlabelled candidates per cycle
  config.al.whole_pool = False  # sample from the whole unlabelled pool instead of a subset
  config.al.upper_bound = False  # train once on the whole training split
  # Save, per trial and selection cycle, what the sampler saw: learner embeddings (float16) of the
  # subset and labelled set, the labelled mask and the picks, in
  # embeddings/trial{t}_cycle{c}.npz (c as in results.jsonl; see jax_seqgcn/experiment/
  # embeddings.py). For `jax-seqgcn tsne` / experiments/tsne.py. Costs disk (docs/own_data.md
  # gives the measured file sizes) and, for samplers that need no embedding (Random, VAAL, ...),
  # one extra eval pass.
  config.al.save_embeddings = False

  # The sampler and the options of every registered sampler, defaults from the registry
  # (jax_seqgcn/samplers: each sampler declares its options). A sampler reads only its own.
  config.sampler = ml_collections.ConfigDict(samplers.all_options())
  config.sampler.name = "UncertainGCN"  # see jax_seqgcn.samplers.SAMPLERS for the names
  # GCN samplers (UncertainGCN, CoreGCN, UncertainDiscriminator): hidden, dropout_rate,
  # num_layers (1/2/3), lambda_, s_margin, steps, learning_rate, weight_decay, adjacency
  # (auto | dense | factored | identity | ones; the last two are the Eye/Ones ablations).
  return config
