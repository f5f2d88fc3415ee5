#!/usr/bin/env bash
# The CPU-scale comparison of protocol §9 on the real Fashion-MNIST: the four samplers, 3 trials each,
# then one table and one plot under docs/. Resumable: rerun to continue after an interruption.
#   bash experiments/run_fashion_mnist_cpu.sh [RUNS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs/fashion_mnist_cpu}
for sampler in Random CoreSet UncertainGCN CoreGCN; do
  /usr/bin/time -f "$sampler wall %e s" python experiments/main.py \
    --config=configs/fashion_mnist_cpu.py --config.sampler.name="$sampler" \
    --workdir="$runs/$sampler"
done
python experiments/plot.py "$runs"/Random "$runs"/CoreSet "$runs"/UncertainGCN "$runs"/CoreGCN \
  --out docs/fashion_mnist_cpu.png --table docs/fashion_mnist_cpu.md \
  --title "Fashion-MNIST (CPU scale, protocol §9): mean ± std over 3 trials"
