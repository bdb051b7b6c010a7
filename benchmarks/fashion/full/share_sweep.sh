#!/usr/bin/env bash
# The share of the calibration set the k real images fill in the textual-inversion set they are
# added to (`--kshot-share`), on the full-size dark block (k = 5, W2A4 and W2A3, seeds 0-2).
# Runs nothing: it assembles what the workers finished, e.g.
#   DARK_ROWS=textual_inversion_with_k KSHOT_SHARE=0.25 SEEDS=0 \
#     benchmarks/fashion/full/worker.sh resnet dark W2A3 W2A4
# into benchmarks/results/fashion-full-dark-sweep/share$S/ and prints, per share and setting, the
# per-seed differences against the k real images alone and the full real set, then the row at
# each share against each k image used once ("none", the bench's default); all of it also in
# benchmarks/results/fashion-full-dark-sweep/sweep.txt.
set -euo pipefail
cd "$(dirname "$0")/../../.."
source .venv/bin/activate
source benchmarks/fashion/full/dark.sh
OUT=benchmarks/results/fashion-full-dark-sweep
SHARES=${SHARES:-none 0.25 0.5 0.75}
mkdir -p "$OUT"
for share in $SHARES; do
  if [ "$share" = none ]; then unset KSHOT_SHARE; else export KSHOT_SHARE=$share; fi
  DARK_ROWS=textual_inversion_with_k,real_k,real_full dark_args W2A4,W2A3 0,1,2
  genq bench fashion --models resnet --sources real "${DARK_ARGS[@]}" --settings W2A4,W2A3 \
    --seeds 0,1,2 --presets qdrop --num-calib 1024 --threads 1 \
    --work-dir "${WORK:-runs/f1024/work}" --cached-only -q --no-benchmarks-md \
    --out "$OUT/share$share" > /dev/null
  for setting in W2A4 W2A3; do
    echo "# share $share: python benchmarks/fashion/paired_seeds.py $OUT/share$share/fashion_bench.json --setting $setting textual_inversion_with_k:5-real_k:5 textual_inversion_with_k:5-real_full"
    python benchmarks/fashion/paired_seeds.py "$OUT/share$share/fashion_bench.json" \
      --setting "$setting" textual_inversion_with_k:5-real_k:5 textual_inversion_with_k:5-real_full
  done
done > "$OUT/sweep.txt"
results=()
for share in $SHARES; do results+=("$share=$OUT/share$share/fashion_bench.json"); done
echo "# python benchmarks/fashion/share_summary.py textual_inversion_with_k:5 ${results[*]}" >> "$OUT/sweep.txt"
python benchmarks/fashion/share_summary.py textual_inversion_with_k:5 "${results[@]}" >> "$OUT/sweep.txt"
cat "$OUT/sweep.txt"
