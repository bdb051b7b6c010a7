"""One row of generated images per pool folder of a ``genq bench fashion`` work dir, side by side.

Each row takes ``--per-row`` images spread evenly over the pool (pools are ordered by class), so
a row shows one image of each class when ``--per-row`` equals the number of classes.

    python benchmarks/fashion/pool_strip.py runs/full/work/pools/main-seed2-* \\
        runs/full/work/pools/ti-k5-shifted-seed2-* --out strip.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pools", type=Path, nargs="+", help="pool folders (with images/)")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--per-row", type=int, default=10)
    parser.add_argument("--size", type=int, default=64, help="pixels per image")
    args = parser.parse_args(argv)
    rows = []
    for pool in args.pools:
        images = sorted((pool / "images").rglob("*.png"))
        if len(images) < args.per_row:
            raise SystemExit(f"{pool}: {len(images)} images, fewer than --per-row {args.per_row}")
        step = len(images) // args.per_row
        rows.append([images[i * step] for i in range(args.per_row)])
    strip = Image.new("L", (args.per_row * args.size, len(rows) * args.size))
    for r, row in enumerate(rows):
        for c, path in enumerate(row):
            image = Image.open(path).convert("L").resize((args.size, args.size))
            strip.paste(image, (c * args.size, r * args.size))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    strip.save(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
