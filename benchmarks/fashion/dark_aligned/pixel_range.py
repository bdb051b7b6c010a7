"""Print the pixel range of cached calibration sets of the dark data-scarce block.

Usage: python benchmarks/fashion/dark_aligned/pixel_range.py WORK_DIR STEM [STEM ...]

Each STEM is a file-name prefix under WORK_DIR/calibration/resnet_dark (for example
``textual_inversion_aligned_k5-seed1``); every cached set that starts with it is printed with
its min, max and the share of pixels outside the range real images span.
"""

from __future__ import annotations

import sys
from pathlib import Path

from safetensors.torch import load_file


def main(argv: list[str]) -> int:
    work, stems = Path(argv[0]) / "calibration" / "resnet_dark", argv[1:]
    real = min(work.glob("real-seed0-*.safetensors"))
    pixels = load_file(str(real))["images"]
    low, high = float(pixels.min()), float(pixels.max())
    print(f"real images span [{low:.3f}, {high:.3f}] ({real.name})")
    for stem in stems:
        for path in sorted(work.glob(f"{stem}-*.safetensors")):
            images = load_file(str(path))["images"]
            outside = ((images < low - 1e-4) | (images > high + 1e-4)).float().mean()
            print(
                f"{path.name}: min {float(images.min()):.3f} max {float(images.max()):.3f}, "
                f"{100 * float(outside):.1f}% of pixels outside the real range"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
