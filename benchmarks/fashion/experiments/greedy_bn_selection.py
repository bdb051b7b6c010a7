"""Experiment: set-level greedy BN-statistics selection instead of the distribution filter's ranking.

From each main pool (640 images, seeds 0-2) of a ``genq bench fashion`` work dir at
``runs/full/work``, removes one image at a time, always the one whose removal lowers the remaining
set's D_BN the most (within per-class quotas of 26), until 260 remain; prints D_BN of a random
256, of GenQ's filters, of the greedy set and of 256 real images; saves the masks for
``greedy_bn_quantize.py``. Run from the repository root:

    python benchmarks/fashion/experiments/greedy_bn_selection.py

Results: benchmarks/results/experiments/greedy_bn_selection.log
"""

import glob
import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from genq_core.bench.fashion_bench import BenchConfig, _FashionData, _load_classifier
from genq_core.filters import FilterConfig, apply_filters
from genq_core.filters._common import evaluating
from genq_core.filters.bn import _distance, _LayerSums, _StatsCollector, bn_distance

QUOTA = 26  # per class: 260 images, trimmed to 256 by the benchmark's calibration step


def layer_sums(model: torch.nn.Module, images: torch.Tensor) -> list[_LayerSums]:
    """Per-image BN-input sums of every BatchNorm call, one forward pass."""
    with evaluating(model, "cpu") as net:
        collector = _StatsCollector(net)
        net(images)
        layers = list(collector.layers)
        collector.remove()
    return layers


def greedy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Drop the image whose removal lowers the remaining set's D_BN most, until QUOTA per class."""
    layers = layer_sums(model, images)
    keep = torch.ones(len(images), dtype=torch.bool)
    sums_s = [layer.s.sum(0) for layer in layers]
    sums_q = [layer.q.sum(0) for layer in layers]
    counts = torch.bincount(labels, minlength=10)
    while keep.sum() > QUOTA * 10:
        n = int(keep.sum()) - 1
        distance = torch.zeros(len(images), dtype=torch.float64)
        for layer, s, q in zip(layers, sums_s, sums_q, strict=True):
            sigma = torch.sqrt(layer.running_var + layer.eps)
            values = n * layer.positions
            distance += _distance((s - layer.s) / values, (q - layer.q) / values, sigma, layer.eps)
        allowed = keep & (counts[labels] > QUOTA)
        distance[~allowed] = float("inf")
        i = int(distance.argmin())
        keep[i] = False
        counts[labels[i]] -= 1
        for j, layer in enumerate(layers):
            sums_s[j] = sums_s[j] - layer.s[i]
            sums_q[j] = sums_q[j] - layer.q[i]
    return keep


GUIDANCE = 5.0  # the benchmark's default; a work dir may hold pools made at other guidances


def pool_guidance(path: str) -> float:
    """The guidance scale a cached pool was generated with (from its metadata)."""
    with safe_open(path, framework="pt") as handle:
        meta = json.loads((handle.metadata() or {})["meta"])
    return float(meta["parts"]["guidance"])


def main() -> None:
    torch.set_num_threads(1)
    config = BenchConfig(models=("resnet",), num_calibration=256)
    model = _load_classifier("resnet", config, []).model
    data = _FashionData.load(config)
    for seed in (0, 1, 2):
        for path in glob.glob(f"runs/full/work/pools/main-seed{seed}-*/pool.safetensors"):
            tensors = load_file(path)
            images, labels = tensors["images"], tensors["labels"]
            if len(images) != 640 or pool_guidance(path) != GUIDANCE:
                continue
            random = torch.randperm(640, generator=torch.Generator().manual_seed(seed))[:256]
            filters = FilterConfig(energy_keep=0.5, distribution_keep=0.8, seed=seed)
            report = apply_filters(model, images, labels, filters, device="cpu")
            kept = greedy(model, images, labels)
            real = data.real(256, seed, "original")
            distances = {
                "random": bn_distance(model, images[random]),
                "genq": bn_distance(model, images[report.final]),
                "greedy": bn_distance(model, images[kept]),
                "real": bn_distance(model, real),
                "all": bn_distance(model, images),
            }
            print(seed, " ".join(f"{k} {v:.3f}" for k, v in distances.items()), flush=True)
            torch.save({"greedy": kept}, f"runs/greedy/greedy-seed{seed}.pt")


if __name__ == "__main__":
    main()
