#!/usr/bin/env bash
# The ViT main table at the bench's defaults (1024 calibration images, 500 reconstruction steps per
# block), `qdrop`, seeds 0-2, W2A4 W4A4 W8A8 (the hardest first). Without BatchNorm there is no
# model inversion and no BN alignment, so the six other sources go to two single-threaded workers
# that share one resumable work dir (the ResNet's, whose generated pools they reuse):
#   benchmarks/fashion/full/vit.sh a   # real data, noise, GenQ
#   benchmarks/fashion/full/vit.sh b   # the generator without filters, each filter alone
# Settings after the worker's name replace the default order. Rerunning a worker skips what is
# already in the work dir; `assemble.sh vit` writes the table.
set -uo pipefail
cd "$(dirname "$0")/../../.."
source .venv/bin/activate
WORK=${WORK:-runs/f1024/work}
case "${1:-}" in
  a) SOURCES=real,noise,genq ;;
  b) SOURCES=generated,energy_only,bn_only ;;
  *) echo "usage: $0 a|b [SETTING...]" >&2; exit 2 ;;
esac
mkdir -p "$(dirname "$WORK")"
worker=vit-$1
shift
settings=("$@")
[ ${#settings[@]} -gt 0 ] || settings=(W2A4 W4A4 W8A8)
for setting in "${settings[@]}"; do
  log="$(dirname "$WORK")/$worker-$setting.log"
  genq bench fashion --models vit --sources "$SOURCES" --settings "$setting" --seeds 0,1,2 \
    --presets qdrop --num-calib 1024 --no-data-scarce --threads 1 --work-dir "$WORK" \
    --out "$(dirname "$WORK")/out-$worker-$setting" --no-benchmarks-md > "$log" 2>&1
  echo "$worker $setting rc=$? $(date -u +%FT%TZ)" >> "$(dirname "$WORK")/progress.txt"
done
