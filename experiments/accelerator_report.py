"""One command to measure an accelerator: throughput of jax-seqgcn's stages; prints ONE JSON line.

On whatever devices JAX sees (GPU, TPU or CPU), in one process and in this order:

  * platform: backend, devices and their kinds, process count, versions of Python, jax, jaxlib,
    flax, optax and numpy, the git commit of the checkout, XLA flags and the compilation cache.
  * train: ResNet-18 training at CIFAR shape (32x32x3 uint8, 10 classes, CIFAR augmentation),
    batch 128, with `jax_seqgcn.fit`, once with compute_dtype float32 and once with bfloat16.
    The first epoch includes compilation and is reported apart (`first_epoch_with_compile_s`);
    `images_per_s` is the steady-state rate of the following epochs, each timed by the
    `progress` callback (which fetches the epoch's metrics and so waits for the device).
    float32 runs first; bfloat16's first epoch reuses the compiled initialisation (cached per
    learner and shape), so it holds only its own training-epoch compile.
  * eval: images/s of `jax_seqgcn.evaluate` (first call, with compile, and a warm call) and of
    `jax_seqgcn.extract_embeddings`, for each compute dtype, on the state trained above.
  * samplers: UncertainGCN and CoreGCN, `get_sampler(name)(key, Pool(mask, features=x), budget)`
    with default options, at N = 11,000 nodes (1,000 labelled), 512-d features |N(0, 1)|
    (non-negative, as the graph's cosine similarities must be), budget 1,000: the first call
    (with compilation) and a warm call on new features. CoreGCN's first call reuses the GCN
    training compiled for UncertainGCN, so only its k-center part compiles.
  * k_center: `jax_seqgcn.k_center_greedy(features, labelled_mask, 1000)` on the first
    sampler features, cold and warm, and whether its picks equal, in order, a plain NumPy
    float64 greedy k-center on the same inputs (`matches_float64`; else `first_difference`,
    the first pick position where they differ).

Every measurement is guarded: a failure records {"error": "..."} under its key (traceback on
stderr) and the report goes on. Progress lines go to stderr, the JSON line to stdout (and to
`--out PATH`); `total_wall_s` is the whole run.

The script is self-contained: synthetic data, no network, no `pip install`, and it imports only
jax_seqgcn's library layers (models, training, selection, samplers) plus jax, flax, optax,
numpy and the standard library: no ml_collections, tensorflow-datasets, orbax or absl flags.
Run it from a plain checkout on the accelerator host:

  PYTHONPATH=. python3 experiments/accelerator_report.py --out docs/accelerator_<platform>.json

(e.g. docs/accelerator_gpu_h200.json) and commit the JSON to docs/: it is the record of that
accelerator that docs/performance.md can quote. `--small` shrinks every stage (small_cnn at
32x32x3, batch 16; N = 1,000 nodes, 256-d, 100 labelled, 100 picks) to check the script itself
in about a minute on a 2-core CPU; the JSON has the same keys and its `sizes` say which sizes
were used. The full sizes on a 2-core CPU take about half an hour.

  python3 experiments/accelerator_report.py [--small] [--out PATH] [--train_examples N]
      [--epochs E] [--nodes N] [--budget B]
"""

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # measure this checkout's jax_seqgcn, even without PYTHONPATH=.
  sys.path.insert(0, _ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jax_seqgcn  # noqa: E402  (the library layers only; the rest loads lazily, never here)

COMPUTE_DTYPES = ("float32", "bfloat16")
SAMPLER_NAMES = ("UncertainGCN", "CoreGCN")

# The accelerator sizes (the CIFAR protocol's: 10,000 unlabelled + 1,000 labelled, budget 1,000),
# and the --small ones that check the script on a CPU in about a minute.
SIZES = {
    "full": dict(learner="resnet18", image_shape=[32, 32, 3], num_classes=10,
                 preprocessing="cifar10", batch_size=128, train_examples=4096, timed_epochs=3,
                 eval_examples=10_000, eval_batch_size=256, nodes=11_000, labelled=1_000,
                 dim=512, budget=1_000),
    "small": dict(learner="small_cnn", image_shape=[32, 32, 3], num_classes=10,
                  preprocessing="cifar10", batch_size=16, train_examples=64, timed_epochs=2,
                  eval_examples=256, eval_batch_size=64, nodes=1_000, labelled=100, dim=256,
                  budget=100),
}


def log(message: str) -> None:
  print(f"accelerator_report: {message}", file=sys.stderr, flush=True)


def guarded(name: str, fn, *args, **kwargs) -> dict:
  """`fn(*args, **kwargs)`, or {"error": "Type: message"} (traceback on stderr) if it raises."""
  log(f"{name} ...")
  start = time.perf_counter()
  try:
    result = fn(*args, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc(file=sys.stderr)
    result = {"error": f"{type(e).__name__}: {e}"[:2000]}
  log(f"{name}: {time.perf_counter() - start:.1f} s {json.dumps(result)[:400]}")
  return result


def _version(module_name: str):
  try:
    module = __import__(module_name)
    return getattr(module, "__version__", None)
  except Exception:  # pylint: disable=broad-except
    return None


def _git_commit():
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_ROOT, capture_output=True,
                         text=True, timeout=10)
    return (out.stdout.strip() or None) if out.returncode == 0 else None
  except Exception:  # pylint: disable=broad-except
    return None


def platform_info() -> dict:
  """Backend, devices, versions: what the numbers were measured on."""
  devices = jax.devices()
  memory = None
  try:
    stats = devices[0].memory_stats()
    memory = None if not stats else stats.get("bytes_limit")
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    cache_dir = jax.config.jax_compilation_cache_dir
  except AttributeError:
    cache_dir = None
  return {
      "backend": jax.default_backend(),
      "platform": devices[0].platform,
      "device_kinds": sorted({d.device_kind for d in devices}),
      "devices": [str(d) for d in devices],
      "device_count": jax.device_count(),
      "local_device_count": jax.local_device_count(),
      "process_count": jax.process_count(),
      "device_memory_bytes": memory,
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
      "machine": platform.machine(),
      "jax": jax.__version__,
      "jaxlib": _version("jaxlib"),
      "flax": _version("flax"),
      "optax": _version("optax"),
      "numpy": np.__version__,
      "jax_seqgcn": jax_seqgcn.__version__,
      "git_commit": _git_commit(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "compilation_cache_dir": cache_dir or None,
  }


def _images(sizes, n, seed):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, *sizes["image_shape"]), dtype=np.uint8)
  labels = rng.integers(0, sizes["num_classes"], n).astype(np.int32)
  return images, labels


def _learner(sizes):
  return jax_seqgcn.get_learner(sizes["learner"], num_classes=sizes["num_classes"],
                                channels=sizes["image_shape"][-1])


def measure_train(sizes, compute_dtype: str, states: dict) -> dict:
  """`fit` for 1 + timed_epochs epochs; the first (with compile) apart from the steady rate."""
  n, batch = sizes["train_examples"], sizes["batch_size"]
  images, labels = _images(sizes, n, seed=0)
  model = _learner(sizes)
  stamps, losses = [], []

  def progress(epoch, total, metrics):
    del epoch, total
    stamps.append(time.perf_counter())
    losses.append(metrics["loss"])

  start = time.perf_counter()
  state = jax_seqgcn.fit(jax.random.key(0), model, images, labels,
                         epochs=1 + sizes["timed_epochs"], batch_size=batch,
                         preprocessing=sizes["preprocessing"], milestones=(),
                         compute_dtype=compute_dtype, progress=progress)
  states[compute_dtype] = state
  epoch_s = np.diff(stamps)
  steps = -(-n // batch)
  return {
      "compute_dtype": compute_dtype,
      "first_epoch_with_compile_s": round(stamps[0] - start, 3),
      "epoch_s": [round(float(s), 4) for s in epoch_s],
      "images_per_s": round(n * len(epoch_s) / float(np.sum(epoch_s)), 1),
      "ms_per_step": round(1e3 * float(np.sum(epoch_s)) / (steps * len(epoch_s)), 3),
      "steps_per_epoch": steps,
      "last_loss": round(float(losses[-1]), 4),
  }


def measure_eval(sizes, compute_dtype: str, states: dict) -> dict:
  """`evaluate` (first call with compile, then warm) and `extract_embeddings` images/s."""
  n, batch = sizes["eval_examples"], sizes["eval_batch_size"]
  images, labels = _images(sizes, n, seed=1)
  model = _learner(sizes)
  state = states.get(compute_dtype)
  if state is None:  # training failed: an untrained state is as good for timing
    state = jax_seqgcn.fit(jax.random.key(0), model, images[:sizes["batch_size"]],
                           labels[:sizes["batch_size"]], epochs=0,
                           batch_size=sizes["batch_size"])
  kwargs = dict(batch_size=batch, preprocessing=sizes["preprocessing"],
                compute_dtype=compute_dtype)
  timings = []
  for _ in range(2):
    start = time.perf_counter()
    accuracy = jax_seqgcn.evaluate(state, model, images, labels, **kwargs)
    timings.append(time.perf_counter() - start)
  start = time.perf_counter()
  embeddings = jax_seqgcn.extract_embeddings(state, model, images, **kwargs)
  embed_s = time.perf_counter() - start
  return {
      "compute_dtype": compute_dtype,
      "evaluate_first_with_compile_s": round(timings[0], 3),
      "evaluate_warm_s": round(timings[1], 4),
      "evaluate_images_per_s": round(n / timings[1], 1),
      "extract_embeddings_s": round(embed_s, 4),
      "extract_embeddings_images_per_s": round(n / embed_s, 1),
      "embedding_dim": int(embeddings.shape[1]),
      "accuracy": round(float(accuracy), 4),
  }


def sampler_inputs(sizes, seed: int):
  """labelled mask (the last `labelled` nodes) and |N(0, 1)| float32 features [nodes, dim]."""
  n = sizes["nodes"]
  mask = np.zeros(n, bool)
  mask[n - sizes["labelled"]:] = True
  features = np.abs(np.random.default_rng(seed).standard_normal((n, sizes["dim"])))
  return mask, features.astype(np.float32)


def _check_picks(picks, mask, budget) -> dict:
  picks = np.asarray(picks)
  return {"picks_valid": bool(picks.shape == (budget,) and len(set(picks.tolist())) == budget
                              and not mask[picks].any())}


def measure_sampler(sizes, name: str) -> dict:
  """First call (with compile) on seed-0 features, then a warm call on seed-1 features."""
  sampler = jax_seqgcn.get_sampler(name)
  timings = []
  for seed in range(2):
    mask, features = sampler_inputs(sizes, seed)  # built outside the timed region
    pool = jax_seqgcn.Pool(mask, features=features)
    start = time.perf_counter()
    picks = jax.block_until_ready(sampler(jax.random.key(seed), pool, sizes["budget"]))
    timings.append(time.perf_counter() - start)
  return {"first_with_compile_s": round(timings[0], 3), "warm_s": round(timings[1], 3),
          **_check_picks(picks, mask, sizes["budget"])}


def k_center_float64(features, is_centre, budget: int) -> np.ndarray:
  """Plain NumPy float64 greedy k-center: the reference for `jax_seqgcn.k_center_greedy`.

  min_dist = Euclidean distance of each node to its nearest centre; then `budget` times: pick
  argmax min_dist among non-centres (first index on ties), update min_dist with the distances
  to the pick. Needs at least one centre.
  """
  x = np.asarray(features, np.float64)
  is_centre = np.asarray(is_centre, bool)
  sq = np.einsum("ij,ij->i", x, x)
  min_d2 = np.full(len(x), np.inf)
  centres = np.flatnonzero(is_centre)
  for lo in range(0, len(centres), 256):  # blocks of centres: [N, 256] at a time
    c = centres[lo:lo + 256]
    d2 = sq[:, None] - 2.0 * (x @ x[c].T) + sq[c][None, :]
    min_d2 = np.minimum(min_d2, d2.min(axis=1))
  min_dist = np.sqrt(np.maximum(min_d2, 0.0))
  min_dist[is_centre] = -1.0
  picks = np.empty(budget, np.int64)
  for i in range(budget):
    p = int(np.argmax(min_dist))
    picks[i] = p
    min_dist = np.minimum(min_dist, np.sqrt(np.sum(np.square(x - x[p]), axis=1)))
    min_dist[p] = -1.0
  return picks


def measure_k_center(sizes) -> dict:
  """`k_center_greedy` cold and warm on the seed-0 sampler inputs, and its float64 agreement."""
  mask, features = sampler_inputs(sizes, 0)
  budget = sizes["budget"]
  timings = []
  for _ in range(2):
    start = time.perf_counter()
    picks = jax.block_until_ready(jax_seqgcn.k_center_greedy(features, mask, budget))
    timings.append(time.perf_counter() - start)
  start = time.perf_counter()
  reference = k_center_float64(features, mask, budget)
  numpy_s = time.perf_counter() - start
  picks = np.asarray(picks)
  differ = np.flatnonzero(picks != reference)
  first = int(differ[0]) if differ.size else None
  return {
      "first_with_compile_s": round(timings[0], 3),
      "warm_s": round(timings[1], 4),
      "numpy_float64_s": round(numpy_s, 3),
      "matches_float64": first is None,
      "first_difference": first,
      "first_difference_picks": (None if first is None
                                 else [int(picks[first]), int(reference[first])]),
      **_check_picks(picks, mask, budget),
  }


def report(sizes: dict, mode: str) -> dict:
  start = time.perf_counter()
  result = {"report": "accelerator_report", "mode": mode, "sizes": dict(sizes)}
  result["platform"] = guarded("platform", platform_info)
  states = {}
  result["train"] = {dtype: guarded(f"train {dtype}", measure_train, sizes, dtype, states)
                     for dtype in COMPUTE_DTYPES}
  result["eval"] = {dtype: guarded(f"eval {dtype}", measure_eval, sizes, dtype, states)
                    for dtype in COMPUTE_DTYPES}
  states.clear()
  result["samplers"] = {name: guarded(f"sampler {name}", measure_sampler, sizes, name)
                        for name in SAMPLER_NAMES}
  result["k_center"] = guarded("k_center", measure_k_center, sizes)
  result["total_wall_s"] = round(time.perf_counter() - start, 2)
  return result


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true",
                      help="small sizes: checks the script in about a minute on a CPU")
  parser.add_argument("--out", help="also write the JSON line to this file")
  for name in ("train_examples", "epochs", "nodes", "budget"):
    parser.add_argument(f"--{name}", type=int, help=f"override the mode's {name}")
  args = parser.parse_args(argv)
  mode = "small" if args.small else "full"
  sizes = dict(SIZES[mode])
  overrides = dict(train_examples=args.train_examples, timed_epochs=args.epochs,
                   nodes=args.nodes, budget=args.budget)
  sizes.update({k: v for k, v in overrides.items() if v is not None})
  # Library code printing to stdout would break the one-JSON-line contract: send it to stderr.
  with contextlib.redirect_stdout(sys.stderr):
    result = report(sizes, mode)
  line = json.dumps(result, sort_keys=False)
  if args.out:
    directory = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(directory, exist_ok=True)
    with open(args.out, "w") as f:
      f.write(line + "\n")
    log(f"wrote {args.out}")
  print(line, flush=True)


if __name__ == "__main__":
  main()
