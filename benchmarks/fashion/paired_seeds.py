"""Seed-by-seed differences between two rows of a ``genq bench fashion`` result.

The bench's claims compare row means with the standard error of two independent samples. Rows of
one seed share more than that (the generation seed, the k images, the quantizer's seed), so the
difference per seed is the sharper test. This prints, for each pair of rows, the difference on
every seed both rows ran, their mean, the standard error of that mean and whether it is more than
two standard errors from zero. Rows are named ``row`` or ``row:k`` as in the data-scarce table:

    python benchmarks/fashion/paired_seeds.py benchmarks/results/fashion-dark-k5/fashion_bench.json \\
        textual_inversion:5-plain_prompts textual_inversion:5-real_k:5

``--also REPORT`` adds the data-scarce runs of another result (e.g. a later run of a few rows with
``--data-scarce-rows``); a run that both results hold must have the same top-1 in both, else
this stops and names it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any


def per_seed(runs: list[dict[str, Any]], name: str, setting: str, preset: str) -> dict[int, float]:
    """Top-1 by seed of the data-scarce row ``row`` or ``row:k``."""
    row, _, k = name.partition(":")
    found = {
        r["seed"]: float(r["top1"])
        for r in runs
        if r["row"] == row
        and r["k"] == (int(k) if k else 0)
        and r["setting"] == setting
        and r["preset"] == preset
    }
    if not found:
        raise SystemExit(f"no runs of {name!r} at {setting} {preset}")
    return found


def paired_difference(
    a: dict[int, float], b: dict[int, float]
) -> tuple[list[int], float, float, str]:
    """``a - b`` on the seeds both have: the seeds, the mean difference, its standard error (NaN
    with one seed) and the differences by seed as text (``0: +0.18, 1: +0.05``)."""
    seeds = sorted(set(a) & set(b))
    differences = [a[s] - b[s] for s in seeds]
    mean = statistics.fmean(differences)
    error = (
        statistics.stdev(differences) / math.sqrt(len(differences))
        if len(differences) > 1
        else float("nan")
    )
    by_seed = ", ".join(f"{s}: {d:+.2f}" for s, d in zip(seeds, differences, strict=True))
    return seeds, mean, error, by_seed


def merged_runs(reports: list[Path]) -> list[dict[str, Any]]:
    """The data-scarce runs of every report; a run in several must agree on its top-1."""
    by_key: dict[tuple[Any, ...], dict[str, Any]] = {}
    shared = 0
    for path in reports:
        report = json.loads(path.read_text())
        if not report.get("data_scarce"):
            raise SystemExit(f"{path}: no data-scarce block")
        for run in report["data_scarce"]["runs"]:
            key = (run["row"], run["k"], run["setting"], run["preset"], run["seed"])
            earlier = by_key.setdefault(key, run)
            if earlier is not run:
                shared += 1
                if earlier["top1"] != run["top1"]:
                    raise SystemExit(
                        f"{path}: run {key} has top-1 {run['top1']}, an earlier report "
                        f"{earlier['top1']}"
                    )
    if len(reports) > 1:
        print(f"# {len(reports)} reports; {shared} runs in more than one, all with equal top-1")
    return list(by_key.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="fashion_bench.json of a run")
    parser.add_argument("pairs", nargs="+", help="FIRST-SECOND, e.g. textual_inversion:5-real_k:5")
    parser.add_argument("--setting", default="W2A4")
    parser.add_argument("--preset", default="qdrop")
    parser.add_argument(
        "--also", type=Path, action="append", default=[], help="another fashion_bench.json"
    )
    args = parser.parse_args(argv)
    runs = merged_runs([args.report, *args.also])
    for pair in args.pairs:
        first, sep, second = pair.partition("-")
        if not sep:
            raise SystemExit(f"{pair!r}: expected FIRST-SECOND")
        a = per_seed(runs, first, args.setting, args.preset)
        b = per_seed(runs, second, args.setting, args.preset)
        seeds, mean, error, by_seed = paired_difference(a, b)
        verdict = "outside" if abs(mean) > 2 * error else "within"
        print(
            f"{first} - {second} ({args.setting} {args.preset}, {len(seeds)} seeds): "
            f"{mean:+.2f} ± {error:.2f} s.e. ({verdict} two s.e.); by seed {by_seed}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
