"""Experiment: does textual inversion steer this generator towards a style it can produce?

The data-scarce block's target (rotated, shrunk, inverted) is a style the generator never saw,
and the learned token collapses to bags. This script learns the same token (500 steps, lr 5e-3,
the benchmark's data-scarce captions) on k = 5 real images per class from the split's k-shot pool
(seed 2) in two styles, generates 10 images per class with the token and with plain prompts
(guidance 5, 10 DDIM steps), and prints for each set (and for plain prompts with each of four
adjectives of the generator's training captions: does a word steer the look at all?):

* agreement: the float BN ResNet (trained on the original images) classifies the image as the
  prompted class; measured on the original-domain model, so it is meaningful for ``dark`` only;
* foreground: mean over images of the mean intensity of the garment pixels (> 0.1), the
  property ``dark`` changes;
* border: mean intensity of the outer 2-pixel frame (0 = black background), what ``shifted``
  changes.

Styles: ``dark`` squares every pixel (x -> x ** 2: darker garments, black background kept; the
script also prints how many of the generator's training images are that dark already); ``shifted`` is the benchmark's ``shift_images``. Saves a
grid per style (rows: the k images, plain prompts, token prompts; one column per class). Run
from the repository root:

    python benchmarks/fashion/experiments/ti_in_support.py

Results: benchmarks/results/experiments/ti_in_support.log and ti_in_support_<style>.png
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from genq_core.bench.classifiers import darken_images, evaluate_top1, shift_images
from genq_core.bench.fashion_bench import (
    DATA_SCARCE_TEMPLATES,
    STYLE_TOKEN,
    BenchConfig,
    _FashionData,
    _generated_preprocessing,
    _load_classifier,
)
from genq_core.bench.fashion_mnist import CLASS_NAMES, garment_intensity, to_float_images
from genq_core.generate.pipeline import load_generator
from genq_core.inversion import TextualInversionConfig, apply_tokens, learn_tokens

K, SEED, PER_CLASS = 5, 2, 10
OUT = Path("benchmarks/results/experiments")
STYLES = {"dark": darken_images, "shifted": shift_images}
ADJECTIVES = ("dark", "bright", "small", "large")


def shot_pixels(data: _FashionData) -> torch.Tensor:
    """The k-shot images, float [10 K, 1, 28, 28] in [0, 1]."""
    return to_float_images(data.train_images[data.kshot_indices(K, SEED)])


def kshot_images(data: _FashionData, style: str) -> list[Image.Image]:
    """The k-shot images in ``style``, 32x32 grayscale as the generator sees them."""
    pixels = STYLES[style](torch.nn.functional.pad(shot_pixels(data), (2, 2, 2, 2)))
    gray = (pixels[:, 0] * 255).round().clamp(0, 255).to(torch.uint8)
    return [Image.fromarray(image.numpy()) for image in gray]


def measures(images: list[Image.Image], classifier: torch.nn.Module, pipe: Any) -> str:
    """Agreement with the prompted class, foreground and border intensity of class-ordered images."""
    pixels = torch.stack(
        [torch.from_numpy(np.asarray(i.convert("L"), dtype=np.float32)) / 255 for i in images]
    )
    foreground = garment_intensity(pixels[:, None]).mean()
    frame = torch.ones_like(pixels[0], dtype=torch.bool)
    frame[2:-2, 2:-2] = False
    border = pixels[:, frame].mean()
    transform = _generated_preprocessing(pipe).transform()
    per_class = len(images) // len(CLASS_NAMES)
    labels = torch.arange(len(CLASS_NAMES)).repeat_interleave(per_class)
    agree = evaluate_top1(classifier, torch.stack([transform(i) for i in images]), labels)
    return f"agreement {agree:5.1f}%  foreground {foreground:.3f}  border {border:.3f}"


def generate(pipe: Any, templates: tuple[str, ...], token: str | None) -> list[Image.Image]:
    """PER_CLASS images per class, class by class, the templates in turn."""
    prompts = [
        templates[j % len(templates)].format(cls=cls, token=token or "")
        for cls in CLASS_NAMES
        for j in range(PER_CLASS)
    ]
    prompts = [" ".join(p.split()) for p in prompts]
    out = pipe(
        prompt=prompts,
        num_inference_steps=10,
        guidance_scale=5.0,
        generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))],
    )
    return list(out.images)


def grid(rows: list[list[Image.Image]], path: Path) -> None:
    """One row per list, one column per class (its first image), 32 px cells, 2 px gaps."""
    cell = 34
    sheet = Image.new("L", (cell * len(CLASS_NAMES), cell * len(rows)), 255)
    for r, images in enumerate(rows):
        step = len(images) // len(CLASS_NAMES)
        for c in range(len(CLASS_NAMES)):
            sheet.paste(images[c * step].convert("L").resize((32, 32)), (c * cell, r * cell))
    sheet.resize((sheet.width * 3, sheet.height * 3), Image.Resampling.NEAREST).save(path)


def main() -> None:
    torch.set_num_threads(1)
    config = BenchConfig(models=("resnet",))
    classifier = _load_classifier("resnet", config, []).model
    data = _FashionData.load(config)
    plain_templates = tuple(t.replace("{token} ", "") for t in DATA_SCARCE_TEMPLATES)
    plain: list[Image.Image] | None = None
    for style in STYLES:
        pipe: Any = load_generator(config.generator_path, torch.device("cpu"), scheduler="ddim")
        pipe.set_progress_bar_config(disable=True)
        if plain is None:
            plain = generate(pipe, plain_templates, None)
            print(f"plain prompts      : {measures(plain, classifier, pipe)}", flush=True)
            for word in ADJECTIVES:  # words the generator's training captions held
                worded = generate(pipe, (f"a photo of a {word} {{cls}}",), None)
                print(f"{word!r:18s} : {measures(worded, classifier, pipe)}", flush=True)
        shots = kshot_images(data, style)
        print(f"{style:7s} k images : {measures(shots, classifier, pipe)}", flush=True)
        if style == "dark":  # how common that look is among the generator's training images
            level = float(garment_intensity(STYLES[style](shot_pixels(data))).mean())
            part = to_float_images(data.train_images[data.split.generator])
            share = 100.0 * float((garment_intensity(part) < level).float().mean())
            print(f"generator part: {share:.1f}% of images have a garment intensity < {level:.3f}")
        inversion = TextualInversionConfig(
            style_token=STYLE_TOKEN, captions=DATA_SCARCE_TEMPLATES, seed=SEED
        )
        labels = [c for c in range(len(CLASS_NAMES)) for _ in range(K)]
        apply_tokens(pipe, learn_tokens(pipe, shots, labels, list(CLASS_NAMES), inversion))
        tokened = generate(pipe, DATA_SCARCE_TEMPLATES, STYLE_TOKEN)
        print(f"{style:7s} token    : {measures(tokened, classifier, pipe)}", flush=True)
        grid([shots, plain, tokened], OUT / f"ti_in_support_{style}.png")


if __name__ == "__main__":
    main()
