"""Peak memory of the loop's npz source, memory-mapped against read whole; prints JSON.

Writes an `.npz` of N synthetic 64x64 RGB uint8 images (default 80,000: 938 MiB of pixels) and
their int labels (10 classes) with `np.savez`'s layout (stored members, written in chunks so
that this process never holds the images), then runs, once per mode and repeat, a child process
that does what a cycle of the experiment loop does with it:

  1. `data.load_npz(path)` (the loop's default split: 20% test, seed 0);
  2. trains small_cnn for `--epochs` epochs on `--labelled` random training images
     (`cycle.train_learner`: the labelled rows are gathered);
  3. the test pass (`cycle.test_learner` over the test split);
  4. the pool's eval pass over the whole training split (`cycle.embed_pool` with CoreSet's
     needs: the embeddings [N, 128] float32).

Modes: `memmap` is `load_npz(path)` (the images memory-mapped, `data.stream.RowView` splits,
rows read per batch); `memory` is `load_npz(path, memmap=False)`, what the loader did before:
every array read, the split copied out of it.

Per run: `peak_rss_mib`, the child's peak resident set size (`os.wait4`'s `ru_maxrss`: its
anonymous memory plus the file pages it has mapped: Python, JAX's libraries, and the npz's
pages while mapped), as `experiments/bench_select_memory.py` measures; its peak so far after
each stage (`VmHWM`); its `RssAnon` / `RssFile` at the end; the seconds per stage; and a
checksum of the embeddings (equal in both modes). A child's `ru_maxrss` starts from the
parent's peak (Linux carries it over exec), so this process stays small: the npz is written by
another child, chunk by chunk. The runs go one after the other, the order
of the modes alternating per repeat; the npz is written once under `--root` (kept with
`--keep`, else removed at the end).

  python experiments/bench_npz_memory.py [--count 80000] [--repeats 1] [--epochs 1]
      [--root DIR] [--keep] [--out docs/bench_npz_memory.json]
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

from bench_select_memory import git_commit  # this folder: on sys.path when run as a script

REPO = pathlib.Path(__file__).resolve().parents[1]
IMAGE_SHAPE = (64, 64, 3)
NUM_CLASSES = 10
CHUNK = 4096  # images generated and written at a time


def write_npz(path: pathlib.Path, count: int, seed: int = 0) -> None:
  """`np.savez(path, images=..., targets=...)`'s file, written chunk by chunk."""
  rng = np.random.default_rng(seed)
  tints = rng.integers(0, 256, (NUM_CLASSES, 3))
  labels = np.arange(count) % NUM_CLASSES
  header = dict(descr=np.lib.format.dtype_to_descr(np.dtype(np.uint8)), fortran_order=False,
                shape=(count,) + IMAGE_SHAPE)
  partial = path.with_suffix(".partial")
  with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
    with archive.open("images.npy", "w", force_zip64=True) as member:
      np.lib.format.write_array_header_1_0(member, header)
      for start in range(0, count, CHUNK):
        stop = min(start + CHUNK, count)
        noise = rng.integers(0, 96, (stop - start,) + IMAGE_SHAPE, dtype=np.uint8)
        member.write((tints[labels[start:stop]][:, None, None, :] * 6 // 10 + noise)
                     .astype(np.uint8).tobytes())
    with archive.open("targets.npy", "w", force_zip64=True) as member:
      np.lib.format.write_array(member, labels)
  partial.rename(path)


def _status_mib(*fields) -> dict:
  values = {}
  with open("/proc/self/status") as f:
    for line in f:
      name, _, rest = line.partition(":")
      if name in fields:
        values[name] = round(int(rest.split()[0]) / 1024, 1)
  return values


def child(mode: str, path: str, labelled: int, epochs: int) -> None:
  """One run (see the module docstring); prints its JSON record."""
  # pylint: disable=import-outside-toplevel
  import jax
  from jax_seqgcn import models
  from jax_seqgcn.data import datasets
  from jax_seqgcn.experiment import cycle

  peak = lambda: _status_mib("VmHWM")["VmHWM"]
  stages, rss = {}, {"imports": peak()}
  start = time.perf_counter()
  dataset = datasets.load_npz(path, memmap=mode == "memmap")
  stages["load"], rss["load"] = time.perf_counter() - start, peak()
  setup = cycle.make_setup(
      model=models.get_learner("small_cnn", num_classes=dataset.num_classes,
                               channels=dataset.train_images.shape[-1]),
      sampler="CoreSet", preprocessing="npz",
      fit_kwargs=dict(epochs=epochs, batch_size=64, learning_rate=0.05), eval_batch_size=256)
  num_train = len(dataset.train_images)
  chosen = np.sort(np.random.default_rng(0).choice(num_train, labelled, replace=False))
  start = time.perf_counter()
  state = cycle.train_learner(setup, jax.random.key(0), dataset.train_images[chosen],
                              dataset.train_targets[chosen])
  stages["train"], rss["train"] = time.perf_counter() - start, peak()
  start = time.perf_counter()
  accuracy = cycle.test_learner(setup, state, dataset.test_images, dataset.test_targets)
  stages["test"], rss["test"] = time.perf_counter() - start, peak()
  start = time.perf_counter()
  nodes = np.concatenate([np.setdiff1d(np.arange(num_train), chosen), chosen])
  pool = cycle.embed_pool(setup, state, dataset.train_images, nodes,
                          np.arange(num_train) >= num_train - labelled)
  stages["embed"], rss["embed"] = time.perf_counter() - start, peak()
  print(json.dumps(dict(
      images_type=type(dataset.train_images).__name__, train=num_train,
      test=len(dataset.test_images), test_accuracy=round(accuracy, 4),
      embeddings_checksum=float(np.asarray(pool.features, np.float64).sum()),
      stages_s={k: round(v, 1) for k, v in stages.items()}, child_peak_rss_mib=rss,
      end_mib=_status_mib("VmRSS", "RssAnon", "RssFile", "VmHWM"))))


def run_child(mode: str, path: pathlib.Path, labelled: int, epochs: int,
              log: pathlib.Path) -> dict:
  command = [sys.executable, __file__, "--child", mode, "--path", str(path), "--labelled",
             str(labelled), "--epochs", str(epochs)]
  env = dict(os.environ, PYTHONPATH=str(REPO))
  start = time.perf_counter()
  with open(log, "w") as output:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=output, env=env,
                               text=True)
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
  wall = time.perf_counter() - start
  process.returncode = os.waitstatus_to_exitcode(status)
  if process.returncode:
    raise RuntimeError(f"{mode} run exited with {process.returncode}; see {log}")
  record = json.loads(stdout.strip().splitlines()[-1])
  return dict(mode=mode, peak_rss_mib=round(usage.ru_maxrss / 1024, 1), wall_s=round(wall, 1),
              **record)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--count", type=int, default=80000)
  parser.add_argument("--labelled", type=int, default=300)
  parser.add_argument("--epochs", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--root", default=None, help="folder for the npz (default: a temp dir)")
  parser.add_argument("--keep", action="store_true", help="keep the npz and the logs")
  parser.add_argument("--out", default=str(REPO / "docs" / "bench_npz_memory.json"))
  parser.add_argument("--child", choices=("memmap", "memory"), help=argparse.SUPPRESS)
  parser.add_argument("--path", help=argparse.SUPPRESS)
  parser.add_argument("--write", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.write:
    write_npz(pathlib.Path(args.write), args.count)
    return
  if args.child:
    child(args.child, args.path, args.labelled, args.epochs)
    return
  root = pathlib.Path(args.root or tempfile.mkdtemp(prefix="bench_npz_"))
  root.mkdir(parents=True, exist_ok=True)
  path = root / f"images{args.count}.npz"
  try:
    if not path.exists():  # in a child: this process stays small (see `run_child`)
      start = time.perf_counter()
      subprocess.run([sys.executable, __file__, "--write", str(path), "--count",
                      str(args.count)], check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
      print(f"wrote {path} ({path.stat().st_size / 2 ** 20:,.0f} MiB) in "
            f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    load_start = [round(x, 2) for x in os.getloadavg()]
    runs = []
    for repeat in range(args.repeats):
      for mode in ("memmap", "memory")[::1 if repeat % 2 == 0 else -1]:
        print(f"{mode}: running", file=sys.stderr, flush=True)
        run = dict(repeat=repeat, **run_child(mode, path, args.labelled, args.epochs,
                                               root / f"{mode}{repeat}.log"))
        print(json.dumps(run), file=sys.stderr, flush=True)
        runs.append(run)
    pixels = args.count * int(np.prod(IMAGE_SHAPE))
    report = dict(
        date=datetime.date.today().isoformat(), commit=git_commit(REPO),
        machine=platform.platform(), cpus=os.cpu_count(),
        load_average_at_start=load_start,
        load_average_at_end=[round(x, 2) for x in os.getloadavg()],
        npz=dict(images=args.count, shape=list(IMAGE_SHAPE), file_mib=round(
            path.stat().st_size / 2 ** 20, 1), images_uint8_mib=round(pixels / 2 ** 20, 1)),
        stages=f"load_npz (20% test split), train small_cnn {args.epochs} epoch(s) on "
               f"{args.labelled} labelled, test pass, embed_pool of the training split "
               "(CoreSet's features), eval batch 256",
        same_embeddings=len({r["embeddings_checksum"] for r in runs}) == 1,
        runs=runs)
    text = json.dumps(report, indent=1)
    pathlib.Path(args.out).write_text(text + "\n")
    print(text)
  finally:
    if not args.keep and args.root is None:
      shutil.rmtree(root, ignore_errors=True)
    elif not args.keep:
      path.unlink(missing_ok=True)


if __name__ == "__main__":
  main()
