#!/bin/sh
# One-shot MinIO setup (the compose file's minio-init): the three buckets, and a lifecycle rule
# that expires synthetic data after DATA_EXPIRE_DAYS days. Models, reports and uploads are kept.
# Idempotent: running it again changes nothing.
set -eu
mc alias set local "${MINIO_URL:-http://minio:9000}" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
for bucket in "$DATA_BUCKET" "$RESULTS_BUCKET" "$UPLOADS_BUCKET"; do
    mc mb --ignore-existing "local/$bucket"
done
if ! mc ilm rule ls "local/$DATA_BUCKET" 2>/dev/null | grep -q "Expiration"; then
    mc ilm rule add --expire-days "$DATA_EXPIRE_DAYS" "local/$DATA_BUCKET"
fi
mc ilm rule ls "local/$DATA_BUCKET"
