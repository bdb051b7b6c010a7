#!/usr/bin/env bash
# Assemble what the full-size workers have finished into BENCHMARKS.md and benchmarks/results;
# runs nothing. Cells still missing seeds name the seeds they have.
#   benchmarks/fashion/full/assemble.sh resnet [SETTINGS]   # section "fashion-bench-full"
#   benchmarks/fashion/full/assemble.sh vit [SETTINGS]      # section "fashion-bench-full-vit"
#   benchmarks/fashion/full/assemble.sh dark [SETTINGS]     # section "fashion-bench-full-dark"
# `dark` also writes the block's per-seed differences to $OUT/paired_seeds.txt. With KSHOT_SHARE
# set, `dark` writes the runs with that share (folder named with "-share$KSHOT_SHARE", section the same without the dot).
# DARK_SEEDS (comma-separated, default 0,1,2) replaces the block's seeds; the folder and section
# are then named with "-seeds" and the seeds, e.g. -seeds012345.
# SETTINGS: comma-separated settings to show (default all the worker's).
set -euo pipefail
cd "$(dirname "$0")/../../.."
source .venv/bin/activate
SOURCES=real,genq,genq_aligned,generated,energy_only,bn_only,inversion,noise
case "${1:-}" in
  resnet) SECTION=fashion-bench-full OUT=benchmarks/results/fashion-full DEFAULT=W8A8,W4A4,W2A4,W2A3 ;;
  vit) SECTION=fashion-bench-full-vit OUT=benchmarks/results/fashion-full-vit DEFAULT=W8A8,W4A4,W2A4 ;;
  dark) SECTION=fashion-bench-full-dark OUT=benchmarks/results/fashion-full-dark DEFAULT=W2A4 ;;
  *) echo "usage: $0 resnet|vit|dark [SETTINGS]" >&2; exit 2 ;;
esac
settings=${2:-$DEFAULT}
DARK_KS=${DARK_KS:-}
if [ "$1" = dark ]; then
  source benchmarks/fashion/full/dark.sh
  DARK_SEEDS=${DARK_SEEDS:-0,1,2}
  suffix=$(dark_suffix)
  [ "$DARK_SEEDS" = 0,1,2 ] || suffix+="-seeds${DARK_SEEDS//,/}"
  SECTION+=$(tr -d . <<< "$suffix")  # a section name has no dots: share0.5 -> share05
  OUT+=$suffix
  dark_args "$settings" "$DARK_SEEDS"
  DARK_KS=${DARK_KS:-5}
  args=(--models resnet --sources real "${DARK_ARGS[@]}")
else
  args=(--models "$1" --sources "$SOURCES" --no-data-scarce)
fi
genq bench fashion "${args[@]}" --settings "$settings" --seeds 0,1,2 --presets qdrop \
  --num-calib 1024 --threads 1 --work-dir "${WORK:-runs/f1024/work}" --cached-only -q \
  --section "$SECTION" --out "$OUT"
if [ "$1" = dark ]; then
  P=benchmarks/fashion/paired_seeds.py
  PAIRS=""
  for k in ${DARK_KS//,/ }; do
    PAIRS+=" textual_inversion:$k-plain_prompts textual_inversion:$k-real_k:$k
      textual_inversion_with_k:$k-real_k:$k textual_inversion_with_k:$k-plain_prompts_with_k:$k
      textual_inversion_with_k:$k-plain_prompts plain_prompts_with_k:$k-real_k:$k
      real_k:$k-real_full"
  done
  PAIRS+=" plain_prompts-real_full"
  for setting in ${settings//,/ }; do
    echo "# python $P $OUT/fashion_bench.json --setting $setting" $PAIRS
    python $P "$OUT/fashion_bench.json" --setting "$setting" $PAIRS
  done > "$OUT/paired_seeds.txt"
  cat "$OUT/paired_seeds.txt"
fi
