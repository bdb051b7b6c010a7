#!/usr/bin/env bash
# worker: seeds given as args; the main table's real, GenQ and GenQ + BN alignment rows at W2A4
# and W2A3 with the clamped alignment (fresh work dir: the GenQ sets are made again)
source .venv/bin/activate
mkdir -p runs/main-al
for s in "$@"; do
  genq bench fashion --models resnet --sources real,genq,genq_aligned --settings W2A4,W2A3 \
    --seeds $s --presets qdrop --iters 200 --num-calib 256 --no-data-scarce --threads 1 \
    --work-dir runs/main-al/work --no-benchmarks-md --out runs/main-al/out-$s \
    > runs/main-al/seed-$s.log 2>&1
  echo "seed $s rc $? $(date)" >> runs/main-al/progress.txt
done
