"""Ray workers: the dispatcher and the GPU actors that run ``genq_core`` stages."""
