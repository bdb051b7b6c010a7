"""Why the ViT's filter gain shrank from the reduced table to the full one: images or steps.

The reduced ViT table (256 calibration images, 200 reconstruction steps per block) has GenQ
ahead of the unfiltered generator at W2A4; the full one (1024 images, 500 steps) does not. This
separates the two changes: GenQ and the unfiltered generator at W2A4, seeds 0-2, at the four
combinations of 256 / 1024 images and 200 / 500 steps. Run the missing two (the full table's
work dir has the 1024-image pools, the reduced one's the 256-image pools):

    genq bench fashion --models vit --sources genq,generated --settings W2A4 --seeds 0,1,2 \\
        --presets qdrop --num-calib 1024 --iters 200 --no-data-scarce --threads 1 \\
        --work-dir runs/f1024/work --out runs/vitgap/out-1024-200 --no-benchmarks-md
    (the same with --num-calib 256 --iters 500, and with --num-calib 256 --iters 200,
     --work-dir runs/full/work, --out runs/vitgap/out-256-500 and out-256-200)

and, at the product's default of 2000 steps, one source and seed at a time (``--sources genq``
or ``generated``, ``--seeds 0`` or ``1``, ``--iters 2000``, ``--out runs/vitgap/out-1024-2000-...``),
then ``python benchmarks/fashion/experiments/vit_filter_gap.py runs/vitgap/out-*
benchmarks/results/fashion-full-vit``: one line per size and step count, over the seeds that
both rows ran.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paired_seeds import paired_difference


def top1_by_seed(report: dict[str, Any], row: str, setting: str) -> dict[int, float]:
    """Top-1 by seed of the ViT's main-table ``row`` at ``setting`` (``qdrop``)."""
    return {
        r["seed"]: float(r["top1"])
        for r in report["runs"]
        if r["block"] == "main"
        and r["model"] == "vit"
        and r["row"] == row
        and r["setting"] == setting
        and r["preset"] == "qdrop"
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outs", nargs="+", type=Path, help="--out folders of bench runs")
    parser.add_argument("--setting", default="W2A4")
    args = parser.parse_args(argv)
    # (images, steps) -> row -> top-1 by seed, merged over the reports (a run may be in several)
    found: dict[tuple[int, int], dict[str, dict[int, float]]] = {}
    for out in args.outs:
        report = json.loads((out / "fashion_bench.json").read_text())
        config = report["config"]
        rows = found.setdefault((config["num_calibration"], config["iters"]), {})
        for row in ("genq", "generated"):
            rows.setdefault(row, {}).update(top1_by_seed(report, row, args.setting))
    print("| images | steps | GenQ | unfiltered | GenQ - unfiltered (per seed) |")
    print("|---|---|---|---|---|")
    for (images, steps), rows in sorted(found.items()):
        genq, plain = rows["genq"], rows["generated"]
        if not set(genq) & set(plain):
            raise SystemExit(f"{images} images, {steps} steps: no seed with both rows")
        seeds, mean, error, by_seed = paired_difference(genq, plain)
        print(
            f"| {images} | {steps} | {statistics.fmean(genq[s] for s in seeds):.2f} | "
            f"{statistics.fmean(plain[s] for s in seeds):.2f} | "
            f"{mean:+.2f} ± {error:.2f} s.e. ({by_seed}) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
