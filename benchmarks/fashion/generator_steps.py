"""How the benchmark generator's label agreement and speed depend on the number of DDIM steps.

For each step count, generates ``--per-class`` images per class with the shipped generator
(``benchmarks/assets/fashion-sd``) and the benchmark's prompts, and prints how often the
committed BN CNN classifies them as the prompted class and the seconds per image. This is the
measurement behind ``BenchConfig.steps``.

    python benchmarks/fashion/generator_steps.py --steps 10 25 --per-class 30 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from safetensors.torch import load_file

from genq_core.bench.classifiers import BNConvNet
from genq_core.bench.generator import measure_agreement
from genq_core.bench.runinfo import cpu_name
from genq_core.generate.pipeline import load_generator

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25])
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--generator", type=Path, default=ASSETS / "fashion-sd")
    parser.add_argument("--classifier", type=Path, default=ASSETS / "bn_cnn_fmnist.safetensors")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    pipe = load_generator(args.generator, device, scheduler=args.scheduler)
    if not isinstance(pipe, StableDiffusionPipeline):
        raise SystemExit(f"{args.generator} holds a {type(pipe).__name__}, not Stable Diffusion")
    classifier = BNConvNet()
    classifier.load_state_dict(load_file(str(args.classifier)))
    classifier.eval()
    print(f"# {cpu_name()}, {args.threads} thread(s), guidance {args.guidance:g}")
    for steps in args.steps:
        clock = time.perf_counter()
        agreement = measure_agreement(
            pipe,
            classifier,
            num_per_class=args.per_class,
            guidance_scale=args.guidance,
            steps=steps,
            seed=args.seed,
        )
        seconds = time.perf_counter() - clock
        images = agreement.labels.numel()
        row = {
            "steps": steps,
            "images": images,
            "agreement": round(100.0 * agreement.overall, 2),
            "seconds_per_image": round(seconds / images, 4),
        }
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
