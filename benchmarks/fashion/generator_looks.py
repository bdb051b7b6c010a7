"""Does a word in the prompt change how a benchmark generator's images look?

For each generator folder, generates ``--per-class`` images per class (guidance 5, 10 DDIM steps,
the same seeds for every prompt set) from "a photo of a {word} {cls}" for each ``--words`` entry
("" is the plain prompt), and prints per set the label agreement with the committed BN CNN and
the mean garment intensity (mean of the pixels above 0.1, the look that ``darken_images``
changes). For reference it prints the garment intensity of the generator part's real images,
as they are and darkened (the ``dark`` domain of the data-scarce block).

    python benchmarks/fashion/generator_looks.py benchmarks/assets/fashion-sd \\
        benchmarks/assets/fashion-sd-looks --per-class 10 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from safetensors.torch import load_file

from genq_core.bench.classifiers import BNConvNet, darken_images, evaluate_top1
from genq_core.bench.fashion_mnist import CLASS_NAMES, garment_intensity, to_float_images
from genq_core.bench.generator import load_generator_data, to_classifier_input
from genq_core.bench.runinfo import cpu_name
from genq_core.generate.pipeline import load_generator

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("generators", type=Path, nargs="+", help="save_pretrained folders")
    parser.add_argument("--words", default="dark,,bright", help="comma-separated, '' for none")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--classifier", type=Path, default=ASSETS / "bn_cnn_fmnist.safetensors")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    classifier = BNConvNet()
    classifier.load_state_dict(load_file(str(args.classifier)))
    classifier.eval()
    print(f"# {cpu_name()}, {args.threads} thread(s), {args.per_class} images per class and word")

    real = to_float_images(load_generator_data().images)
    for name, pixels in (("real", real), ("real, darkened", darken_images(real))):
        level = float(garment_intensity(pixels).mean())
        print(json.dumps({"images": name, "garment_intensity": round(level, 3)}))

    labels = torch.arange(len(CLASS_NAMES)).repeat_interleave(args.per_class)
    for folder in args.generators:
        pipe = load_generator(folder, torch.device("cpu"), scheduler="ddim")
        if not isinstance(pipe, StableDiffusionPipeline):
            raise SystemExit(f"{folder} holds a {type(pipe).__name__}, not Stable Diffusion")
        pipe.set_progress_bar_config(disable=True)
        for word in args.words.split(","):
            prompts = [
                " ".join(f"a photo of a {word} {cls}".split())
                for cls in CLASS_NAMES
                for _ in range(args.per_class)
            ]
            images = pipe(
                prompt=prompts,
                num_inference_steps=10,
                guidance_scale=5.0,
                generator=[
                    torch.Generator().manual_seed(args.seed + i) for i in range(len(prompts))
                ],
                output_type="np",
            ).images
            inputs, gray = to_classifier_input(
                torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2)
            )
            pixels = gray.unsqueeze(1).float() / 255
            row = {
                "generator": str(folder),
                "word": word,
                "agreement": round(evaluate_top1(classifier, inputs, labels), 2),
                "garment_intensity": round(float(garment_intensity(pixels).mean()), 3),
            }
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
