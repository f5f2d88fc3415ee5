"""Peak memory of `jax-seqgcn select --images` against the folder's size; prints JSON.

Writes N synthetic 64x64 RGB PNG images (default 80,000; smaller folders are hard links to
their first files) and a labels CSV of `--labelled` of them under `--root`, then runs
`jax-seqgcn select --images DIR --sampler Entropy --epochs E` (small_cnn) once per folder size
and code version, each in its own child process, and reports per run:

  * `peak_rss_mib`: the child's peak resident set size (`os.wait4`'s `ru_maxrss`: the largest
    RSS the process reached, its own anonymous memory plus the file pages it mapped: Python,
    JAX's libraries, memory-mapped arrays), in MiB;
  * `wall_s`: the whole command, imports and the header scan included, and `stages_s`: the
    seconds `select.json` records per stage (read: images decoded or headers scanned before
    the training; train; embed: the eval pass, which now decodes the pool; sample);
  * the sizes that explain the difference: the folder's decoded images as uint8 [N, 64, 64, 3]
    (what the old code held, twice while stacking them) and as float32, against the arrays the
    new code keeps: Entropy's probabilities [N, C] and, for comparison, the learner's
    embeddings [N, 128] float32 (what a CoreSet-like sampler keeps);
  * `same_picks`: whether every run's PICKS.csv (ranks, ids and scores) for that folder is the
    same, both versions and all repeats.

Code versions: `new` is this checkout; `old` is the code before streaming, run from a clean
clone given with `--old` (e.g. `git clone -q /work/main /tmp/old-main`, then
`git -C /tmp/old-main checkout COMMIT`), via PYTHONPATH. The runs go one after the other
(never two at once); with `--repeats R` each version runs R times per size, the order of the
two alternating, since a shared machine's load changes from minute to minute. On 2 CPU cores
the four runs of one repeat take ~10 minutes (the images are written once, ~2 minutes).

  python experiments/bench_select_memory.py [--sizes 20000,80000] [--old /tmp/old-main]
      [--root /tmp/bench_select] [--labelled 300] [--epochs 2] [--repeats 1]
      [--out docs/bench_select_memory.json] [--append]

The JSON holds `sessions`, one per invocation (`--append` adds one to an existing file).
"""

import argparse
import csv
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
IMAGE_SHAPE = (64, 64, 3)
NUM_CLASSES = 10
EMBEDDING_DIM = 128  # small_cnn's


def write_folder(root: pathlib.Path, count: int, seed: int = 0) -> pathlib.Path:
  """`root/images/batchK/imgNNNNNN.png`, `count` 64x64 RGB images (kept if already there)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  images = root / "images"
  done = root / ".complete"
  if done.exists() and int(done.read_text()) >= count:
    return images
  rng = np.random.default_rng(seed)
  tints = rng.integers(0, 256, (NUM_CLASSES, 3))
  for i in range(count):
    path = images / f"batch{i // 10000}" / f"img{i:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = rng.integers(0, 96, IMAGE_SHAPE)
    pixels = (tints[i % NUM_CLASSES] * 0.6 + noise).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, compress_level=1)
  done.write_text(str(count))
  return images


def linked_subset(source: pathlib.Path, root: pathlib.Path, count: int) -> pathlib.Path:
  """`root/images` holding hard links to the first `count` images of `source`."""
  images = root / "images"
  if (root / ".complete").exists():
    return images
  for i in range(count):
    relative = pathlib.Path(f"batch{i // 10000}") / f"img{i:06d}.png"
    (images / relative).parent.mkdir(parents=True, exist_ok=True)
    os.link(source / relative, images / relative)
  (root / ".complete").write_text(str(count))
  return images


def write_labels(root: pathlib.Path, count: int, labelled: int) -> pathlib.Path:
  """Labels CSV of `labelled` images spread over the folder (class = the image's tint)."""
  path = root / "labels.csv"
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["id", "label"])
    for i in np.linspace(0, count - 1, labelled).astype(int):
      writer.writerow([f"batch{i // 10000}/img{i:06d}.png", f"class{i % NUM_CLASSES}"])
  return path


def run_select(code: pathlib.Path, images, labels, out: pathlib.Path, epochs: int,
               log: pathlib.Path) -> dict:
  """One `select` in a child process; its peak RSS, wall time and stage seconds."""
  command = [sys.executable, "-m", "jax_seqgcn", "select", "--images", str(images), "--labels",
             str(labels), "--budget", "100", "--sampler", "Entropy", "--epochs", str(epochs),
             "--batch_size", "64", "--learner", "small_cnn", "--out", str(out), "--force"]
  env = dict(os.environ, PYTHONPATH=str(code))
  start = time.perf_counter()
  with open(log, "w") as output:
    child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env,
                             cwd="/")
    _, status, usage = os.wait4(child.pid, 0)
  wall = time.perf_counter() - start
  code_ = os.waitstatus_to_exitcode(status)
  child.returncode = code_
  if code_ != 0:
    raise RuntimeError(f"select exited with {code_}; see {log}")
  record = json.loads((out.parent / (out.stem + ".workdir") / "select.json").read_text())
  return dict(peak_rss_mib=round(usage.ru_maxrss / 1024, 1), wall_s=round(wall, 1),
              stages_s={k: round(v, 1) for k, v in record["seconds"].items()})


def sizes_mib(count: int) -> dict:
  pixels = count * int(np.prod(IMAGE_SHAPE))
  mib = lambda n: round(n / 2 ** 20, 1)
  return dict(images_uint8=mib(pixels), images_float32=mib(4 * pixels),
              probabilities_float32=mib(4 * count * NUM_CLASSES),
              embeddings_float32=mib(4 * count * EMBEDDING_DIM))


def git_commit(path) -> str:
  """The short commit of the clone at `path`, with "+changes" when its package differs."""
  try:
    git = lambda *a: subprocess.run(["git", "-C", str(path), *a], capture_output=True,
                                    text=True, check=True).stdout.strip()
    return git("rev-parse", "--short", "HEAD") + (
        "+changes" if git("status", "--porcelain", "--", "jax_seqgcn") else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="20000,80000")
  parser.add_argument("--old", default="/tmp/old-main",
                      help="a clone of the code before streaming ('' to skip it)")
  parser.add_argument("--root", default="/tmp/bench_select")
  parser.add_argument("--labelled", type=int, default=300)
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--append", action="store_true",
                      help="add this session to those already in --out")
  parser.add_argument("--repeats", type=int, default=1,
                      help="runs of each version per size, the order of the versions "
                           "alternating (old, new, then new, old, ...)")
  parser.add_argument("--out", default=str(REPO / "docs" / "bench_select_memory.json"))
  args = parser.parse_args()
  sizes = sorted(int(s) for s in args.sizes.split(","))
  root = pathlib.Path(args.root)
  largest = write_folder(root / f"n{sizes[-1]}", sizes[-1])
  versions = {"new": REPO}
  if args.old:
    versions = {"old": pathlib.Path(args.old), "new": REPO}
  runs = []
  for count in sizes:
    folder = root / f"n{count}"
    images = largest if count == sizes[-1] else linked_subset(largest, folder, count)
    labels = write_labels(folder, count, args.labelled)
    picks = {}
    for repeat in range(args.repeats):
      order = list(versions) if repeat % 2 == 0 else list(versions)[::-1]
      for version in order:
        out = folder / f"picks_{version}.csv"
        print(f"n={count} {version}: running", file=sys.stderr, flush=True)
        run = dict(images=count, version=version, repeat=repeat,
                   commit=git_commit(versions[version]),
                   **run_select(versions[version], images, labels, out, args.epochs,
                                folder / f"select_{version}.log"))
        picks.setdefault(version, set()).add(out.read_text())
        print(json.dumps(run), file=sys.stderr, flush=True)
        runs.append(run)
    every = set().union(*picks.values())
    for run in runs[-len(versions) * args.repeats:]:
      run["same_picks"] = len(every) == 1 if len(versions) > 1 else None
  report = dict(
      date=datetime.date.today().isoformat(), machine=platform.platform(),
      cpus=os.cpu_count(), load_average_at_end=[round(x, 2) for x in os.getloadavg()],
      repeats=args.repeats,
      command="jax-seqgcn select --images DIR --labels LABELS --budget 100 --sampler Entropy "
              f"--epochs {args.epochs} --batch_size 64 --learner small_cnn ({args.labelled} "
              "labelled, 10 classes, 64x64 RGB PNG)",
      sizes_mib={str(n): sizes_mib(n) for n in sizes}, runs=runs)
  out = pathlib.Path(args.out)
  sessions = json.loads(out.read_text())["sessions"] if args.append and out.exists() else []
  text = json.dumps(dict(sessions=sessions + [report]), indent=1)
  out.write_text(text + "\n")
  print(text)


if __name__ == "__main__":
  main()
