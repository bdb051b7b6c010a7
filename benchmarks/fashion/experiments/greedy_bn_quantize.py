"""Experiment: quantize the BN ResNet on the greedy sets of ``greedy_bn_selection.py``.

Same quantizer settings as the reference benchmark's reduced table (qdrop, 200 steps, 256 images,
first/last 8-bit); prints one JSON line per seed. Run from the repository root:

    python benchmarks/fashion/experiments/greedy_bn_quantize.py W2A4   # or W2A3

Results: benchmarks/results/experiments/greedy_bn_quantize_{W2A4,W2A3}.jsonl
"""

import glob
import json
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from genq_core.bench.classifiers import evaluate_top1
from genq_core.bench.fashion_bench import BenchConfig, _FashionData, _load_classifier
from genq_core.quant import QuantConfig, ReconstructionConfig, quantize_model

GUIDANCE = 5.0  # the benchmark's default; a work dir may hold pools made at other guidances


def pool_guidance(path: str) -> float:
    """The guidance scale a cached pool was generated with (from its metadata)."""
    with safe_open(path, framework="pt") as handle:
        meta = json.loads((handle.metadata() or {})["meta"])
    return float(meta["parts"]["guidance"])


def main(setting: str) -> None:
    torch.set_num_threads(1)
    weight_bits, act_bits = int(setting[1]), int(setting[3])
    config = BenchConfig(models=("resnet",), num_calibration=256)
    model = _load_classifier("resnet", config, []).model
    test_images, test_labels = _FashionData.load(config).test("original")
    for seed in (0, 1, 2):
        for path in glob.glob(f"runs/full/work/pools/main-seed{seed}-*/pool.safetensors"):
            images = load_file(path)["images"]
            if len(images) != 640 or pool_guidance(path) != GUIDANCE:
                continue
            kept = images[torch.load(f"runs/greedy/greedy-seed{seed}.pt")["greedy"]]
            order = torch.randperm(kept.shape[0], generator=torch.Generator().manual_seed(seed))
            calibration = kept[order][:256]
            quant = QuantConfig(
                weight_bits=weight_bits,
                act_bits=act_bits,
                first_last_bits=8,
                preset="qdrop",
                max_calibration_images=256,
                seed=seed,
                reconstruction=ReconstructionConfig(iters=200),
            )
            qmodel = quantize_model(model, quant, calibration, device="cpu")
            top1 = evaluate_top1(qmodel, test_images, test_labels)
            record = {
                "setting": setting,
                "seed": seed,
                "n": int(calibration.shape[0]),
                "top1": top1,
            }
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
