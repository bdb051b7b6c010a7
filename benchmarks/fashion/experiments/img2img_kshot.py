"""Experiment: data-scarce calibration from img2img (SDEdit) variations of the k real images.

Instead of textual inversion, each generated image starts from one of the k shifted real images
of its class, noised to ``strength`` and denoised with the plain class prompt (the shipped
generator through ``StableDiffusionImg2ImgPipeline``); 64 per class, GenQ's filters under the
shifted target, then W2A4 qdrop (200 steps, 256 images, seed 2) as in the reference benchmark's
data-scarce block. Run from the repository root:

    python benchmarks/fashion/experiments/img2img_kshot.py 0.6 5    # strength, k

Results: benchmarks/results/experiments/img2img_kshot_s0.6_k5.jsonl
"""

import json
import sys
import time
from typing import Any

import torch
from diffusers import StableDiffusionImg2ImgPipeline

from genq_core.bench.classifiers import evaluate_top1
from genq_core.bench.fashion_bench import (
    CLASS_NAMES,
    BenchConfig,
    _FashionData,
    _generated_preprocessing,
    _load_classifier,
)
from genq_core.filters import FilterConfig, apply_filters, bn_distance
from genq_core.generate.pipeline import load_generator
from genq_core.quant import QuantConfig, ReconstructionConfig, quantize_model

SEED = 2
PER_CLASS = 64


def main(strength: float, k: int) -> None:
    torch.set_num_threads(1)
    config = BenchConfig(models=("resnet",), num_calibration=256)
    target = _load_classifier("resnet_shifted", config, []).model
    data = _FashionData.load(config)
    pipe = load_generator(config.generator_path, torch.device("cpu"), scheduler="ddim")
    img2img: Any = StableDiffusionImg2ImgPipeline(**pipe.components)  # untyped __call__
    img2img.set_progress_bar_config(disable=True)
    shots = [image.convert("RGB") for image in data.kshot_pil(k, SEED, "shifted")]
    transform = _generated_preprocessing(pipe).transform()

    # 1. PER_CLASS variations per class, cycling over the class's k shifted images
    clock = time.perf_counter()
    images, labels = [], []
    for c, name in enumerate(CLASS_NAMES):
        for start in range(0, PER_CLASS, 32):
            js = list(range(start, min(PER_CLASS, start + 32)))
            out = img2img(
                prompt=[f"a photo of a {name}"] * len(js),
                image=[shots[c * k + j % k] for j in js],
                strength=strength,
                num_inference_steps=10,
                guidance_scale=5.0,
                generator=[torch.Generator().manual_seed(SEED * 100000 + c * 1000 + j) for j in js],
            )
            images += [transform(image) for image in out.images]
            labels += [c] * len(js)
    seconds = time.perf_counter() - clock
    pool, pool_labels = torch.stack(images), torch.tensor(labels)
    torch.save({"images": pool, "labels": pool_labels}, f"runs/sdedit/pool-s{strength}-k{k}.pt")

    # 2. GenQ's filters under the shifted target, then the benchmark's calibration step
    report = apply_filters(target, pool, pool_labels, FilterConfig(seed=SEED), device="cpu")
    kept = pool[report.final]
    order = torch.randperm(kept.shape[0], generator=torch.Generator().manual_seed(SEED))
    calibration = kept[order][:256]
    with torch.no_grad():
        agreement = (target(pool).argmax(1) == pool_labels).float().mean().item() * 100
    record = {
        "strength": strength,
        "k": k,
        "gen_s": round(seconds),
        "agree_shifted": round(agreement, 2),
        "dbn": round(bn_distance(target, calibration), 3),
    }
    print(json.dumps(record), flush=True)

    # 3. W2A4 qdrop as in the data-scarce block, evaluated on the shifted test set
    quant = QuantConfig(
        weight_bits=2,
        act_bits=4,
        first_last_bits=8,
        preset="qdrop",
        max_calibration_images=256,
        seed=SEED,
        reconstruction=ReconstructionConfig(iters=200),
    )
    qmodel = quantize_model(target, quant, calibration, device="cpu")
    test_images, test_labels = data.test("shifted")
    top1 = evaluate_top1(qmodel, test_images, test_labels)
    print(json.dumps({"strength": strength, "k": k, "top1": top1}), flush=True)


if __name__ == "__main__":
    main(float(sys.argv[1]), int(sys.argv[2]))
