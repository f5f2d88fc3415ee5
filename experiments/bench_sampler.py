"""Benchmark of the sampler stages at the paper's scale: N = 10,000 unlabelled + 1,000 labelled.

Prints one JSON object: for each stage, seconds of the first call (including XLA compilation),
seconds of a second call on new values (warm), and the peak resident memory of a fresh process
that ran only that stage. Stages: dense adjacency, 200 GCN steps (dense and factored adjacency),
the whole UncertainGCN and CoreGCN selections (train + pick), and CoreSet's k-center greedy.

  python experiments/bench_sampler.py [--unlabelled 10000 --labelled 1000 --dim 512 --budget 1000]

Reference on our 2-core machine (issue 2): 120-250 s for the UncertainGCN stage and 7-14 s for
the k-center. Goals: UncertainGCN stage <= 15 s, k-center <= 1.5 s.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

STAGES = ("adjacency", "gcn_200_steps_dense", "gcn_200_steps_factored", "uncertain_gcn",
          "core_gcn", "coreset_kcenter")


def _run_stage(stage, args):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import jax_seqgcn  # pylint: disable=g-import-not-at-top

  n = args.unlabelled + args.labelled
  mask = np.zeros(n, bool)
  mask[args.unlabelled:] = True

  def features(seed):
    return np.abs(np.random.default_rng(seed).standard_normal((n, args.dim))).astype(np.float32)

  gcn = dict(hidden=args.hidden, steps=args.steps)
  calls = {
      "adjacency": lambda k, x: jax_seqgcn.normalized_adjacency(x),
      "gcn_200_steps_dense": lambda k, x: jax_seqgcn.train_gcn(k, x, mask, adjacency="dense",
                                                               **gcn),
      "gcn_200_steps_factored": lambda k, x: jax_seqgcn.train_gcn(
          k, x, mask, adjacency="factored", **gcn),
      "uncertain_gcn": lambda k, x: jax_seqgcn.samplers.uncertain_gcn(
          k, x, mask, args.budget, adjacency=args.adjacency, **gcn),
      "core_gcn": lambda k, x: jax_seqgcn.samplers.core_gcn(
          k, x, mask, args.budget, adjacency=args.adjacency, **gcn),
      "coreset_kcenter": lambda k, x: jax_seqgcn.k_center_greedy(x, mask, args.budget),
  }
  baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  timings = []
  for seed in range(2):
    x = features(seed)
    start = time.perf_counter()
    jax.block_until_ready(calls[stage](jax.random.key(seed), x))
    timings.append(time.perf_counter() - start)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return {"cold_s": round(timings[0], 3), "warm_s": round(timings[1], 3),
          "peak_rss_mb": round(peak / 1024, 1),
          "peak_rss_above_imports_mb": round((peak - baseline) / 1024, 1)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--unlabelled", type=int, default=10_000)
  parser.add_argument("--labelled", type=int, default=1_000)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--budget", type=int, default=1_000)
  parser.add_argument("--adjacency", default="auto", help="mode for the whole-sampler stages")
  parser.add_argument("--stages", default=",".join(STAGES))
  parser.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage, print JSON
  args = parser.parse_args()
  if args.stage:
    print(json.dumps(_run_stage(args.stage, args)))
    return
  import jax  # pylint: disable=g-import-not-at-top
  result = {"n_nodes": args.unlabelled + args.labelled, "dim": args.dim, "hidden": args.hidden,
            "steps": args.steps, "budget": args.budget, "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
            "stages": {}}
  for stage in args.stages.split(","):
    print(f"running {stage} ...", file=sys.stderr, flush=True)
    out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--stage", stage],
                         check=True, capture_output=True, text=True)
    result["stages"][stage] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {result['stages'][stage]}", file=sys.stderr, flush=True)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
