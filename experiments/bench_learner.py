"""Learner training throughput (images/s) with `jax_seqgcn.fit`; prints JSON.

Cases (docs/performance.md gives the current numbers against PyTorch):
  * resnet18, batch 128, 32x32x3 (CIFAR preprocessing, augmentation on);
  * small_cnn, batch 64 and 128, 28x28x1 (Fashion-MNIST preprocessing).

Each case runs `fit` for 1 + E epochs over N random uint8 images; the first epoch includes
compilation and is excluded. Epoch times come from the `progress` callback, which fetches
the epoch metrics and so waits for the device. ResNet-18 epochs default to 1,024 examples,
8 steps: the CIFAR protocol's first cycle (1,000 labels) and so its shortest epoch. Each
epoch is one XLA run that faults in 2.9 GB of fresh buffers; without huge pages a 2-step
epoch (the earlier default of 256 examples) charged that to 2 steps instead of 8 and read 8%
slower (28.7 against 31.1 images/s).
Like experiments/main.py, the script first restarts itself with huge pages where that helps
(jax_seqgcn/runtime/host_memory.py; the PyTorch process is given them too). Default runtime on
2 CPU cores: ~4 min, ~7 min with --torch.

With --torch (needs PyTorch, which is not a dependency; skipped with a note when missing), each
case is also trained in PyTorch right after, in a fresh process (experiments/bench_torch.py:
the same architecture, batch, optimiser and augmentation; see `bench_in_subprocess` for why not
in this process), and the record gets `torch_images_per_s` and `ratio_vs_torch` = our images/s
over PyTorch's, both measured in this one run. Both rates move by up to ±20% from run to run
on a shared machine; `--repeats R` measures each case R times, alternating the two frameworks,
and reports the medians and every repeat.

  python experiments/bench_learner.py [--cases resnet18:128,small_cnn:64,small_cnn:128]
      [--epochs 2] [--resnet_examples 1024] [--small_examples 4096] [--torch] [--repeats 1]
      [--compute_dtype float32|bfloat16]
"""

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np

import bench_torch
from jax_seqgcn.runtime import host_memory
from jax_seqgcn import models
from jax_seqgcn import training

CASES = {
    "resnet18": dict(shape=bench_torch.IMAGE_SHAPES["resnet18"], preprocessing="cifar10"),
    "small_cnn": dict(shape=bench_torch.IMAGE_SHAPES["small_cnn"],
                      preprocessing="fashion_mnist"),
}


def bench(name: str, batch_size: int, *, num_examples: int, epochs: int, seed: int = 0,
          compute_dtype: str = "float32") -> dict:
  """Trains `name` for 1 + `epochs` epochs on random data; returns timings of the last ones."""
  shape = CASES[name]["shape"]
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (num_examples,) + shape, dtype=np.uint8)
  labels = rng.integers(0, 10, num_examples).astype(np.int32)
  model = models.get_learner(name, num_classes=10, channels=shape[-1])
  stamps = []
  start = time.perf_counter()
  training.fit(jax.random.key(seed), model, images, labels, epochs=1 + epochs,
            batch_size=batch_size, preprocessing=CASES[name]["preprocessing"], milestones=(),
            compute_dtype=compute_dtype,
            progress=lambda epoch, total, metrics: stamps.append(time.perf_counter()))
  epoch_seconds = np.diff(stamps)
  steps = -(-num_examples // batch_size)
  return {
      "learner": name,
      "batch_size": batch_size,
      "compute_dtype": compute_dtype,
      "image_shape": list(shape),
      "examples_per_epoch": num_examples,
      "steps_per_epoch": steps,
      "timed_epochs": int(epochs),
      "first_epoch_with_compile_s": round(stamps[0] - start, 2),
      "epoch_s": [round(float(s), 3) for s in epoch_seconds],
      "images_per_s": round(num_examples * len(epoch_seconds) / float(np.sum(epoch_seconds)), 1),
      "ms_per_step": round(1e3 * float(np.sum(epoch_seconds)) / (steps * len(epoch_seconds)), 1),
  }


def summarise(ours: list[dict], theirs: list[dict]) -> dict:
  """One record per case from R repeats: our first record, with medians when R > 1.

  Args:
    ours: R records from `bench`, in the order run.
    theirs: R records from `bench_torch.bench_in_subprocess` run alternately with ours, or [].
  Returns:
    The case's record. `images_per_s` (and `torch_images_per_s`) is the median over the
    repeats, `ratio_vs_torch` the ratio of the two medians; with R > 1 the record also lists
    every repeat's rates (`repeat_images_per_s`, `repeat_torch_images_per_s`) and ratios
    (`repeat_ratios`).
  """
  record = dict(ours[0])
  rates = [r["images_per_s"] for r in ours]
  record["images_per_s"] = round(float(np.median(rates)), 1)
  if len(ours) > 1:
    record.update(repeats=len(ours), repeat_images_per_s=rates,
                  epoch_s=[s for r in ours for s in r["epoch_s"]])
    record["ms_per_step"] = round(float(np.median([r["ms_per_step"] for r in ours])), 1)
  if theirs:
    torch_rates = [r["images_per_s"] for r in theirs]
    record.update(torch=theirs[0]["framework"],
                  torch_images_per_s=round(float(np.median(torch_rates)), 1),
                  ratio_vs_torch=round(float(np.median(rates) / np.median(torch_rates)), 3))
    if len(theirs) > 1:
      record.update(repeat_torch_images_per_s=torch_rates,
                    repeat_ratios=[round(a / b, 3) for a, b in zip(rates, torch_rates)])
  return record


def device_info() -> dict:
  """Backend, devices and versions of this run."""
  return {
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "device_count": jax.device_count(),
      "process_count": jax.process_count(),
      "device_kind": jax.devices()[0].device_kind,
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "python": platform.python_version(),
      "machine": platform.machine(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "glibc_tunables": host_memory.process_tunables() or "",
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="resnet18:128,small_cnn:64,small_cnn:128",
                      help="comma-separated learner:batch_size")
  parser.add_argument("--epochs", type=int, default=2, help="timed epochs per case")
  parser.add_argument("--resnet_examples", type=int, default=1024)
  parser.add_argument("--small_examples", type=int, default=4096)
  parser.add_argument("--compute_dtype", default="float32", choices=("float32", "bfloat16"),
                      help="jax-seqgcn's compute dtype (PyTorch always runs float32)")
  parser.add_argument("--torch", action="store_true",
                      help="also train each case in PyTorch (if installed) and print the ratio")
  parser.add_argument("--repeats", type=int, default=1,
                      help="measure each case this many times (alternating with PyTorch) and "
                           "report medians")
  args = parser.parse_args()
  if args.repeats < 1 or args.epochs < 1:
    parser.error("--repeats and --epochs must be at least 1")
  host_memory.reexec_with_hugepages()
  with_torch = args.torch and bench_torch.available()
  if args.torch and not with_torch:
    print("bench_learner: PyTorch is not installed; skipping the PyTorch comparison",
          file=sys.stderr)
  results = []
  for case in args.cases.split(","):
    name, batch = case.split(":")
    if name not in CASES:
      raise SystemExit(f"unknown learner {name!r}; choose from {sorted(CASES)}")
    examples = args.resnet_examples if name == "resnet18" else args.small_examples
    ours, theirs = [], []
    for _ in range(args.repeats):
      ours.append(bench(name, int(batch), num_examples=examples, epochs=args.epochs,
                        compute_dtype=args.compute_dtype))
      if with_torch:
        theirs.append(bench_torch.bench_in_subprocess(
            name, int(batch), num_examples=examples, epochs=args.epochs,
            augment=CASES[name]["preprocessing"] == "cifar10"))
    record = summarise(ours, theirs)
    print(f"{name} batch {batch}: {record['images_per_s']} images/s"
          + (f", PyTorch {record['torch_images_per_s']} (ratio {record['ratio_vs_torch']})"
             if with_torch else ""), file=sys.stderr, flush=True)
    results.append(record)
  print(json.dumps({"device": device_info(), "train": results}, indent=2))


if __name__ == "__main__":
  main()
