#!/usr/bin/env bash
# after each seed's W2A3 block (its pools cached): the plain-prompts+k row at W2A4
source .venv/bin/activate
for s in 0 1 2 3 4 5 6 7 8 9; do
  until grep -q "^seed $s rc" runs/ctl/progress.txt; do sleep 20; done
  genq bench fashion --models resnet --sources real --settings W2A4 --seeds $s --presets qdrop \
    --iters 200 --num-calib 256 --ks 5 --data-scarce-model resnet_dark --data-scarce-settings W2A4 \
    --data-scarce-seeds $s --data-scarce-rows plain_prompts_with_k \
    --generator benchmarks/assets/fashion-sd-looks --threads 1 \
    --work-dir runs/full/work --no-benchmarks-md --out runs/ctl/out-w2a4-$s > runs/ctl/w2a4-$s.log 2>&1
  echo "w2a4 seed $s rc $? $(date)" >> runs/ctl/progress_w2a4.txt
done
