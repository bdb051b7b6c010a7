"""Experiment: how many off-class images each filter removes, at guidance 5 and 1.5.

For each main pool (640 images, 64 per class, seeds 0-2) of a ``genq bench fashion`` work dir at
``runs/full/work`` generated at guidance 5 or 1.5, applies the benchmark's three filter settings
(GenQ: energy 0.5 then distribution 0.8; each filter alone: 0.4) and prints the label agreement
(the float ResNet classifies the image as its prompted class) of the whole pool, of each kept set
and of the images GenQ drops. Run from the repository root:

    python benchmarks/fashion/experiments/filter_agreement.py

Results: benchmarks/results/experiments/filter_agreement.log
"""

import glob

import torch
from greedy_bn_selection import pool_guidance  # the sibling script (run as a script)
from safetensors.torch import load_file

from genq_core.bench.classifiers import evaluate_top1
from genq_core.bench.fashion_bench import BenchConfig, _load_classifier
from genq_core.bench.fashion_mnist import CLASS_NAMES
from genq_core.filters import FilterConfig, apply_filters

GUIDANCES = (5.0, 1.5)


def main() -> None:
    torch.set_num_threads(1)
    model = _load_classifier("resnet", BenchConfig(models=("resnet",)), []).model
    settings = {
        "genq": lambda seed: FilterConfig(energy_keep=0.5, distribution_keep=0.8, seed=seed),
        "energy_only": lambda seed: FilterConfig(order=("energy",), energy_keep=0.4, seed=seed),
        "bn_only": lambda seed: FilterConfig(
            order=("distribution",), distribution_keep=0.4, seed=seed
        ),
    }
    print("guidance seed pool " + " ".join(settings) + " genq_dropped", flush=True)
    for guidance in GUIDANCES:
        for seed in (0, 1, 2):
            for path in sorted(
                glob.glob(f"runs/full/work/pools/main-seed{seed}-*/pool.safetensors")
            ):
                tensors = load_file(path)
                images, labels = tensors["images"], tensors["labels"]
                if len(images) != 640 or pool_guidance(path) != guidance:
                    continue
                row = [evaluate_top1(model, images, labels)]
                final = None
                for name, make in settings.items():
                    report = apply_filters(
                        model, images, labels, make(seed), class_names=CLASS_NAMES, device="cpu"
                    )
                    row.append(evaluate_top1(model, images[report.final], labels[report.final]))
                    if name == "genq":
                        final = report.final
                assert final is not None
                row.append(evaluate_top1(model, images[~final], labels[~final]))
                print(f"{guidance:g} {seed} " + " ".join(f"{v:.1f}" for v in row), flush=True)


if __name__ == "__main__":
    main()
