#!/usr/bin/env bash
# The ResNet main table at the bench's defaults (1024 calibration images, 500 reconstruction steps
# per block), `qdrop`, seeds 0-2, W2A4 W2A3 W4A4 W8A8 (in that order, so that the hardest settings
# finish first). Two single-threaded workers share one resumable work dir:
#   benchmarks/fashion/full/resnet.sh inversion   # model inversion (the slow source)
#   benchmarks/fashion/full/resnet.sh rest        # every other source
# Settings after the worker's name replace the default order (e.g. `rest W8A8`, to balance the
# workers). Rerunning a worker skips what is already in the work dir; assemble.sh writes the table.
set -uo pipefail
cd "$(dirname "$0")/../../.."
source .venv/bin/activate
WORK=${WORK:-runs/f1024/work}
case "${1:-}" in
  inversion) SOURCES=inversion ;;
  rest) SOURCES=real,noise,genq,generated,energy_only,bn_only,genq_aligned ;;
  *) echo "usage: $0 inversion|rest [SETTING...]" >&2; exit 2 ;;
esac
mkdir -p "$(dirname "$WORK")"
worker=$1
shift
settings=("$@")
[ ${#settings[@]} -gt 0 ] || settings=(W2A4 W2A3 W4A4 W8A8)
for setting in "${settings[@]}"; do
  log="$(dirname "$WORK")/$worker-$setting.log"
  genq bench fashion --models resnet --sources "$SOURCES" --settings "$setting" --seeds 0,1,2 \
    --presets qdrop --num-calib 1024 --no-data-scarce --threads 1 --work-dir "$WORK" \
    --out "$(dirname "$WORK")/out-$worker-$setting" --no-benchmarks-md > "$log" 2>&1
  echo "$worker $setting rc=$? $(date -u +%FT%TZ)" >> "$(dirname "$WORK")/progress.txt"
done
