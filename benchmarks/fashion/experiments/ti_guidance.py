"""Experiment: does classifier-free guidance push the textual-inversion token past its target?

On ``resnet_dark`` with ``fashion-sd-looks``, the data-scarce block's token sets come out darker
than the k images they were learned on (garment intensity 0.41 against 0.52 at k = 5, guidance 5)
and their ``D_BN`` against the target rises above plain prompts'. Guidance extrapolates from the
unconditional prediction towards the prompt, so it may exaggerate whatever the token adds. This
script learns the block's token exactly as the bench does (the same k images, steps, lr and seed),
then generates ``--per-class`` images per class with the token prompts and with plain prompts at
each guidance scale, and prints per set: garment intensity (mean of pixels above 0.1), ``D_BN``
against the target's BatchNorm statistics and the mean free energy under the target (both lower =
closer to the target's training data). Nothing here looks at test accuracy. Run from the
repository root:

    python benchmarks/fashion/experiments/ti_guidance.py --seed 0 --guidance 1.5,2,3,5

Results: benchmarks/results/experiments/ti_guidance.log
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from PIL import Image

from genq_core.bench.fashion_bench import (
    DATA_SCARCE_TEMPLATES,
    STYLE_TOKEN,
    BenchConfig,
    _FashionData,
    _generated_preprocessing,
    _load_classifier,
)
from genq_core.bench.fashion_mnist import CLASS_NAMES, MEAN, STD, garment_intensity
from genq_core.filters import bn_distance, energy_scores
from genq_core.generate.pipeline import load_generator
from genq_core.inversion import TextualInversionConfig, apply_tokens, learn_tokens


def generate(
    pipe: Any, token: str | None, per_class: int, guidance: float, seed: int
) -> list[Image.Image]:
    """``per_class`` images per class, class by class, the block's templates in turn."""
    templates = DATA_SCARCE_TEMPLATES
    prompts = [
        " ".join(templates[j % len(templates)].format(cls=cls, token=token or "").split())
        for cls in CLASS_NAMES
        for j in range(per_class)
    ]
    images: list[Image.Image] = []
    for start in range(0, len(prompts), 32):
        batch = prompts[start : start + 32]
        out = pipe(
            prompt=batch,
            num_inference_steps=10,
            guidance_scale=guidance,
            generator=[
                torch.Generator().manual_seed(seed * 100_000 + start + i) for i in range(len(batch))
            ],
        )
        images.extend(out.images)
    return images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=16)
    parser.add_argument("--guidance", default="1.5,2,3,5")
    parser.add_argument("--generator", default="benchmarks/assets/fashion-sd-looks")
    parser.add_argument("--model", default="resnet_dark")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = BenchConfig(models=("resnet",), data_scarce_model=args.model)
    target = _load_classifier(args.model, config, [])
    data = _FashionData.load(config)
    pipe: Any = load_generator(args.generator, torch.device("cpu"), scheduler="ddim")
    pipe.set_progress_bar_config(disable=True)
    transform = _generated_preprocessing(pipe).transform()

    def report(name: str, guidance: float | None, images: torch.Tensor) -> None:
        pixels = images * STD[0] + MEAN[0]
        row = {
            "seed": args.seed,
            "set": name,
            "guidance": guidance,
            "images": int(images.shape[0]),
            "garment_intensity": round(float(garment_intensity(pixels).mean()), 3),
            "bn_distance": round(bn_distance(target.model, images), 3),
            "mean_energy": round(float(energy_scores(target.model, images).mean()), 3),
        }
        print(json.dumps(row), flush=True)

    shots = data.kshot_pil(args.k, args.seed, target.domain)
    report(f"real k={args.k}", None, torch.stack([transform(i) for i in shots]))
    guidances = [float(g) for g in args.guidance.split(",")]
    for guidance in guidances:
        plain = generate(pipe, None, args.per_class, guidance, args.seed)
        report("plain prompts", guidance, torch.stack([transform(i) for i in plain]))
    inversion = TextualInversionConfig(
        steps=config.textual_inversion_steps,
        lr=config.textual_inversion_lr,
        style_token=STYLE_TOKEN,
        captions=DATA_SCARCE_TEMPLATES,
        seed=args.seed,
    )
    labels = [c for c in range(len(CLASS_NAMES)) for _ in range(args.k)]
    apply_tokens(pipe, learn_tokens(pipe, shots, labels, list(CLASS_NAMES), inversion))
    for guidance in guidances:
        tokened = generate(pipe, STYLE_TOKEN, args.per_class, guidance, args.seed)
        report(f"token k={args.k}", guidance, torch.stack([transform(i) for i in tokened]))


if __name__ == "__main__":
    main()
