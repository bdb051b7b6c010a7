"""Write Fashion-MNIST test images as an evaluation archive for a GenQ job.

``python examples/fashion_test_set.py OUT.zip [--images N]`` writes the first N test images
(default 1000) as 28x28 PNGs in one folder per class, named as the service's built-in Fashion
classifiers name their classes; upload it with ``genq upload OUT.zip --kind eval`` and put the
upload id in a job's ``evaluation.eval_upload_id``. Needs the Debian package
``dataset-fashion-mnist`` (scripts/install.sh installs it).
"""

from __future__ import annotations

import argparse
import io
import zipfile
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from genq_core.bench.fashion_mnist import load_split
from services.workers.resolve import FASHION_CLASS_NAMES


def write_test_set(out: Path, images: int) -> int:
    """Write the archive; returns how many images it holds."""
    pixels, labels = load_split("test")
    count = min(images, int(labels.shape[0]))
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for index in range(count):
            png = io.BytesIO()
            Image.fromarray(pixels[index].numpy(), mode="L").save(png, format="PNG")
            name = FASHION_CLASS_NAMES[int(labels[index])]
            archive.writestr(f"{name}/{index:05d}.png", png.getvalue())
    return count


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path, help="the .zip to write")
    parser.add_argument("--images", type=int, default=1000, help="first N test images (1000)")
    args = parser.parse_args(argv)
    count = write_test_set(args.out, args.images)
    print(f"wrote {count} Fashion-MNIST test images to {args.out}")


if __name__ == "__main__":
    main()
