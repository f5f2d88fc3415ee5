"""The public I/O-free cycle: driven by hand it reproduces the loop's cycles; samplers' training."""

import jax
import numpy as np
import pytest

import jax_seqgcn
from jax_seqgcn.experiment import cycle
from jax_seqgcn.experiment import loop
from tests.conftest import labelled_sets
from tests.conftest import tiny_config


def _setup(sampler, **options):
  model = jax_seqgcn.get_learner("small_cnn", num_classes=10, channels=1)
  return jax_seqgcn.make_setup(model=model, sampler=sampler, preprocessing="fashion_mnist",
                               options=options,
                               fit_kwargs=dict(epochs=1, batch_size=32, learning_rate=0.05,
                                               milestones=()),
                               eval_batch_size=100)


def test_cycle_by_hand_equals_the_loops_first_cycle(tmp_path, npz_path):
  config = tiny_config(npz_path, sampler__name="CoreSet", al__cycles=2)
  records = loop.run(config, tmp_path)
  first, second = labelled_sets(tmp_path)
  dataset = jax_seqgcn.load_dataset("npz", source="npz", path=npz_path)
  setup = loop.make_setup(config, dataset)
  # The loop's keys: trial t, cycle c -> fold_in(fold_in(key(seed), t), c + 1).
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 0), 1)
  result = jax_seqgcn.run_cycle(setup, key, dataset, first, budget=config.al.budget,
                                subset=config.al.subset)
  assert result.metric == records[0].metric
  np.testing.assert_array_equal(result.next_labelled, second)
  selection = result.selection
  assert len(selection.nodes) == config.al.subset + len(first)
  np.testing.assert_array_equal(selection.nodes[selection.pool.labelled_mask], first)
  np.testing.assert_array_equal(selection.nodes[selection.picks], second[len(first):])


def test_last_cycle_selects_nothing(npz_path):
  dataset = jax_seqgcn.load_dataset("npz", source="npz", path=npz_path)
  result = jax_seqgcn.run_cycle(_setup("Random"), jax.random.key(0), dataset, np.arange(40),
                           budget=None)
  assert result.selection is None and result.next_labelled is None
  assert 0.0 <= result.metric <= 1.0 and result.train_s > 0


def test_random_builds_no_pool_fields_and_whole_pool_offers_everything(npz_path):
  dataset = jax_seqgcn.load_dataset("npz", source="npz", path=npz_path)
  setup = _setup("Random")
  labelled = np.arange(0, 300, 3)
  state = cycle.train_learner(setup, jax.random.key(1), dataset.train_images[labelled],
                              dataset.train_targets[labelled])
  selection = cycle.select(setup, jax.random.key(2), state, dataset.train_images, labelled,
                           budget=7)
  assert selection.pool.features is None and selection.pool.probabilities is None
  np.testing.assert_array_equal(np.sort(selection.nodes), np.arange(300))
  assert len(set(selection.next_labelled.tolist())) == len(labelled) + 7


def test_candidates_draws_a_subset_of_the_unlabelled():
  labelled = np.array([0, 5, 9])
  everything = cycle.candidates(jax.random.key(0), labelled, 12)
  np.testing.assert_array_equal(everything, [1, 2, 3, 4, 6, 7, 8, 10, 11])
  subset = cycle.candidates(jax.random.key(0), labelled, 12, subset=4)
  assert len(set(subset.tolist())) == 4 and set(subset.tolist()) <= set(everything.tolist())
  np.testing.assert_array_equal(cycle.candidates(jax.random.key(0), labelled, 12, subset=50),
                                everything)


def test_samplers_declare_what_the_learners_training_adds():
  lloss = jax_seqgcn.get_sampler("LearningLoss")
  extra = lloss.training_kwargs(lloss.resolve_options({"lossnet_weight": 0.5}), 200)
  assert extra == {"loss_prediction": jax_seqgcn.LossPrediction(weight=0.5, margin=1.0,
                                                                detach_epoch=120)}
  for name, sampler in jax_seqgcn.SAMPLERS.items():
    if name != "LearningLoss":
      assert sampler.training_kwargs(sampler.options, 200) == {}, name
  setup = _setup("LearningLoss")
  assert setup.fit_kwargs["loss_prediction"].detach_epoch == 1  # 0.6 of 1 epoch, rounded half up


def test_make_setup_refuses_bad_input_before_any_work():
  model = jax_seqgcn.get_learner("small_cnn", num_classes=10, channels=1)
  with pytest.raises(ValueError, match="unknown sampler 'Nope'"):
    jax_seqgcn.make_setup(model=model, sampler="Nope")
  with pytest.raises(ValueError, match="task must be one of"):
    jax_seqgcn.make_setup(model=model, sampler="Random", task="ranking")
  with pytest.raises(ValueError, match="unknown option"):
    jax_seqgcn.make_setup(model=model, sampler="CoreSet", options={"hops": 2})
  with pytest.raises(ValueError, match="compute_dtype"):
    jax_seqgcn.make_setup(model=model, sampler="Random", fit_kwargs={"compute_dtype": "float16"})
