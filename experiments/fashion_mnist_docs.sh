#!/usr/bin/env bash
# Tables and plots of the CPU-scale Fashion-MNIST runs (see run_fashion_mnist_cpu.sh) in docs/.
# A sampler without a workdir under RUNS_DIR is taken from docs/fashion_mnist_cpu_previous.json
# (the first four samplers' earlier runs, same protocol) when it is there. No time columns: these
# runs shared 2 cores with up to 6 other jobs (sampler query times: experiments/bench_sampler.py).
#   bash experiments/fashion_mnist_docs.sh [RUNS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs/fashion_mnist_cpu}
previous=docs/fashion_mnist_cpu_previous.json
# Random and Entropy of the baselines table, for the later methods' table when not rerun.
baselines=docs/fashion_mnist_cpu_baselines_summary.json
title="Fashion-MNIST, CPU scale: mean ± sample std over trials"
plot() {  # plot OUT_STEM TITLE NAME...
  local stem=$1 subtitle=$2; shift 2
  local args=() labels=() saved=() base=()
  for name in "$@"; do
    if [ -f "$runs/$name/results.jsonl" ]; then args+=("$runs/$name"); labels+=("$name")
    elif grep -q "\"$name\"" "$previous"; then saved+=("$name")
    elif [ "$stem" = fashion_mnist_cpu_beyond2 ] && grep -q "\"$name\"" "$baselines"; then
      base+=("$name")
    else echo "warning: no run of $name in $runs or $previous; left out of $stem" >&2; fi
  done
  if [ ${#saved[@]} -gt 0 ]; then args+=(--summaries "$previous:$(IFS=,; echo "${saved[*]}")"); fi
  if [ ${#base[@]} -gt 0 ]; then args+=(--summaries "$baselines:$(IFS=,; echo "${base[*]}")"); fi
  python experiments/plot.py "${args[@]}" --labels "$(IFS=,; echo "${labels[*]}")" \
    --out "docs/$stem.png" --table "docs/$stem.md" --title "$subtitle" --no-time > /dev/null
}
plot fashion_mnist_cpu "$title" Random CoreSet LearningLoss VAAL FeatProp UncertainGCN CoreGCN
plot fashion_mnist_cpu_baselines "$title" Random Entropy Margin LeastConfidence BADGE CoreSet CoreGCN
plot fashion_mnist_cpu_ablations "Ablations, $title" UncertainGCN UncertainDiscriminator \
  UncertainGCN_layers1 UncertainGCN_layers3 UncertainGCN_eye UncertainGCN_ones
plot fashion_mnist_cpu_beyond2 "Later methods, $title" Random Entropy PowerEntropy BALD \
  PowerBALD TypiClust ProbCover ClusterMargin
