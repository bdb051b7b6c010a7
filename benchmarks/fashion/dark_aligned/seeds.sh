#!/usr/bin/env bash
# worker: seeds given as args; the BN-aligned data-scarce rows at W2A4 and W2A3 on the dark block
# (its pools, tokens and the unaligned sets are the ones the dark_control scripts made)
source .venv/bin/activate
ROWS=textual_inversion_aligned,textual_inversion_with_k_aligned,plain_prompts_with_k_aligned
for s in "$@"; do
  genq bench fashion --models resnet --sources real --settings W2A4 --seeds $s --presets qdrop \
    --iters 200 --num-calib 256 --ks 5 --data-scarce-model resnet_dark \
    --data-scarce-settings W2A4,W2A3 --data-scarce-seeds $s --data-scarce-rows $ROWS \
    --generator benchmarks/assets/fashion-sd-looks --threads 1 \
    --work-dir runs/full/work --no-benchmarks-md --out runs/al/out-$s > runs/al/seed-$s.log 2>&1
  echo "seed $s rc $? $(date)" >> runs/al/progress.txt
done
