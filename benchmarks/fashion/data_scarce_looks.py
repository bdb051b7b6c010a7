"""How the data-scarce block's calibration sets look, next to the target's own domain.

Reads the calibration sets a ``genq bench fashion`` run cached in ``--work-dir`` (it computes
nothing: a set that is not cached is an error) and prints, per seed and set: the mean garment
intensity (mean of the pixels above 0.1, what ``darken_images`` lowers), ``D_BN`` of the set
against the target's BatchNorm statistics, and the mean free energy under the target (both lower
= closer to the target's training data). The sets: the full real calibration set in the target's
domain, the k real images per class, GenQ from plain prompts, and GenQ after textual inversion on
the k images. Run with the same generator, target, seeds and ks as the bench:

    python benchmarks/fashion/data_scarce_looks.py --generator benchmarks/assets/fashion-sd-looks \\
        --model resnet_dark --seeds 0,2 --ks 1,5,10 --work-dir runs/full/work
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from genq_core.bench.fashion_bench import (
    BenchConfig,
    _Bench,
    _Calibration,
    _kshot_calibration,
    _load_classifier,
    _ti_calibration,
)
from genq_core.bench.fashion_mnist import MEAN, STD, garment_intensity


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", type=Path, required=True)
    parser.add_argument("--model", default="resnet_dark")
    parser.add_argument("--seeds", default="2")
    parser.add_argument("--ks", default="1,5,10")
    parser.add_argument("--num-calib", type=int, default=256)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/full/work"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    ks = tuple(int(k) for k in args.ks.split(","))
    config = BenchConfig(
        models=("resnet",),
        num_calibration=args.num_calib,
        data_scarce_model=args.model,
        data_scarce_ks=ks,
        generator_dir=str(args.generator),
    )
    bench = _Bench(config, args.work_dir, torch.device("cpu"), cached_only=True)
    target = _load_classifier(args.model, config, [])
    for seed in seeds:
        sets: list[tuple[str, _Calibration]] = [
            ("real, full set", bench.calibration(target, "real", seed)),
            ("GenQ, plain prompts", bench.calibration(target, "genq", seed)),
        ]
        for k in ks:
            sets.append((f"real k={k}", _kshot_calibration(bench, target, k, seed)))
            sets.append(
                (f"GenQ + textual inversion k={k}", _ti_calibration(bench, target, k, seed))
            )
        for name, calibration in sets:
            if calibration.images is None:
                raise SystemExit(f"{name}: not available ({calibration.info.get('note')})")
            pixels = calibration.images * STD[0] + MEAN[0]
            statistics = bench.set_statistics(target, calibration.images)
            row = {
                "seed": seed,
                "set": name,
                "images": int(calibration.images.shape[0]),
                "garment_intensity": round(float(garment_intensity(pixels).mean()), 3),
                "bn_distance": round(float(statistics["bn_distance"]), 3),
                "mean_energy": round(statistics["mean_energy"], 3),
            }
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
