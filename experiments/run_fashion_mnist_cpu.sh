#!/usr/bin/env bash
# The CPU-scale comparison (docs/protocol.md §9) on the real Fashion-MNIST: every sampler and the
# GCN ablations, 3 trials each, then the tables and plots under docs/. Resumable: rerun to continue
# after an interruption (each run is its own workdir).
#   bash experiments/run_fashion_mnist_cpu.sh [RUNS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs/fashion_mnist_cpu}
run() {  # run NAME [--config.sampler.x=y ...]
  local name=$1; shift
  /usr/bin/time -f "$name wall %e s" python experiments/main.py \
    --config=configs/fashion_mnist_cpu.py --workdir="$runs/$name" "$@"
}
for sampler in Random CoreSet UncertainGCN CoreGCN LearningLoss VAAL FeatProp \
               Entropy Margin LeastConfidence BADGE UncertainDiscriminator; do
  run "$sampler" --config.sampler.name="$sampler"
done
run UncertainGCN_layers1 --config.sampler.name=UncertainGCN --config.sampler.num_layers=1
run UncertainGCN_layers3 --config.sampler.name=UncertainGCN --config.sampler.num_layers=3
run UncertainGCN_eye --config.sampler.name=UncertainGCN --config.sampler.adjacency=identity
run UncertainGCN_ones --config.sampler.name=UncertainGCN --config.sampler.adjacency=ones
# Beyond the paper 2: later methods (BALD's learner has a dropout before its head).
for sampler in PowerEntropy TypiClust ProbCover ClusterMargin; do
  run "$sampler" --config.sampler.name="$sampler"
done
for sampler in BALD PowerBALD; do
  run "$sampler" --config.sampler.name="$sampler" --config.learner.mc_dropout=0.5
done
bash experiments/fashion_mnist_docs.sh "$runs"
