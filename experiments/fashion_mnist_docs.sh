#!/usr/bin/env bash
# Tables and plots of the CPU-scale Fashion-MNIST runs (see run_fashion_mnist_cpu.sh) in docs/.
#   bash experiments/fashion_mnist_docs.sh [RUNS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs/fashion_mnist_cpu}
title="Fashion-MNIST, CPU scale: mean ± sample std over 3 trials"
plot() {  # plot OUT_STEM TITLE NAME...
  local stem=$1 subtitle=$2; shift 2
  local dirs=() labels=()
  for name in "$@"; do dirs+=("$runs/$name"); labels+=("$name"); done
  python experiments/plot.py "${dirs[@]}" --labels "$(IFS=,; echo "${labels[*]}")" \
    --out "docs/$stem.png" --table "docs/$stem.md" --title "$subtitle" > /dev/null
}
plot fashion_mnist_cpu "$title" Random CoreSet LearningLoss VAAL FeatProp UncertainGCN CoreGCN
plot fashion_mnist_cpu_baselines "$title" Random Entropy Margin LeastConfidence BADGE CoreSet CoreGCN
plot fashion_mnist_cpu_ablations "Ablations, $title" UncertainGCN UncertainDiscriminator \
  UncertainGCN_layers1 UncertainGCN_layers3 UncertainGCN_eye UncertainGCN_ones
