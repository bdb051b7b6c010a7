"""One data-scarce row across several ``genq bench fashion`` results that differ in one setting.

``benchmarks/fashion/full/share_sweep.sh`` writes one result per ``--kshot-share`` (the share of
the calibration set the k real images fill); the row that adds the k images to the
textual-inversion set has the same name in each. This prints, per setting, the row's mean ± std
over seeds in each result and its per-seed difference against the first result (the baseline):

    python benchmarks/fashion/share_summary.py textual_inversion_with_k:5 \\
        none=benchmarks/results/fashion-full-dark-sweep/sharenone/fashion_bench.json \\
        0.5=benchmarks/results/fashion-full-dark-sweep/share0.5/fashion_bench.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from paired_seeds import paired_difference, per_seed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("row", help="row or row:k, e.g. textual_inversion_with_k:5")
    parser.add_argument(
        "results", nargs="+", help="LABEL=fashion_bench.json; the first is the baseline"
    )
    parser.add_argument("--settings", default="W2A4,W2A3")
    parser.add_argument("--preset", default="qdrop")
    args = parser.parse_args(argv)
    labelled = []
    for item in args.results:
        label, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"expected LABEL=PATH, got {item!r}")
        labelled.append((label, json.loads(Path(path).read_text())["data_scarce"]["runs"]))
    for setting in args.settings.split(","):
        base_label, base_runs = labelled[0]
        base = per_seed(base_runs, args.row, setting, args.preset)
        print(f"{args.row} at {setting} ({args.preset}); differences per seed against {base_label}")
        for label, runs in labelled:
            top1 = per_seed(runs, args.row, setting, args.preset)
            values = list(top1.values())
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            line = f"  {label}: {statistics.fmean(values):.2f} ± {std:.2f} ({len(values)} seeds)"
            if label != base_label and set(top1) & set(base):
                _, mean, error, by_seed = paired_difference(top1, base)
                line += f"; {mean:+.2f} ± {error:.2f} s.e. (by seed {by_seed})"
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
