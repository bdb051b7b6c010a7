#!/usr/bin/env bash
# worker: seeds given as args, W2A3 data-scarce block with the plain-prompts+k control row
source .venv/bin/activate
for s in "$@"; do
  genq bench fashion --models resnet --sources real --settings W2A4 --seeds $s --presets qdrop \
    --iters 200 --num-calib 256 --ks 5 --data-scarce-model resnet_dark --data-scarce-settings W2A3 \
    --data-scarce-seeds $s --generator benchmarks/assets/fashion-sd-looks --threads 1 \
    --work-dir runs/full/work --no-benchmarks-md --out runs/ctl/out-w2a3-$s > runs/ctl/w2a3-$s.log 2>&1
  echo "seed $s rc $? $(date)" >> runs/ctl/progress.txt
done
