"""How UncertainGCN and CoreGCN selection scale with the pool size N (dense vs factored graph).

For each N (default 11k, 22k, 44k, 88k nodes; the last 1,000 labelled; 512-d features |N(0, 1)|)
and adjacency mode, a fresh subprocess trains the GCN (`graph.train_gcn`, 200 steps, hidden 128)
and then runs both selection rules (`samplers.uncertain_gcn_select`, `samplers.core_gcn_select`,
1,000 picks), so UncertainGCN = train + its rule and CoreGCN = train + k-center. It reports
seconds (total, and the part spent tracing/compiling, from `jax.monitoring` events) and peak
resident memory (`ru_maxrss` at the end, and above the baseline measured after the imports;
`ru_maxrss` only grows, so the value after training is the training peak). One process per
configuration, so runs don't pollute each other's peak. Configurations run one after another
(timings on a shared 2-core machine are noisy: compare ratios within one run).

Printed JSON: every run, plus for each mode the fitted growth exponent (least-squares slope of
log y against log N) of the times (with and without compilation) and of the peak memory, and an
affine fit of the peak memory (MB = intercept + per_1k_nodes * N / 1000). Goal: factored memory linear in N,
time at most linear, N = 88k under 4 GB peak.

  python experiments/bench_scale.py [--sizes 11000,22000,44000,88000] [--modes dense,factored]
      [--dense-max 22000] [--steps 200] [--bounds] [--json-out scale.json]
  python experiments/bench_scale.py --imagenet --json-out docs/bench_scale_imagenet.json

With --bounds the child also measures this machine's own throughput before and after the stage
(`machine_bounds`: matmul GFLOP/s and the k-center sweep's GB/s) and reports the GCN steps' time
against 200 x 4 N dim hidden flops at that throughput (`gcn_step_over_bound`), and the k-center
loop's time against budget x N (hidden + 1) x 4 bytes at that bandwidth. --imagenet is the
ImageNet-size setting (goals: the whole stage in 15 min, 12 GB peak RSS).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

MODES = ("dense", "factored")
_COMPILE_EVENT_PREFIX = "/jax/core/compile/"


def _rss_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _run_one(n, mode, args):
  """Child process: one (N, mode) configuration; returns a dict of seconds and megabytes."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax_seqgcn.selection import graph  # pylint: disable=g-import-not-at-top
  from jax_seqgcn import samplers  # pylint: disable=g-import-not-at-top

  jax.devices()  # initialise the backend before the baseline
  compile_s = [0.0]
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, secs, **_: compile_s.__setitem__(0, compile_s[0] + secs)
      if name.startswith(_COMPILE_EVENT_PREFIX) else None)
  baseline = _rss_mb()

  features = np.abs(np.random.default_rng(0).standard_normal((n, args.dim), np.float32))
  mask = np.zeros(n, bool)
  mask[n - args.labelled:] = True
  out = {"n": n, "mode": mode}

  def timed(name, fn):
    compile_before, start = compile_s[0], time.perf_counter()
    value = jax.block_until_ready(fn())
    out[f"{name}_s"] = round(time.perf_counter() - start, 3)
    out[f"{name}_compile_s"] = round(compile_s[0] - compile_before, 3)
    out[f"rss_after_{name}_mb"] = round(_rss_mb(), 1)
    return value

  if args.bounds:
    before = machine_bounds(n, args)
  chunk_ends = []
  result = timed("train", lambda: graph.train_gcn(
      jax.random.key(0), features, mask, hidden=args.hidden, steps=args.steps, adjacency=mode,
      on_chunk=lambda first, losses: chunk_ends.append((first + len(losses),
                                                         time.perf_counter()))))
  if len(chunk_ends) >= 3:  # steady state: the chunks after the first (which compiles)
    (s0, t0), (s1, t1) = chunk_ends[0], chunk_ends[-2]
    out["gcn_step_s"] = round((t1 - t0) / (s1 - s0), 4)
  timed("uncertain_select",
        lambda: samplers.uncertain_gcn_select(result.scores, mask, args.budget))
  if args.bounds:  # k-center's initial distances alone (10k centres: a matmul-bound pass)
    from jax_seqgcn.selection import kcenter  # pylint: disable=g-import-not-at-top
    timed("kcenter_init", lambda: jax.jit(kcenter.initial_min_distances)(
        result.embedding, jax.numpy.asarray(mask)))
  timed("core_select", lambda: samplers.core_gcn_select(result.embedding, mask, args.budget))
  if args.bounds:  # this machine's throughput, measured again after the stage; the mean counts
    after = machine_bounds(n, args)
    for name in ("matmul_gflops", "sweep_gb_per_s"):
      out[name + "_before"], out[name + "_after"] = before[name], after[name]
      out[name] = round((before[name] + after[name]) / 2, 2)
    out["gcn_step_flops"] = after["gcn_step_flops"]
    out["gcn_steps_bound_s"] = round(args.steps * out["gcn_step_flops"]
                                     / (out["matmul_gflops"] * 1e9), 1)
    if "gcn_step_s" in out:
      out["gcn_step_over_bound"] = round(out["gcn_step_s"] * out["matmul_gflops"] * 1e9
                                         / out["gcn_step_flops"], 3)
    out["kcenter_loop_bound_s"] = round(args.budget * n * (args.hidden + 1) * 4
                                        / (out["sweep_gb_per_s"] * 1e9), 1)
    # The greedy loop: CoreGCN's k-center minus its initial distances (both without compiles).
    loop_s = (out["core_select_s"] - out["core_select_compile_s"]
              - out["kcenter_init_s"] + out["kcenter_init_compile_s"])
    out["kcenter_loop_s"] = round(loop_s, 1)
    out["kcenter_loop_gb_per_s"] = round(args.budget * n * (args.hidden + 1) * 4 / loop_s / 1e9, 2)
  for name in ("train", "uncertain_select", "core_select"):
    out[f"{name}_run_s"] = round(out[f"{name}_s"] - out[f"{name}_compile_s"], 3)
  for sampler in ("uncertain", "core"):
    for kind in ("", "_run"):
      out[f"{sampler}_gcn{kind}_s"] = round(out[f"train{kind}_s"]
                                            + out[f"{sampler}_select{kind}_s"], 3)
  out["compile_s"] = round(compile_s[0], 3)
  out["baseline_rss_mb"] = round(baseline, 1)
  out["peak_rss_mb"] = round(_rss_mb(), 1)
  out["peak_rss_above_imports_mb"] = round(_rss_mb() - baseline, 1)
  out["uncertain_gcn_peak_rss_mb"] = out["rss_after_uncertain_select_mb"]
  out["core_gcn_peak_rss_mb"] = out["peak_rss_mb"]
  return out


def machine_bounds(n, args):
  """This machine's own throughput, measured in the run (before and after the stage): the GCN
  step's dominant product ([rows, dim] x [dim, hidden], GFLOP/s) and a jitted k-center distance
  sweep over [rows, hidden + 1] float32 (GB/s), each the best of 3 after a warm-up, on
  rows = min(N, 160,000) (far beyond the caches; keeps the probe off the stage's peak RSS)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  rows = min(n, 160_000)
  a = jnp.asarray(rng.standard_normal((rows, args.dim), np.float32))
  w = jnp.asarray(rng.standard_normal((args.dim, args.hidden), np.float32))
  product = jax.jit(lambda a, w: jnp.matmul(a, w, precision=jax.lax.Precision.HIGHEST))
  seconds = _best_of(lambda: product(a, w))
  a = None  # free the [N, dim] operand before the sweep's
  e = jnp.asarray(rng.standard_normal((rows, args.hidden + 1), np.float32))
  low = jnp.full((rows,), jnp.inf, jnp.float32)
  sweep = jax.jit(lambda e, d: jnp.minimum(
      d, jnp.sqrt(jnp.sum(jnp.square(e - e[7][None]), axis=-1))))
  sweep_s = _best_of(lambda: sweep(e, low))
  flops = 2 * rows * args.dim * args.hidden
  return {"matmul_gflops": round(flops / seconds / 1e9, 1),
          "gcn_step_flops": 4 * n * args.dim * args.hidden,  # (A V) W1 and its weight gradient
          "sweep_gb_per_s": round(e.size * 4 / sweep_s / 1e9, 2)}


def _child(n, mode, args):
  """Runs one configuration (or "bounds") in a fresh process; its JSON, or the error's tail."""
  proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", f"{n},{mode}"],
                        capture_output=True, text=True, timeout=args.timeout, check=False)
  if proc.returncode != 0:
    return {"n": n, "mode": mode, "error": proc.stderr.strip().splitlines()[-3:]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _best_of(fn, repeats=3):
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn())
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def growth_exponent(sizes, values):
  """Least-squares slope of log(values) against log(sizes): y ~ N^slope. None if < 2 points."""
  sizes, values = np.asarray(sizes, float), np.asarray(values, float)
  if len(sizes) < 2 or (values <= 0).any():
    return None
  return round(float(np.polyfit(np.log(sizes), np.log(values), 1)[0]), 3)


def affine_fit(sizes, values):
  """Least-squares y = intercept + slope * N: (intercept, slope * 1000), i.e. per 1k nodes."""
  if len(sizes) < 2:
    return None
  slope, intercept = np.polyfit(np.asarray(sizes, float), np.asarray(values, float), 1)
  return {"intercept": round(float(intercept), 1), "per_1k_nodes": round(float(slope) * 1e3, 2)}


# Times with and without tracing/compilation (compile time hardly depends on N and flattens
# the exponent of the totals at small N).
_FITTED = ("train_s", "train_run_s", "uncertain_gcn_s", "uncertain_gcn_run_s", "core_gcn_s",
           "core_gcn_run_s", "core_select_run_s", "peak_rss_mb", "peak_rss_above_imports_mb")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="11000,22000,44000,88000",
                      help="comma-separated numbers of nodes N")
  parser.add_argument("--modes", default=",".join(MODES), help="adjacency modes to run")
  parser.add_argument("--dense-max", type=int, default=22_000,
                      help="largest N run with the dense N x N adjacency")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--dim", type=int, default=512)
  parser.add_argument("--budget", type=int, default=1_000)
  parser.add_argument("--labelled", type=int, default=1_000)
  parser.add_argument("--imagenet", action="store_true",
                      help="the ImageNet-size setting: N = 1,280,000 factored, 10,000 labelled, "
                           "1,000 picks, with --bounds")
  parser.add_argument("--bounds", action="store_true",
                      help="also measure this machine's matmul GFLOP/s and sweep GB/s, and the "
                           "GCN steps' and k-center loop's bounds from them")
  parser.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
  parser.add_argument("--json-out", help="also write the JSON here")
  parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: "N,mode"
  args = parser.parse_args()
  if args.imagenet:
    args.sizes, args.modes, args.labelled, args.budget, args.bounds = (
        "1280000", "factored", 10_000, 1_000, True)
  if args.child:
    n, mode = args.child.split(",")
    print(json.dumps(_run_one(int(n), mode, args)))
    return

  sizes = [int(s) for s in args.sizes.split(",")]
  modes = args.modes.split(",")
  if set(modes) - set(MODES):
    parser.error(f"--modes must be among {MODES}")
  import jax  # pylint: disable=g-import-not-at-top
  report = {"config": {k: v for k, v in vars(args).items() if k not in ("child", "json_out")},
            "jax": jax.__version__, "cpu_count": os.cpu_count(), "runs": [], "growth": {}}
  for mode in modes:
    for n in sizes:
      if mode == "dense" and n > args.dense_max:
        continue
      print(f"running N={n} {mode} ...", file=sys.stderr, flush=True)
      run = _child(n, mode, args)
      print(f"  {json.dumps(run)}", file=sys.stderr, flush=True)
      report["runs"].append(run)
  for mode in modes:
    runs = [r for r in report["runs"] if r["mode"] == mode and "error" not in r]
    report["growth"][mode] = {
        key: growth_exponent([r["n"] for r in runs], [r[key] for r in runs]) for key in _FITTED}
    # "Linear in N" means affine: a constant (imports, compiler) plus a per-node cost.
    report["growth"][mode]["peak_rss_mb_affine"] = affine_fit(
        [r["n"] for r in runs], [r["peak_rss_mb"] for r in runs])
  text = json.dumps(report, indent=1)
  print(text)
  if args.json_out:
    with open(args.json_out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
