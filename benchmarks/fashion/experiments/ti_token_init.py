"""Experiment: does a new token at its initial embedding already break the data-scarce prompts?

Adds the benchmark's style token to the shipped generator through textual inversion with one step
at a negligible learning rate (so the token keeps its initial embedding, the word "photo"), then
generates 4 images per class for each prompt form and prints how many the BN ResNet classifies as
the prompted class. Run from the repository root:

    python benchmarks/fashion/experiments/ti_token_init.py

Results: benchmarks/results/experiments/ti_token_init.log
"""

from __future__ import annotations

from typing import Any

import torch

from genq_core.bench.fashion_bench import (
    CLASS_NAMES,
    STYLE_TOKEN,
    BenchConfig,
    _FashionData,
    _generated_preprocessing,
    _load_classifier,
)
from genq_core.generate.pipeline import load_generator
from genq_core.inversion import TextualInversionConfig, apply_tokens, learn_tokens

TEMPLATES = (
    "a photo of a {cls}",
    "a photo of a {token} {cls}",
    "a photo of a {cls} {token}",
    "a photo of a photo {cls}",
)
PER_CLASS = 4


def main() -> None:
    torch.set_num_threads(2)
    config = BenchConfig(models=("resnet",))
    classifier = _load_classifier("resnet", config, []).model
    shots = _FashionData.load(config).kshot_pil(1, 2, "shifted")
    pipe: Any = load_generator(config.generator_path, torch.device("cpu"), scheduler="ddim")
    pipe.set_progress_bar_config(disable=True)
    untrained = TextualInversionConfig(
        steps=1, lr=1e-9, style_token=STYLE_TOKEN, captions=("a photo of a {token} {cls}",)
    )
    apply_tokens(pipe, learn_tokens(pipe, shots, list(range(10)), CLASS_NAMES, untrained))
    transform = _generated_preprocessing(pipe).transform()
    labels = torch.arange(len(CLASS_NAMES)).repeat_interleave(PER_CLASS)
    for template in TEMPLATES:
        prompts = [template.format(cls=c, token=STYLE_TOKEN) for c in CLASS_NAMES]
        out = pipe(
            prompt=[p for p in prompts for _ in range(PER_CLASS)],
            num_inference_steps=10,
            guidance_scale=5.0,
            generator=[torch.Generator().manual_seed(i) for i in range(len(labels))],
        )
        images = torch.stack([transform(image) for image in out.images])
        with torch.no_grad():
            predicted = classifier(images).argmax(1)
        agree = int((predicted == labels).sum())
        counts = torch.bincount(predicted, minlength=len(CLASS_NAMES)).tolist()
        print(f"{template!r}: {agree} of {len(labels)} as prompted; predicted classes {counts}")


if __name__ == "__main__":
    main()
