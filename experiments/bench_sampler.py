"""Benchmark of the sampler stages at the paper's scale: N = 10,000 unlabelled + 1,000 labelled.

Prints one JSON object: for each stage, seconds of the first call (including XLA compilation),
seconds of a second call on new values (warm), and the peak resident memory of a fresh process
that ran only that stage. Stages: dense adjacency, 200 GCN steps (dense and factored adjacency),
the whole UncertainGCN and CoreGCN selections (train + pick), and CoreSet's k-center greedy.

Any registered sampler (`jax_seqgcn.samplers.SAMPLERS`) can be timed the same way with
`--samplers NAME,NAME` (or `all`), called through the registry on a synthetic Pool: features
|N(0, 1)| of `--dim` (the same arrays as the stages use), probabilities = softmax of
3 * N(0, 1) logits over `--classes`, predicted_losses N(0, 1), images U[0, 1) of
`--image-size`^2 x 3 float32, mc_probabilities [`--mc-samples`, N, C] = softmax of those logits
plus N(0, 1) per pass. Each sampler's process builds only the fields it `needs` (the loop
computes only those too), so its peak memory is its own. Options come from the registry defaults,
overridden by `--option NAME:key=value` (repeatable; values are Python literals, else strings).
On a shared machine a single warm call is noisy: `--warm-repeats R` reports the fastest of R,
and the *_cpu_s fields give this process's CPU seconds (all threads) for the same calls.

  python experiments/bench_sampler.py [--unlabelled 10000 --labelled 1000 --dim 512 --budget 1000]
  python experiments/bench_sampler.py --stages coreset_kcenter --samplers BADGE,CoreSet \
      --option CoreGCN:steps=50 --warm-repeats 3

Reference on our 2-core machine: 120-250 s for the UncertainGCN stage and 7-14 s for
the k-center. Goals: UncertainGCN stage <= 15 s, k-center <= 1.5 s, BADGE no slower than the
k-center on the same features.
"""

import argparse
import ast
import json
import os
import resource
import subprocess
import sys
import time

STAGES = ("adjacency", "gcn_200_steps_dense", "gcn_200_steps_factored", "uncertain_gcn",
          "core_gcn", "coreset_kcenter")


_SAMPLER_STAGE = "sampler:"


def _features(n, args, seed):
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.abs(np.random.default_rng(seed).standard_normal((n, args.dim))).astype(np.float32)


def synthetic_pool(args, seed, fields):
  """A `samplers.Pool` of `args.unlabelled + args.labelled` nodes with the given fields.

  Each field has its own generator (seeded by `seed` and the field), so a field's values do not
  depend on which other fields are built; features equal those of the stages.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax_seqgcn import samplers  # pylint: disable=g-import-not-at-top
  n = args.unlabelled + args.labelled
  mask = np.zeros(n, bool)
  mask[args.unlabelled:] = True
  values = {}
  if "features" in fields:
    values["features"] = _features(n, args, seed)
  for i, field in enumerate(("probabilities", "predicted_losses", "images", "mc_probabilities"),
                            start=1):
    if field not in fields:
      continue
    rng = np.random.default_rng([seed, i])
    if field in ("probabilities", "mc_probabilities"):
      # mc_probabilities: --mc-samples passes, logits 3 N(0, 1) plus N(0, 1) per pass.
      shape = ((n, args.classes) if field == "probabilities"
               else (args.mc_samples, n, args.classes))
      logits = 3.0 * rng.standard_normal(shape[-2:]) + (
          rng.standard_normal(shape) if field == "mc_probabilities" else 0.0)
      e = np.exp(logits - logits.max(axis=-1, keepdims=True))
      values[field] = (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    elif field == "predicted_losses":
      values[field] = rng.standard_normal(n).astype(np.float32)
    else:
      values[field] = rng.random((n, args.image_size, args.image_size, 3), np.float32)
  return samplers.Pool(mask, **values)


def parse_options(specs):
  """["NAME:key=value", ...] -> {NAME: {key: value}}; values are Python literals or strings."""
  options = {}
  for spec in specs or ():
    name, sep, assignment = spec.partition(":")
    key, eq, text = assignment.partition("=")
    if not (sep and eq and name and key):
      raise SystemExit(f"--option {spec!r}: expected NAME:key=value, e.g. CoreGCN:steps=50")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    options.setdefault(name, {})[key] = value
  return options


def _timed_calls(call, args):
  """Runs `call(key, seed)` once cold and `args.warm_repeats` times warm, on new values each."""
  import jax  # pylint: disable=g-import-not-at-top
  baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  timings, cpu = [], []
  for seed in range(1 + args.warm_repeats):
    run = call(seed)
    start, start_cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(run(jax.random.key(seed)))
    timings.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  warm = 1 + min(range(args.warm_repeats), key=lambda i: timings[1 + i])
  result = {"cold_s": round(timings[0], 3), "warm_s": round(timings[warm], 3),
            "cold_cpu_s": round(cpu[0], 3), "warm_cpu_s": round(cpu[warm], 3)}
  if args.warm_repeats > 1:
    result["warm_all_s"] = [round(t, 3) for t in timings[1:]]
  return dict(result, peak_rss_mb=round(peak / 1024, 1),
              peak_rss_above_imports_mb=round((peak - baseline) / 1024, 1))


def _run_sampler(name, args):
  import jax_seqgcn  # pylint: disable=g-import-not-at-top
  sampler = jax_seqgcn.samplers.get_sampler(name)
  options = sampler.resolve_options(parse_options(args.option).get(name, {}))

  def call(seed):
    pool = synthetic_pool(args, seed, sampler.needs)  # built outside the timed region
    return lambda key: sampler(key, pool, args.budget, **options)

  return dict(_timed_calls(call, args), needs=sorted(sampler.needs),
              options={k: v for k, v in options.items()
                       if isinstance(v, (bool, int, float, str, type(None)))})


def _run_stage(stage, args):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import jax_seqgcn  # pylint: disable=g-import-not-at-top

  if stage.startswith(_SAMPLER_STAGE):
    return _run_sampler(stage[len(_SAMPLER_STAGE):], args)
  n = args.unlabelled + args.labelled
  mask = np.zeros(n, bool)
  mask[args.unlabelled:] = True

  def features(seed):
    return _features(n, args, seed)

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

  def call(seed):
    x = features(seed)
    return lambda key: calls[stage](key, x)

  return _timed_calls(call, args)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--unlabelled", type=int, default=10_000)
  parser.add_argument("--labelled", type=int, default=1_000)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--budget", type=int, default=1_000)
  parser.add_argument("--adjacency", default="auto", help="mode for the whole-sampler stages")
  parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated; '' for none")
  parser.add_argument("--samplers", default="",
                      help="registered sampler names, comma-separated, or 'all'")
  parser.add_argument("--option", action="append", metavar="NAME:key=value",
                      help="sampler option override, e.g. CoreGCN:steps=50 (repeatable)")
  parser.add_argument("--classes", type=int, default=10, help="pool.probabilities columns")
  parser.add_argument("--mc-samples", type=int, default=20,
                      help="T of pool.mc_probabilities [T, N, C] (BALD, PowerBALD)")
  parser.add_argument("--image-size", type=int, default=32, help="pool.images height = width")
  parser.add_argument("--warm-repeats", type=int, default=1,
                      help="warm calls (new values each); warm_s is the fastest")
  parser.add_argument("--json-out", help="also write the JSON here")
  parser.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage, print JSON
  args = parser.parse_args()
  if args.stage:
    print(json.dumps(_run_stage(args.stage, args)))
    return
  import jax  # pylint: disable=g-import-not-at-top
  from jax_seqgcn import samplers  # pylint: disable=g-import-not-at-top
  stages = [s for s in args.stages.split(",") if s]
  unknown = sorted(set(stages) - set(STAGES))
  if unknown:
    raise SystemExit(f"unknown stage(s) {unknown}; valid: {', '.join(STAGES)}")
  names = list(samplers.SAMPLERS) if args.samplers == "all" else [
      s for s in args.samplers.split(",") if s]
  options = parse_options(args.option)
  try:  # fail before running anything
    for name in set(names) | set(options):
      samplers.get_sampler(name).resolve_options(options.get(name, {}))
  except ValueError as e:
    raise SystemExit(str(e)) from e
  result = {"n_nodes": args.unlabelled + args.labelled, "dim": args.dim, "hidden": args.hidden,
            "steps": args.steps, "budget": args.budget, "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
            "warm_repeats": args.warm_repeats, "stages": {}}
  if names:
    result.update(classes=args.classes, image_size=args.image_size, samplers={})
  jobs = [("stages", stage, stage) for stage in stages]
  jobs += [("samplers", name, _SAMPLER_STAGE + name) for name in names]
  for section, name, stage in jobs:
    print(f"running {stage} ...", file=sys.stderr, flush=True)
    out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--stage", stage],
                         capture_output=True, text=True)
    if out.returncode:
      raise SystemExit(f"{stage} failed:\n{out.stderr[-3000:]}")
    result[section][name] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {result[section][name]}", file=sys.stderr, flush=True)
  text = json.dumps(result, indent=1)
  print(text)
  if args.json_out:
    with open(args.json_out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
