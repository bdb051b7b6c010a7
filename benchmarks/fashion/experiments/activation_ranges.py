"""Experiment: how well each calibration set's activation ranges fit the test set's activations.

At 3-bit activations, GenQ + BN alignment quantizes the ResNet worse than GenQ, at 4 bits better
(BENCHMARKS.md, the table at the bench's defaults). The activation quantizers take their step
sizes from the calibration set's activations, so this compares, at every activation the
quantizer sees (the input of each conv and linear layer), the clipping range fitted on a
calibration set (``mse_range``, as the activation quantizers are initialised) with the range
fitted on the test set's own activations: the ``L_2.4`` error that the set's range gives on the
test activations, over the error of the test-fitted range (1.0 = as good as the test set's own).
Reads the calibration sets a full-size bench run cached; runs no quantization. Run from the
repository root:

    python benchmarks/fashion/experiments/activation_ranges.py runs/f1024/work 0   # work dir, seed

Output: a table per bit width on stdout (benchmarks/results/experiments/activation_ranges.txt).
"""

import math
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from genq_core.bench.fashion_bench import BenchConfig, _FashionData, _load_classifier
from genq_core.quant.calibration import _MSE_NORM, mse_range
from genq_core.quant.functional import fake_quantize, qparams_from_range, quant_range

SOURCES = ("real", "genq", "genq_aligned", "generated", "inversion", "noise")
TEST_IMAGES = 2048
SAMPLES = 1 << 16


def layer_inputs(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """A seeded random sample of the input of every conv and linear layer, over ``images``."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):

            def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
                seen.setdefault(name, []).append(args[0].detach().flatten())

            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for start in range(0, images.shape[0], 256):
            model(images[start : start + 256])
    for handle in hooks:
        handle.remove()
    out = {}
    generator = torch.Generator().manual_seed(0)
    for name, parts in seen.items():
        values = torch.cat(parts)
        pick = torch.randperm(values.numel(), generator=generator)[:SAMPLES]
        out[name] = values[pick]
    return out


def error(values: torch.Tensor, x_min: torch.Tensor, x_max: torch.Tensor, bits: int) -> float:
    scale, zero_point = qparams_from_range(x_min, x_max, bits, symmetric=False, signed=False)
    quant_min, quant_max = quant_range(bits, signed=False)
    x_hat = fake_quantize(values, scale, zero_point, quant_min, quant_max)
    return float((x_hat - values).abs().pow(_MSE_NORM).mean())


def load_set(work: Path, source: str, seed: int) -> torch.Tensor | None:
    files = sorted((work / "calibration" / "resnet").glob(f"{source}-seed{seed}-*.safetensors"))
    if not files:
        return None
    with safe_open(str(files[0]), framework="pt") as handle:
        return handle.get_tensor("images")


def main(work: Path, seed: int) -> None:
    torch.set_num_threads(1)
    config = BenchConfig(models=("resnet",))
    classifier = _load_classifier("resnet", config, [])
    test, _ = _FashionData.load(config).test(classifier.domain)
    test_acts = layer_inputs(classifier.model, test[:TEST_IMAGES])
    layers = list(test_acts)[1:]  # the first layer's input is the image (8-bit first layer)
    sets = {s: images for s in SOURCES if (images := load_set(work, s, seed)) is not None}
    set_acts = {s: layer_inputs(classifier.model, images) for s, images in sets.items()}
    print(f"seed {seed}; {TEST_IMAGES} test images; sets: {', '.join(sets)}")
    print("cell: L2.4 error on the test activations with the set's fitted range / with the")
    print("test-fitted range (1.00 = as good as the test set's own); last row: geometric mean")
    for bits in (3, 4):
        print(f"\nA{bits}\n| layer | " + " | ".join(sets) + " |")
        print("|---" * (len(sets) + 1) + "|")
        logs: dict[str, list[float]] = {s: [] for s in sets}
        for layer in layers:
            values = test_acts[layer]
            best = error(values, *mse_range(values, bits, False, False, None), bits)
            cells = []
            for source in sets:
                fitted = mse_range(set_acts[source][layer], bits, False, False, None)
                ratio = error(values, *fitted, bits) / best
                logs[source].append(math.log(ratio))
                cells.append(f"{ratio:.2f}")
            print(f"| {layer} | " + " | ".join(cells) + " |")
        means = [f"{math.exp(sum(v) / len(v)):.3f}" for v in logs.values()]
        print("| geometric mean | " + " | ".join(means) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
