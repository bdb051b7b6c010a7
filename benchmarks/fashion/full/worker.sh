#!/usr/bin/env bash
# A table at the bench's defaults (1024 calibration images, 500 reconstruction steps per block),
# `qdrop`, seeds 0-2, hardest settings first. Each table runs as two single-threaded workers that
# share one resumable work dir, split by calibration source:
#   benchmarks/fashion/full/worker.sh resnet inversion   # model inversion (the slow source)
#   benchmarks/fashion/full/worker.sh resnet rest        # every other source
#   benchmarks/fashion/full/worker.sh vit a              # real data, noise, GenQ
#   benchmarks/fashion/full/worker.sh vit b              # the generator without filters, each filter alone
#   SEEDS=0,1 benchmarks/fashion/full/worker.sh resnet dark   # data-scarce block, dark target, k = 5
# The ViT has no BatchNorm, so no model inversion or BN alignment; it reuses the ResNet's generated
# pools. Settings after the worker's name replace the default order (e.g. `resnet rest W8A8`, to
# balance the workers). Rerunning a worker skips what is already in the work dir; assemble.sh
# writes the table. Progress: one line a setting in progress.txt next to the work dir.
# `resnet dark` runs the data-scarce block of item 8 on the dark target with the look-captioned
# generator (as the reduced dark sections of BENCHMARKS.md): k = 5, the rows without BN alignment,
# at the settings given (default W2A4). Its textual-inversion tokens and pools are per seed, so
# split its workers by seed (SEEDS=0,1 and SEEDS=2), not by order. KSHOT_SHARE=0.5 runs it with
# the k real images filling half of the sets they are added to (see dark.sh).
# A worker sees the runs the others finish, so a second worker on the same setting can start from
# the other end, e.g. `SEEDS=2,1,0 benchmarks/fashion/full/worker.sh resnet rest W4A4`; such a
# worker also takes the sources in reverse order, so that on the seed where the two meet they do
# not run the same sources side by side (a run in progress is not yet visible to the other).
set -uo pipefail
cd "$(dirname "$0")/../../.."
source .venv/bin/activate
WORK=${WORK:-runs/f1024/work}
SEEDS=${SEEDS:-0,1,2}
source benchmarks/fashion/full/dark.sh
case "${1:-} ${2:-}" in
  "resnet inversion") SOURCES=inversion DEFAULT=(W2A4 W2A3 W4A4 W8A8) ;;
  "resnet rest") SOURCES=real,noise,genq,generated,energy_only,bn_only,genq_aligned
    DEFAULT=(W2A4 W2A3 W4A4 W8A8) ;;
  "resnet dark") SOURCES=real DEFAULT=(W2A4) ;;
  "vit a") SOURCES=real,noise,genq DEFAULT=(W2A4 W4A4 W8A8) ;;
  "vit b") SOURCES=generated,energy_only,bn_only DEFAULT=(W2A4 W4A4 W8A8) ;;
  *) echo "usage: $0 resnet inversion|rest|dark [SETTING...]  or  $0 vit a|b [SETTING...]" >&2
    exit 2 ;;
esac
seeds=(${SEEDS//,/ })
if [ "${seeds[0]}" -gt "${seeds[-1]}" ]; then
  IFS=, read -ra parts <<< "$SOURCES"
  SOURCES=$(printf '%s\n' "${parts[@]}" | tac | paste -sd,)
fi
model=$1
worker=$1-$2
shift 2
settings=("$@")
[ ${#settings[@]} -gt 0 ] || settings=("${DEFAULT[@]}")
mkdir -p "$(dirname "$WORK")"
for setting in "${settings[@]}"; do
  if [ "$worker" = resnet-dark ]; then
    dark_args "$setting" "$SEEDS"
    scarce=("${DARK_ARGS[@]}")
    main_seeds=0  # the block's seeds are --data-scarce-seeds; the main table's real row needs one
  else
    scarce=(--no-data-scarce)
    main_seeds=$SEEDS
  fi
  name="$worker-$setting-seeds${SEEDS//,/}"
  [ "$worker" != resnet-dark ] || name+=$(dark_suffix)
  log="$(dirname "$WORK")/$name.log"
  genq bench fashion --models "$model" --sources "$SOURCES" --settings "$setting" --seeds "$main_seeds" \
    --presets qdrop --num-calib 1024 "${scarce[@]}" --threads 1 --work-dir "$WORK" \
    --out "$(dirname "$WORK")/out-$name" --no-benchmarks-md > "$log" 2>&1
  echo "$name rc=$? $(date -u +%FT%TZ)" >> "$(dirname "$WORK")/progress.txt"
done
