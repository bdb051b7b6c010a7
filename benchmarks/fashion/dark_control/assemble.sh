#!/usr/bin/env bash
# assemble the W2A3 block (all rows, seeds 0-9) and the W2A4 control row; per-seed differences
set -euo pipefail
source .venv/bin/activate
SEEDS=0,1,2,3,4,5,6,7,8,9
COMMON="--models resnet --sources real --settings W2A4 --seeds $SEEDS --presets qdrop --iters 200 --num-calib 256 --ks 5 --data-scarce-model resnet_dark --data-scarce-seeds $SEEDS --generator benchmarks/assets/fashion-sd-looks --threads 1 --work-dir runs/full/work --cached-only -q"
genq bench fashion $COMMON --data-scarce-settings W2A3 --section fashion-bench-dark-w2a3 --out benchmarks/results/fashion-dark-w2a3
genq bench fashion $COMMON --data-scarce-settings W2A4 --data-scarce-rows plain_prompts_with_k --section fashion-bench-dark-k5-control --out benchmarks/results/fashion-dark-k5-control
P=benchmarks/fashion/paired_seeds.py
W3=benchmarks/results/fashion-dark-w2a3
PAIRS3="textual_inversion:5-plain_prompts textual_inversion:5-real_k:5 textual_inversion_with_k:5-real_k:5 textual_inversion_with_k:5-plain_prompts textual_inversion_with_k:5-textual_inversion:5 real_k:5-real_full plain_prompts-real_full textual_inversion_with_k:5-plain_prompts_with_k:5 plain_prompts_with_k:5-real_k:5 plain_prompts_with_k:5-plain_prompts plain_prompts_with_k:5-real_full"
{ echo "# python $P $W3/fashion_bench.json --setting W2A3 $PAIRS3"; python $P $W3/fashion_bench.json --setting W2A3 $PAIRS3; } > $W3/paired_seeds.txt
W4=benchmarks/results/fashion-dark-k5
C=benchmarks/results/fashion-dark-k5-control
PAIRS4="textual_inversion_with_k:5-plain_prompts_with_k:5 plain_prompts_with_k:5-real_k:5 plain_prompts_with_k:5-plain_prompts plain_prompts_with_k:5-real_full textual_inversion:5-plain_prompts_with_k:5"
{ echo "# python $P $W4/fashion_bench.json --also $C/fashion_bench.json $PAIRS4"; python $P $W4/fashion_bench.json --also $C/fashion_bench.json $PAIRS4; } > $C/paired_seeds.txt
cat $W3/paired_seeds.txt $C/paired_seeds.txt
