#!/usr/bin/env bash
# Assemble what the full-size workers have finished into BENCHMARKS.md and benchmarks/results;
# runs nothing. Cells still missing seeds name the seeds they have.
#   benchmarks/fashion/full/assemble.sh resnet [SETTINGS]   # section "fashion-bench-full"
#   benchmarks/fashion/full/assemble.sh vit [SETTINGS]      # section "fashion-bench-full-vit"
# SETTINGS: comma-separated settings to show (default all the worker's).
set -euo pipefail
cd "$(dirname "$0")/../../.."
source .venv/bin/activate
case "${1:-}" in
  resnet) SECTION=fashion-bench-full OUT=benchmarks/results/fashion-full DEFAULT=W8A8,W4A4,W2A4,W2A3 ;;
  vit) SECTION=fashion-bench-full-vit OUT=benchmarks/results/fashion-full-vit DEFAULT=W8A8,W4A4,W2A4 ;;
  *) echo "usage: $0 resnet|vit [SETTINGS]" >&2; exit 2 ;;
esac
genq bench fashion --models "$1" \
  --sources real,genq,genq_aligned,generated,energy_only,bn_only,inversion,noise \
  --settings "${2:-$DEFAULT}" --seeds 0,1,2 --presets qdrop --num-calib 1024 --no-data-scarce \
  --threads 1 --work-dir "${WORK:-runs/f1024/work}" --cached-only -q \
  --section "$SECTION" --out "$OUT"
