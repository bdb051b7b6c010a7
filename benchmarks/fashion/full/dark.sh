# Sourced by worker.sh and assemble.sh: the data-scarce block on the dark target at full size.
# dark_args SETTINGS SEEDS sets the array DARK_ARGS to its `genq bench fashion` arguments.
dark_args() {
  DARK_ARGS=(--ks 5 --data-scarce-model resnet_dark --data-scarce-settings "$1"
    --data-scarce-seeds "$2"
    --data-scarce-rows textual_inversion,textual_inversion_with_k,plain_prompts,plain_prompts_with_k,real_k,real_full
    --generator benchmarks/assets/fashion-sd-looks)
}
