#!/usr/bin/env bash
# Assemble what the full-size ResNet workers (resnet.sh) have finished into BENCHMARKS.md's
# "fashion-bench-full" section and benchmarks/results/fashion-full; runs nothing. Cells still
# missing seeds name the seeds they have. Settings to show: the arguments (default all four).
set -euo pipefail
cd "$(dirname "$0")/../../.."
source .venv/bin/activate
SETTINGS=${1:-W8A8,W4A4,W2A4,W2A3}
genq bench fashion --models resnet \
  --sources real,genq,genq_aligned,generated,energy_only,bn_only,inversion,noise \
  --settings "$SETTINGS" --seeds 0,1,2 --presets qdrop --num-calib 1024 --no-data-scarce \
  --threads 1 --work-dir "${WORK:-runs/f1024/work}" --cached-only -q \
  --section fashion-bench-full --out benchmarks/results/fashion-full
