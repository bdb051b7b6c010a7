# Sourced by worker.sh and assemble.sh: the data-scarce block on the dark target at full size.
# dark_args SETTINGS SEEDS sets the array DARK_ARGS to its `genq bench fashion` arguments.
# With KSHOT_SHARE set (e.g. 0.5), the rows that add the k real images to a generated set have
# them fill that share of the calibration set (`--kshot-share`); the other rows are the same runs.
# DARK_ROWS (comma-separated) replaces the rows that run, e.g. to sweep the share on one row;
# DARK_KS replaces k (default 5).
dark_args() {
  DARK_ARGS=(--ks "${DARK_KS:-5}" --data-scarce-model resnet_dark --data-scarce-settings "$1"
    --data-scarce-seeds "$2"
    --data-scarce-rows "${DARK_ROWS:-textual_inversion,textual_inversion_with_k,plain_prompts,plain_prompts_with_k,real_k,real_full}"
    --generator benchmarks/assets/fashion-sd-looks)
  if [ -n "${KSHOT_SHARE:-}" ]; then
    DARK_ARGS+=(--kshot-share "$KSHOT_SHARE")
  fi
}
# the name suffix of a DARK_KS or KSHOT_SHARE run's outputs ("" without either), e.g. -k1-share0.5
dark_suffix() {
  local suffix=""
  if [ -n "${DARK_KS:-}" ]; then suffix+="-k${DARK_KS//,/}"; fi
  if [ -n "${KSHOT_SHARE:-}" ]; then suffix+="-share$KSHOT_SHARE"; fi
  echo "$suffix"
}
