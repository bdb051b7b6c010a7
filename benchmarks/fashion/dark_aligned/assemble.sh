#!/usr/bin/env bash
# assemble the BN-aligned data-scarce rows (seeds 0-9, W2A4 and W2A3) and the main table's
# clamped "GenQ + BN alignment" rerun (seeds 0-2); per-seed differences against the earlier rows
set -euo pipefail
source .venv/bin/activate
SEEDS=0,1,2,3,4,5,6,7,8,9
ROWS=textual_inversion_aligned,textual_inversion_with_k_aligned,plain_prompts_with_k_aligned
A=benchmarks/results/fashion-dark-aligned
genq bench fashion --models resnet --sources real --settings W2A4 --seeds $SEEDS --presets qdrop \
  --iters 200 --num-calib 256 --ks 5 --data-scarce-model resnet_dark \
  --data-scarce-settings W2A4,W2A3 --data-scarce-seeds $SEEDS --data-scarce-rows $ROWS \
  --generator benchmarks/assets/fashion-sd-looks --threads 1 --work-dir runs/full/work \
  --cached-only -q --section fashion-bench-dark-aligned --out $A
P=benchmarks/fashion/paired_seeds.py
PAIRS="textual_inversion_aligned:5-real_k:5 textual_inversion_aligned:5-plain_prompts \
textual_inversion_aligned:5-textual_inversion:5 textual_inversion_aligned:5-real_full \
textual_inversion_with_k_aligned:5-real_k:5 textual_inversion_with_k_aligned:5-textual_inversion_with_k:5 \
textual_inversion_with_k_aligned:5-plain_prompts_with_k_aligned:5 \
textual_inversion_with_k_aligned:5-textual_inversion_aligned:5 \
plain_prompts_with_k_aligned:5-plain_prompts_with_k:5 plain_prompts_with_k_aligned:5-real_k:5"
W4="benchmarks/results/fashion-dark-k5/fashion_bench.json --also benchmarks/results/fashion-dark-k5-control/fashion_bench.json --also $A/fashion_bench.json"
W3="benchmarks/results/fashion-dark-w2a3/fashion_bench.json --also $A/fashion_bench.json"
{
  echo "# python $P $W4 --setting W2A4 $PAIRS"; python $P $W4 --setting W2A4 $PAIRS
  echo "# python $P $W3 --setting W2A3 $PAIRS"; python $P $W3 --setting W2A3 $PAIRS
} > $A/paired_seeds.txt
cat $A/paired_seeds.txt
M=benchmarks/results/fashion-aligned-clamped
genq bench fashion --models resnet --sources real,genq,genq_aligned --settings W2A4,W2A3 \
  --seeds 0,1,2 --presets qdrop --iters 200 --num-calib 256 --no-data-scarce --threads 1 \
  --work-dir runs/main-al/work --cached-only -q --section fashion-bench-aligned-clamped --out $M
# every data-scarce row at W2A3 (all cached in runs/full/work): the D_BN of the unaligned sets
genq bench fashion --models resnet --sources real --settings W2A4 --seeds $SEEDS --presets qdrop \
  --iters 200 --num-calib 256 --ks 5 --data-scarce-model resnet_dark --data-scarce-settings W2A3 \
  --data-scarce-seeds $SEEDS --generator benchmarks/assets/fashion-sd-looks --threads 1 \
  --work-dir runs/full/work --cached-only -q --no-benchmarks-md --out $A/w2a3-all-rows
