"""Cost of epoch checkpoints (`config.train.checkpoint_every`); prints JSON.

Times `training.fit` of configs/fashion_mnist_cpu.py's learner (small CNN, batch 64, 15 epochs)
on the first labelled-set sizes of real Fashion-MNIST (`--sizes`), with the loop's own
epoch-checkpoint callback (`experiment.preemption`) saving every E epochs (E = 0: none, the old
behaviour), each case `--repeats` times, alternating, after one warm-up fit that compiles; like
the loop, a `progress` callback fetches each epoch's metrics (so the callback's time is the
save's, not the wait for the epoch). Reported: the medians of the fit's wall time, its process
CPU time (background writes included) and the time `fit` waited in the callback (also per
save), and the overheads against E = 0. Then the ResNet-18 train state (the paper's learner)
saved as one epoch checkpoint: the time `fit` waits (host copy, checksum, orbax's blocking
part) and the whole background write. docs/performance.md#epoch-checkpoints has the numbers.

  python experiments/bench_epoch_checkpoints.py [--sizes 500,3000] [--every 0,1,10]
      [--repeats 3]
"""

import argparse
import json
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import fashion_mnist_cpu  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax_seqgcn import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax_seqgcn import training  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax_seqgcn.data import datasets  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax_seqgcn.experiment import loop  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax_seqgcn.experiment import preemption  # pylint: disable=wrong-import-position


def _saves(every: int, epochs: int) -> int:
  return 0 if not every else len({e for e in range(1, epochs + 1) if e % every == 0 or e == epochs})


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--every", default="0,1,10")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--sizes", default="500,3000")
  args = parser.parse_args()
  config = fashion_mnist_cpu.get_config()
  dataset = datasets.load_dataset(config.data.name, source=config.data.source)
  setup = loop.make_setup(config, dataset)
  rows = []
  for size in map(int, args.sizes.split(",")):
    images, targets = dataset.train_images[:size], dataset.train_targets[:size]
    training.fit(jax.random.key(0), setup.model, images, targets, task=setup.task,
                 preprocessing=setup.preprocessing, mesh=setup.mesh, **setup.fit_kwargs)
    times = {}
    for _ in range(args.repeats):
      for every in map(int, args.every.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
          checkpoints = preemption.EpochCheckpoints(pathlib.Path(tmp), every, config.train.epochs)
          save = checkpoints.fit_kwargs(0, 0, np.arange(size))["on_epoch_end"]
          waited = [0.0]

          def on_epoch_end(epoch, state, save=save, waited=waited):
            start = time.perf_counter()
            save(epoch, state)
            waited[0] += time.perf_counter() - start

          start, cpu = time.perf_counter(), time.process_time()
          state = training.fit(jax.random.key(0), setup.model, images, targets, task=setup.task,
                               preprocessing=setup.preprocessing, mesh=setup.mesh,
                               on_epoch_end=on_epoch_end, progress=lambda *_: None,
                               **setup.fit_kwargs)
          jax.block_until_ready(state)
          wall = time.perf_counter() - start
          checkpoints.close()  # the last background write, counted in the CPU time
          cpu = time.process_time() - cpu
          for name, value in (("wall", wall), ("cpu", cpu), ("waited", waited[0])):
            times.setdefault(every, {}).setdefault(name, []).append(value)
    base = {k: float(np.median(v)) for k, v in times[0].items()} if 0 in times else None
    for every, measured in times.items():
      median = {k: float(np.median(v)) for k, v in measured.items()}
      rows.append(dict(
          labelled=size, checkpoint_every=every, epochs=config.train.epochs, median_s=median,
          all_s=measured,
          waited_pct_of_wall=100 * median["waited"] / median["wall"],
          waited_per_save_s=median["waited"] / max(1, _saves(every, config.train.epochs)),
          cpu_overhead_pct=None if base is None else 100 * (median["cpu"] / base["cpu"] - 1),
          wall_overhead_pct=None if base is None else 100 * (median["wall"] / base["wall"] - 1)))
      print(json.dumps(rows[-1]), flush=True)
  resnet = models.get_learner("resnet18", num_classes=10, channels=3)
  state = training.init_train_state(jax.random.key(0), resnet, (32, 32, 3))
  with tempfile.TemporaryDirectory() as tmp:
    checkpoints = preemption.EpochCheckpoints(pathlib.Path(tmp), 1, 200)
    save = checkpoints.fit_kwargs(0, 0, np.arange(1000))["on_epoch_end"]
    blocking, total = [], []
    for epoch in range(1, 4):
      start = time.perf_counter()
      save(epoch, state)
      blocking.append(time.perf_counter() - start)
      checkpoints.store.manager.wait_until_finished()
      total.append(time.perf_counter() - start)
    checkpoints.close()
  size_mb = sum(x.nbytes for x in jax.tree.leaves(state)) / 1e6
  print(json.dumps(dict(learner="resnet18", state_mb=size_mb, blocking_s=blocking,
                        total_s=total)), flush=True)


if __name__ == "__main__":
  main()
