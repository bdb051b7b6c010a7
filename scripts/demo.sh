#!/usr/bin/env bash
# GenQ's main job on the embedded service, from a fresh machine (`make demo` installs first):
#   1. start `genq serve --embedded` (API + one worker + local storage, no other servers),
#   2. upload 1000 real Fashion-MNIST test images as the evaluation set,
#   3. submit examples/service_fashion.yaml and follow its progress,
#   4. download what it made and say where the quantized model and the report are.
# Everything lands in runs/demo/ (the service's data in runs/demo/service/). ~5 CPU minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=${GENQ_DEMO_DIR:-runs/demo}
PORT=${GENQ_DEMO_PORT:-8765}
mkdir -p "$OUT"

# 1. the service, stopped (gracefully: SIGTERM) whatever happens next
"$BIN/genq" serve --embedded --port "$PORT" --data-dir "$OUT/service" >"$OUT/serve.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
export GENQ_SERVER="http://127.0.0.1:$PORT"
for _ in $(seq 1 120); do
    if "$BIN/python" -c "import httpx,sys; sys.exit(httpx.get('$GENQ_SERVER/readyz').status_code != 200)" 2>/dev/null; then
        break
    fi
    kill -0 $server 2>/dev/null || { echo "the service did not start; see $OUT/serve.log" >&2; tail -20 "$OUT/serve.log" >&2; exit 1; }
    sleep 1
done
GENQ_API_KEY=$(cat "$OUT/service/api-key")
export GENQ_API_KEY
echo "service: $GENQ_SERVER (log $OUT/serve.log)"

# 2. the evaluation set
"$BIN/python" examples/fashion_test_set.py "$OUT/fashion-test.zip" --images 1000
eval_id=$("$BIN/genq" upload "$OUT/fashion-test.zip" --kind eval)

# 3. the job, followed to its end
"$BIN/python" - "$eval_id" >"$OUT/job.json" <<'PY'
import json, sys, yaml
body = yaml.safe_load(open("examples/service_fashion.yaml"))
body["evaluation"] = {"eval_upload_id": sys.argv[1]}
print(json.dumps(body))
PY
job_id=$("$BIN/genq" submit "$OUT/job.json" --json | "$BIN/python" -c "import json,sys; print(json.load(sys.stdin)['id'])")
echo "submitted $job_id"
"$BIN/genq" wait "$job_id"

# 4. its artifacts, each checked against the manifest's sha256
"$BIN/genq" download "$job_id" --dest "$OUT/$job_id"
echo
cat "$OUT/$job_id/report.md"
echo
echo "quantized model: $OUT/$job_id/model/ (model.safetensors + encodings.json)"
echo "report:          $OUT/$job_id/report.md and report.json"
echo "calibration set: $OUT/$job_id/synthetic/dataset.tar"
