"""One selection round on own data: what `jax-seqgcn select` runs (protocol §1, Phase V by hand).

* `select_features_file`: learner embeddings already computed (FEATURES [N, D]) and a labels CSV
  whose ids are row indices; runs a sampler that needs only features on all N rows.
* `select_image_folder`: a folder of PNG/JPEG images and a labels CSV whose ids are paths
  relative to it; trains the learner on the labelled images with the experiment loop's own code
  (`experiment.cycle`: same training, same eval pass, same sampler call), embeds every image and runs
  the sampler on all of them. Only the labelled images are held; the eval pass decodes the
  folder in batches and keeps what the sampler needs (docs/streamed_pools.md).

Deliberate choices:

* Candidates: the whole unlabelled set (`al.whole_pool`), not a random subset as in the paper's
  protocol; with own data the pool is what the user has, and each pick should be the best of it.
* No test split: every labelled example trains the learner; nothing is held out or scored.
* Keys: FEATURES: the sampler's key is `jax.random.key(seed)` (so calling the sampler directly
  with that key gives the same picks); images: `train_key, sampler_key = split(key(seed))`.
* Nodes (images): the unlabelled images first, then the labelled ones, as the loop orders them.
* The `score` column (`PICK_SCORES`) is written where the sampler ranks by a per-node number:
  Entropy (entropy, nats), Margin (top-1 minus top-2 probability), LeastConfidence (top-1
  probability), LearningLoss (predicted loss), UncertainGCN and UncertainDiscriminator (the
  discriminator's score in (0, 1), "looks labelled"; picked closest to s_margin first; recomputed
  with the sampler's key, which trains the GCN a second time). Random, CoreSet, CoreGCN,
  FeatProp and BADGE pick sets (random, k-center, k-medoids, k-means++), and VAAL keeps its
  discriminator's scores inside the sampler: no column.
* Outputs are written only after every check and the whole computation succeeded, each locked
  for the run and written atomically (`apps.outputs`): PICKS.csv, and for the images form a
  workdir (default PICKS.workdir next to PICKS.csv) with `config.json` (resolved config),
  `select.json` (class names, image ids in index order, labelled and picked ids, scores,
  seconds), `picks.csv`, `checkpoints/` (the trained learner, orbax) and `MANIFEST` (every file
  and folder select wrote there); `load_learner(workdir)` reads it back. An existing output is
  refused unless `force`, and `force` replaces a workdir only if everything in it is listed in
  its manifest.
* Sanity bounds (`check_seed`, the sampler's own option checks, the batch size): a seed
  outside [0, 2**32) and absurd sampler option values (bounded by the registry, e.g. steps <=
  10**6) are refused up front; a batch size larger than the labelled set is lowered to it
  (said once on the progress stream).
"""

import csv
import io
import json
import os
import shutil
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

import jax
import ml_collections
import numpy as np

from jax_seqgcn import models
from jax_seqgcn import samplers
from jax_seqgcn.apps import outputs
from jax_seqgcn.apps.outputs import load_learner  # pylint: disable=unused-import (public here)
from jax_seqgcn.data import datasets as data_lib
from jax_seqgcn.data import folder
from jax_seqgcn.data import stream as stream_lib
from jax_seqgcn.data.folder import InputError
from jax_seqgcn.experiment import cycle
from jax_seqgcn.experiment import embeddings
from jax_seqgcn.experiment import loop
from jax_seqgcn.experiment import workdir as workdir_lib
from jax_seqgcn.samplers import uncertainty
from jax_seqgcn.selection import graph
from jax_seqgcn.training import parallel

# The learner's settings for own data: the CPU-scale protocol's (protocol §9).
IMAGE_DEFAULTS = dict(learner="small_cnn", epochs=15, batch_size=64, learning_rate=0.05)
# Pool fields only a trained learner gives.
_LEARNER_FIELDS = ("probabilities", "predicted_losses", "images")
# Part of the select API, kept where it always was: see `outputs`.
MANIFEST = outputs.MANIFEST
output_lock = outputs.output_lock
default_workdir = outputs.default_workdir
# Seeds are 32-bit: jax.random.key folds wider ones (-1, 2**32 - 1 and 2**64 - 1 gave one key).
SEED_RANGE = 2 ** 32


def _gcn_scores(architecture):
  def scores(key, pool, options):
    gcn_options = {k: options[k] for k in graph.GCN_DEFAULTS if k in options}
    return graph.train_gcn(key, pool.features, pool.labelled_mask, architecture=architecture,
                           **gcn_options).scores
  return scores


# Sampler name -> (what the score column holds, `fn(key, pool, options) -> [N]` per node).
PICK_SCORES: Dict[str, Tuple[str, Callable[..., Any]]] = {
    "Entropy": ("predictive entropy in nats (largest first)",
                lambda key, pool, options: uncertainty.entropy_scores(pool.probabilities)),
    "Margin": ("top-1 minus top-2 class probability (smallest first)",
               lambda key, pool, options: uncertainty.margin_scores(pool.probabilities)),
    "LeastConfidence": ("top-1 class probability (smallest first)",
                        lambda key, pool, options: uncertainty.confidence_scores(
                            pool.probabilities)),
    "LearningLoss": ("predicted loss (largest first)",
                     lambda key, pool, options: pool.predicted_losses),
    "UncertainGCN": ("GCN score in (0, 1), how labelled a node looks (closest to s_margin "
                     "first)", _gcn_scores("gcn")),
    "UncertainDiscriminator": ("discriminator score in (0, 1), how labelled a node looks "
                               "(closest to s_margin first)", _gcn_scores("mlp")),
}


class Picks(NamedTuple):
  """The result of one selection round.

  Attributes:
    ids: [K] picked ids in rank order (row indices as strings, or relative image paths).
    scores: [K] float64 per-pick scores, or None for samplers without one (`PICK_SCORES`).
    score_meaning: what the scores are, or None.
  """
  ids: List[str]
  scores: Optional[np.ndarray]
  score_meaning: Optional[str]


def _say(stream, message: str) -> None:
  print(message, file=stream or sys.stdout, flush=True)


def resolve_sampler(name: str, options: Optional[Mapping[str, Any]] = None):
  """(sampler, options over its registry defaults), checked by the sampler's own checks.

  The registry's checks (`Sampler.check`) hold the bounds too (e.g. steps <= 10**6, hidden <=
  65536, VAAL's sizes), so select refuses what the library and experiments/main.py refuse, with
  the same words.

  Raises:
    InputError: an unknown sampler, an option it does not take, a bad or out-of-range value.
  """
  try:
    sampler = samplers.get_sampler(name)
  except ValueError as err:
    raise InputError(str(err)) from None
  try:
    resolved = sampler.resolve_options(dict(options or {}))
  except ValueError as err:  # as experiment.config words it: which sampler refused
    raise InputError(f"sampler {sampler.name}: {err}") from None
  return sampler, resolved


def check_seed(seed) -> None:
  """InputError unless `seed` is an int in [0, 2**32) (wider seeds wrap: -1 == 2**32 - 1)."""
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not (
      0 <= seed < SEED_RANGE):
    raise InputError(f"the seed must be an integer in [0, {SEED_RANGE - 1}] (32 bits), got "
                     f"{seed!r}")


def sample(sampler, key: jax.Array, pool: samplers.Pool, budget: int,
           options: Mapping[str, Any]) -> Tuple[np.ndarray, Optional[np.ndarray]]:
  """Runs `sampler` on `pool`, its nodes split over every device when there are several
  (`samplers.on_mesh`); returns ([K] int64 node picks, [K] scores or None)."""
  mesh = parallel.make_mesh() if jax.device_count() > 1 else None
  try:
    with samplers.on_mesh(mesh):
      picks = np.asarray(sampler(key, pool, budget, **options), np.int64)
  except ValueError as err:  # the pool's own checks (e.g. GCN needs a labelled node)
    raise InputError(f"sampler {sampler.name}: {err}") from None
  if sampler.name not in PICK_SCORES:
    return picks, None
  scores = np.asarray(PICK_SCORES[sampler.name][1](key, pool, options), np.float64)
  return picks, scores[picks]


def check_budget(budget, num_unlabelled: int, where: str) -> None:
  """InputError unless 1 <= budget <= num_unlabelled (`where` says what was counted)."""
  if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
    raise InputError(f"the budget must be a positive integer, got {budget!r}")
  if budget > num_unlabelled:
    raise InputError(f"the budget {budget} is larger than the {num_unlabelled} unlabelled "
                     f"examples ({where})")


def picks_csv_text(picks: Picks) -> str:
  """The PICKS.csv text: header `rank,id[,score]`, one row per pick, rank from 1."""
  text = io.StringIO()
  writer = csv.writer(text, lineterminator="\n")
  writer.writerow(["rank", "id"] + ([] if picks.scores is None else ["score"]))
  for rank, id_ in enumerate(picks.ids, 1):
    writer.writerow([rank, id_] + ([] if picks.scores is None
                                   else [f"{picks.scores[rank - 1]:.7g}"]))
  return text.getvalue()


def select_features_file(features_path, labels_path, budget: int, sampler_name: str, out, *,
                         options: Optional[Mapping[str, Any]] = None, seed: int = 0,
                         force: bool = False, stream=None) -> Picks:
  """Picks `budget` unlabelled rows of FEATURES and writes them to `out` (PICKS.csv).

  Args:
    features_path: `.npy` [N, D] (or `.npz` with `features`).
    labels_path: CSV `id,label`, ids being row indices in [0, N).
    budget: number of picks K.
    sampler_name: a sampler that needs only features (or nothing): Random, CoreSet,
      UncertainGCN, CoreGCN, UncertainDiscriminator, FeatProp.
    out: the PICKS.csv to write.
    options: sampler options over the registry defaults.
    seed: in [0, 2**32); the sampler's key is `jax.random.key(seed)`.
    force: replace an existing `out`.
    stream: progress output (None: stdout).
  Returns:
    `Picks` with row indices as ids.
  Raises:
    InputError: any bad input, before the sampler runs; another select writing `out`; an
      output folder that cannot be written; nothing is written.
  """
  check_seed(seed)
  out, _ = outputs.check_outputs(out, None, labels_path, force)
  sampler, options = resolve_sampler(sampler_name, options)
  needs_learner = sorted(sampler.needs & set(_LEARNER_FIELDS))
  if needs_learner:
    usable = [s.name for s in samplers.SAMPLERS.values() if not s.needs & set(_LEARNER_FIELDS)]
    raise InputError(f"sampler {sampler.name} needs {' and '.join(needs_learner)}, which a "
                     "features file does not give: pass --images DIR (trains a learner on the "
                     "labelled images and computes them), or use a sampler that needs only "
                     f"features ({', '.join(usable)})")
  with outputs.output_lock(out, "--out"):
    outputs.check_outputs(out, None, labels_path, force)  # again, holding the output
    features = folder.load_features(features_path)
    labels = folder.read_labels(labels_path)
    labelled = folder.row_indices(labels, len(features))
    mask = np.zeros(len(features), bool)
    mask[labelled] = True
    check_budget(budget, int((~mask).sum()), f"{len(features)} rows in {features_path}, "
                 f"{len(labelled)} labelled in {labels_path}")
    outputs.remove_leftovers(out, stream)
    _say(stream, f"sampling: {sampler.name} on {len(features)} rows "
                 f"({len(features) - len(labelled)} unlabelled), {budget} picks")
    start = time.perf_counter()
    pool = samplers.Pool(mask, **({"features": features} if "features" in sampler.needs else {}))
    picks, scores = sample(sampler, jax.random.key(seed), pool, budget, options)
    result = Picks([str(i) for i in picks], scores, PICK_SCORES.get(sampler.name, (None,))[0])
    outputs.write_atomically(out, picks_csv_text(result))
  _say(stream, f"sampling: done in {time.perf_counter() - start:.1f} s; wrote {out}")
  return result


def images_config(*, sampler_name: str, options: Mapping[str, Any], learner: str, epochs: int,
                  batch_size: int, learning_rate: float, seed: int, budget: int,
                  num_labelled: int, num_unlabelled: int, images_dir: str, labels_path: str,
                  image_size: Optional[int]) -> ml_collections.ConfigDict:
  """The loop config of one selection round on an image folder (see configs/default.py).

  One trial, one cycle, the whole unlabelled set as candidates, no test split; SGD with
  momentum 0.9, weight decay 5e-4 and the learning rate x0.1 at 80% of the epochs (as the
  CPU-scale protocol's 12 of 15 and the paper's 160 of 200).
  """
  config = ml_collections.ConfigDict()
  config.seed = seed
  config.data = ml_collections.ConfigDict(dict(
      name="folder", source="auto", data_dir=None, path=str(images_dir), max_test=0,
      labels=str(labels_path), image_size=image_size))
  config.learner = ml_collections.ConfigDict(dict(name=learner, task="classification"))
  config.train = ml_collections.ConfigDict(dict(
      epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, momentum=0.9,
      weight_decay=5e-4, milestones=(int(round(0.8 * epochs)),), gamma=0.1,
      eval_batch_size=256))
  config.al = ml_collections.ConfigDict(dict(
      trials=1, cycles=1, initial=num_labelled, budget=budget, subset=num_unlabelled,
      whole_pool=True, upper_bound=False))
  config.sampler = ml_collections.ConfigDict(
      {**samplers.all_options(), **options, "name": sampler_name})
  return config


def _learner_tree(state) -> Dict[str, Any]:
  tree = {"params": state.params}
  if state.batch_stats:
    tree["batch_stats"] = state.batch_stats
  if state.loss_net_params is not None:
    tree["loss_net_params"] = state.loss_net_params
  return jax.device_get(tree)


def select_image_folder(images_dir, labels_path, budget: int, sampler_name: str, out, *,
                        learner: str = IMAGE_DEFAULTS["learner"],
                        epochs: int = IMAGE_DEFAULTS["epochs"],
                        batch_size: int = IMAGE_DEFAULTS["batch_size"],
                        learning_rate: float = IMAGE_DEFAULTS["learning_rate"],
                        image_size: Optional[int] = None,
                        options: Optional[Mapping[str, Any]] = None, seed: int = 0,
                        workdir=None, force: bool = False, stream=None) -> Picks:
  """Trains the learner on the labelled images, then picks `budget` unlabelled images.

  Args:
    images_dir: folder of PNG/JPEG files (any depth; see `folder`).
    labels_path: CSV `id,label`, ids being paths relative to `images_dir`, labels class names
      (classes are the sorted distinct names; at least two).
    budget: number of picks K.
    sampler_name: any registered sampler.
    out: the PICKS.csv to write (ids: relative paths).
    learner: "small_cnn", "resnet18" or "vgg11".
    epochs, batch_size, learning_rate: the learner's training (see `images_config`); a batch
      size above the labelled count is lowered to it (said on `stream`).
    image_size: None (one size for all images) or S: resize every image to S x S.
    options: sampler options over the registry defaults.
    seed: in [0, 2**32); `train_key, sampler_key = jax.random.split(jax.random.key(seed))`.
    workdir: where the trained learner and the round's record go; None:
      `default_workdir(out)`.
    force: replace an existing `out` and workdir.
    stream: progress output (None: stdout).
  Returns:
    `Picks` with relative image paths as ids.
  Raises:
    InputError: any bad input, before training (but an unlabelled image whose header reads
      and whose pixel data does not: in the eval pass); another select writing `out` or the
      workdir; an output folder that cannot be written; nothing is written.
    loop.RunError: the learner diverged; nothing is written.
  """
  check_seed(seed)
  workdir = outputs.default_workdir(out) if workdir is None else workdir
  out, workdir = outputs.check_outputs(out, workdir, labels_path, force, images_dir)
  sampler, options = resolve_sampler(sampler_name, options)
  if learner not in models.LEARNERS or learner == "deepprior":
    raise InputError(f"unknown learner {learner!r}; valid: small_cnn, resnet18, vgg11")
  with outputs.output_lock(out, "--out"), outputs.output_lock(workdir, "--workdir"):
    # Again, holding both outputs: nobody else can create or replace them from here on.
    outputs.check_outputs(out, workdir, labels_path, force, images_dir)
    labels = folder.read_labels(labels_path)
    ids = folder.list_images(images_dir, exclude=(labels_path, out, workdir))
    _say(stream, f"reading {len(ids)} image files under {images_dir}")
    start = time.perf_counter()
    shape = stream_lib.scan_images(
        images_dir, ids, image_size=image_size,
        progress=lambda done, total: _say(stream, f"reading images: {done}/{total} (headers)"))
    labelled = folder.image_indices(labels, ids, directory=images_dir)
    class_names, targets = folder.classes(labels)
    unlabelled = np.setdiff1d(np.arange(len(ids)), labelled)
    check_budget(budget, len(unlabelled), f"{len(ids)} images in {images_dir}, "
                 f"{len(labelled)} labelled in {labels_path}")
    batch_size = _capped_batch_size(batch_size, len(labelled), stream)
    config = images_config(
        sampler_name=sampler.name, options=options, learner=learner, epochs=epochs,
        batch_size=batch_size, learning_rate=learning_rate, seed=seed, budget=budget,
        num_labelled=len(labelled), num_unlabelled=len(unlabelled), images_dir=images_dir,
        labels_path=labels_path, image_size=image_size)
    try:
      loop.validate_config(config, pool_size=len(ids), in_memory=True)
      models.check_input_shape(learner, shape)
    except ValueError as err:
      raise InputError(str(err)) from None
    # Only the labelled images are decoded now; the pool is read in batches when embedded.
    images = stream_lib.decode_images(images_dir, [ids[i] for i in labelled], shape,
                                      image_size=image_size)
    read_s = time.perf_counter() - start
    dataset = data_lib.Dataset(images, targets, images[:0], targets[:0], len(class_names), "folder")
    _say(stream, f"data: {len(ids)} images {'x'.join(map(str, shape))}, "
                 f"{len(labelled)} labelled ({len(class_names)} classes), {len(unlabelled)} "
                 "unlabelled")
    outputs.remove_leftovers(workdir, stream)
    outputs.remove_leftovers(out, stream)
    staging = workdir.with_name(f".{workdir.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
      result, seconds = _train_and_sample(config, staging, dataset, labelled, unlabelled, ids,
                                          stream)
      record = dict(classes=class_names, image_shape=list(shape), ids=ids,
                    labelled=[ids[i] for i in labelled], picks=result.ids,
                    scores=None if result.scores is None else result.scores.tolist(),
                    score=result.score_meaning, seconds=dict(read=read_s, **seconds))
      (staging / "select.json").write_text(json.dumps(record, indent=1) + "\n")
      (staging / "picks.csv").write_text(picks_csv_text(result))
      workdir_lib.write_config(staging, workdir_lib.config_to_dict(config))
      outputs.write_manifest(staging)
      outputs.replace_folder(staging, workdir)
    finally:
      shutil.rmtree(staging, ignore_errors=True)
    outputs.write_atomically(out, picks_csv_text(result))
  _say(stream, f"wrote {out} ({budget} picks) and {workdir}")
  return result


def _capped_batch_size(batch_size: int, num_labelled: int, stream) -> int:
  """`batch_size`, or the labelled count (rounded up to the devices) where that is smaller.

  The training pads the labelled set up to whole batches, so a batch far above it costs memory
  for nothing (a batch of 10**6 ran out of memory); one batch of every labelled image is the
  same epoch.
  """
  devices = jax.device_count()
  cap = -(-num_labelled // devices) * devices
  if isinstance(batch_size, (int, np.integer)) and not isinstance(batch_size, bool) and (
      batch_size > cap):
    _say(stream, f"batch size {batch_size} is larger than the {num_labelled} labelled images: "
                 f"training with batch size {cap}")
    return cap
  return batch_size


def _train_and_sample(config, staging, dataset, labelled, unlabelled, ids, stream):
  """The loop's training, eval pass and sampler call (`experiment.cycle`); (Picks, seconds).

  `dataset`: the labelled images only; the eval pass reads the folder in batches
  (`embeddings.folder_pool`) into arrays, memory-mapped under `staging` where large."""
  setup = loop.make_setup(config, dataset)
  train_key, sampler_key = jax.random.split(jax.random.key(config.seed))
  start = time.perf_counter()
  state = cycle.train_learner(setup, train_key, dataset.train_images, dataset.train_targets,
                              progress=loop.progress_callback(config, "train ",
                                                              stream=stream or sys.stdout))
  train_s = time.perf_counter() - start
  start = time.perf_counter()
  nodes = np.concatenate([unlabelled, labelled])  # the loop's order: candidates first
  with stream_lib.ArrayStore(staging) as arrays:  # its memory-mapped files go on leaving
    pool = embeddings.folder_pool(
        setup, state, config.data.path, [ids[i] for i in nodes], dataset.train_images.shape[1:],
        np.arange(len(nodes)) >= len(unlabelled), image_size=config.data.image_size,
        allocate=arrays.allocate, stream=stream or sys.stdout)
    embed_s = time.perf_counter() - start
    _say(stream, f"sampling: {setup.sampler.name} on {len(nodes)} images ({len(unlabelled)} "
                 f"unlabelled), {config.al.budget} picks")
    start = time.perf_counter()
    picks, scores = sample(setup.sampler, sampler_key, pool, config.al.budget, setup.options)
    del pool
  sample_s = time.perf_counter() - start
  _say(stream, f"sampling: done in {sample_s:.1f} s")
  store = workdir_lib.CheckpointStore(staging / "checkpoints")
  try:
    store.save(0, {"learner": _learner_tree(state), "labelled": np.asarray(labelled, np.int64),
                   "config": workdir_lib.encode_config(workdir_lib.config_to_dict(config))})
  finally:
    store.close()
  result = Picks([ids[i] for i in nodes[picks]], scores,
                 PICK_SCORES.get(setup.sampler.name, (None,))[0])
  return result, dict(train=train_s, embed=embed_s, sample=sample_s)
