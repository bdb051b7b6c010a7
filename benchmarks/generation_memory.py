"""Peak memory of streaming generation as the image count grows (it should stay flat).

Each count runs in a fresh process (peak RSS is per process) with the tiny random pipeline:

    python benchmarks/generation_memory.py --counts 32 256 1024
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--counts", type=int, nargs="+", default=[32, 256, 1024])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(_generate(args.child, args.batch_size)))
        return
    rows = []
    for count in args.counts:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(count), "--batch-size", str(args.batch_size)],
            check=True,
            capture_output=True,
            text=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| images | peak RSS (MiB) | RSS growth during generation (MiB) | seconds |")
    print("|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['images']} | {row['peak_mib']:.0f} | {row['growth_mib']:.0f} | "
            f"{row['seconds']:.1f} |"
        )


def _generate(count: int, batch_size: int) -> dict[str, float]:
    import torch

    from genq_core.generate import GenerationConfig, build_specs, generate_images
    from genq_core.generate.tiny import build_tiny_pipeline
    from genq_core.storage import LocalStorage

    torch.set_num_threads(1)
    pipe = build_tiny_pipeline(sample_size=32)
    config = GenerationConfig(num_per_class=count // 4, steps=2, batch_size=batch_size)
    specs = build_specs(
        ["a", "b", "c", "d"], config.num_per_class, config.templates, config.adjectives, 0
    )
    with tempfile.TemporaryDirectory() as folder:
        # warm up one batch so lazily allocated buffers are counted before the baseline
        generate_images(pipe, specs[:batch_size], config, LocalStorage(folder), "warm")
        before = _peak_mib()
        started = time.perf_counter()
        generate_images(pipe, specs, config, LocalStorage(folder), "run")
        seconds = time.perf_counter() - started
    peak = _peak_mib()
    return {"images": len(specs), "peak_mib": peak, "growth_mib": peak - before, "seconds": seconds}


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


if __name__ == "__main__":
    main()
