"""Train the reference benchmark's float classifiers on Fashion-MNIST, deterministically.

Four models, each trained only on the classifier part of the fixed split
(``split_train_indices(train_labels, seed=0).classifier``, ~30k images) and evaluated on the
10k test set:

- ``resnet``: the BatchNorm CNN (``small_resnet_fmnist``, ``RESNET_RECIPE``);
- ``vit``: the vision transformer without BatchNorm (``vit_fmnist``, ``VIT_RECIPE``);
- ``resnet_shifted``: the data-scarce experiment's domain-shifted target, the BatchNorm CNN
  trained and tested on ``shift_images`` of the same images (``SHIFTED_RESNET_RECIPE``);
- ``resnet_dark``: the BatchNorm CNN trained and tested on ``darken_images`` of the same images
  (``RESNET_RECIPE``), a shifted target whose look the generator can be steered to.

Weights go to ``<out>/fmnist_<model>.safetensors``; ``<out>/classifiers.json`` gets one entry
per model (builder, parameters, test top-1, training seconds, recipe, sha256), updated under a
lock so that the models can train in parallel processes. Seeded and single-threaded by default:
the same machine, torch version and ``--threads`` give the same weights (and checksum).

    python benchmarks/fashion/train_classifiers.py --only resnet         # ~22 min, one core
    python benchmarks/fashion/train_classifiers.py --only vit            # ~25 min
    python benchmarks/fashion/train_classifiers.py --only resnet_shifted # ~22 min
    python benchmarks/fashion/train_classifiers.py --only resnet_dark    # ~22 min
    python benchmarks/fashion/train_classifiers.py --only vit --epochs 1 --limit 2000 \\
        --test-limit 1000 --out /tmp/fmnist-smoke                        # smoke test, < 1 min
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file

from genq_core.bench.classifiers import (
    BUILDERS,
    DARKEN_GAMMA,
    RESNET_RECIPE,
    SHIFT_ROTATION_DEGREES,
    SHIFT_SCALE,
    SHIFTED_RESNET_RECIPE,
    VIT_RECIPE,
    TrainConfig,
    evaluate_top1,
    to_domain,
    train_classifier,
)
from genq_core.bench.fashion_mnist import (
    MEAN,
    STD,
    load_split,
    normalize,
    split_train_indices,
    to_float_images,
)
from genq_core.bench.runinfo import cpu_name, file_sha256

logger = logging.getLogger("bench.train_classifiers")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "assets"
MANIFEST = "classifiers.json"
SPLIT_SEED = 0
BUILDER_MODULE = "genq_core.bench.classifiers"


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark classifier: how it is built, trained and on which domain.

    Attributes:
        builder: a key of ``genq_core.bench.classifiers.BUILDERS``.
        recipe: the training hyper-parameters.
        domain: train and test on the images in this domain (a key of
            ``genq_core.bench.classifiers.DOMAINS``).
        init_seed: ``torch.manual_seed`` before building, for reproducible initial weights.
    """

    builder: str
    recipe: TrainConfig
    domain: str = "original"
    init_seed: int = 0


MODELS: dict[str, ModelSpec] = {
    "resnet": ModelSpec("small_resnet_fmnist", RESNET_RECIPE),
    "vit": ModelSpec("vit_fmnist", VIT_RECIPE),
    "resnet_shifted": ModelSpec("small_resnet_fmnist", SHIFTED_RESNET_RECIPE, domain="shifted"),
    "resnet_dark": ModelSpec("small_resnet_fmnist", RESNET_RECIPE, domain="dark"),
}


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    names = list(dict.fromkeys(args.only or MODELS))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log_path = args.log or out / "logs" / f"train_{'_'.join(names)}.log"
    _setup_logging(log_path)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    command = " ".join(["python benchmarks/fashion/train_classifiers.py", *sys.argv[1:]])
    logger.info("command: %s", command)
    logger.info(
        "models %s, %d torch thread(s), output %s, log %s", names, args.threads, out, log_path
    )

    # 1. data: the classifier part of the fixed split, and the 10k test set
    data = _load_data(args.limit, args.test_limit)

    for name in names:
        spec = MODELS[name]
        recipe = (
            spec.recipe
            if args.epochs is None
            else dataclasses.replace(spec.recipe, epochs=args.epochs)
        )

        # 2. build with a seeded initialisation and train on the model's domain
        torch.manual_seed(spec.init_seed)
        model = BUILDERS[spec.builder]()
        params = sum(p.numel() for p in model.parameters())
        x_train = data.train(spec.domain)
        logger.info("%s: %s, %d parameters, recipe %s", name, spec.builder, params, recipe)
        started = time.perf_counter()
        train_classifier(model, x_train, data.train_labels, recipe, on_progress=_progress(name))
        train_seconds = time.perf_counter() - started

        # 3. evaluate on the own domain's test set, and on another one for contrast
        other = "shifted" if spec.domain == "original" else "original"
        x_test = data.test(spec.domain)
        top1 = evaluate_top1(model, x_test, data.test_labels)
        other_top1 = evaluate_top1(model, data.test(other), data.test_labels)
        logger.info(
            "%s: test top-1 %.2f%% (%s domain; %.2f%% on the %s one), trained in %.0f s",
            name,
            top1,
            spec.domain,
            other_top1,
            other,
            train_seconds,
        )

        # 4. save the weights and record them in the manifest
        weights = out / f"fmnist_{name}.safetensors"
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(weights), metadata={"builder": f"{BUILDER_MODULE}:{spec.builder}"})
        entry = {
            "builder": f"{BUILDER_MODULE}:{spec.builder}",
            "weights": weights.name,
            "sha256": file_sha256(weights),
            "bytes": weights.stat().st_size,
            "params": params,
            "domain": spec.domain,
            "other_domain": other,
            "preprocessing": _preprocessing(spec.domain),
            "train_images": int(x_train.shape[0]),
            "train_part": f"split_train_indices(train_labels, seed={SPLIT_SEED}).classifier"
            + (f", first {args.limit} of a seeded permutation" if args.limit else ""),
            "test_images": int(x_test.shape[0]),
            "test_top1": round(top1, 2),
            "other_domain_top1": round(other_top1, 2),
            "train_seconds": round(train_seconds, 1),
            "config": recipe.to_dict(),
            "init_seed": spec.init_seed,
            "threads": args.threads,
            "machine": _machine(),
            "versions": {"torch": torch.__version__, "timm": timm.__version__},
            "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "command": command,
        }
        _update_manifest(out, name, entry)
        logger.info(
            "%s: wrote %s (%d bytes, sha256 %s)", name, weights, entry["bytes"], entry["sha256"]
        )


@dataclass(frozen=True)
class _Data:
    """[0, 1] float images [N, 1, 28, 28] with int64 labels [N]; normalized per domain."""

    train_pixels: torch.Tensor
    train_labels: torch.Tensor
    test_pixels: torch.Tensor
    test_labels: torch.Tensor

    def train(self, domain: str) -> torch.Tensor:
        return normalize(to_domain(self.train_pixels, domain))

    def test(self, domain: str) -> torch.Tensor:
        return normalize(to_domain(self.test_pixels, domain))


def _load_data(limit: int | None, test_limit: int | None) -> _Data:
    """The classifier part (optionally a seeded subset of ``limit``) and the test set."""
    train_images, train_labels = load_split("train")
    test_images, test_labels = load_split("test")
    part = split_train_indices(train_labels, seed=SPLIT_SEED).classifier
    if limit is not None:
        order = torch.randperm(part.numel(), generator=torch.Generator().manual_seed(0))
        part = torch.sort(part[order[:limit]]).values
    if test_limit is not None:
        test_images, test_labels = test_images[:test_limit], test_labels[:test_limit]
    train = to_float_images(train_images[part])
    test = to_float_images(test_images)
    logger.info("data: %d training images (classifier part), %d test images", len(part), len(test))
    return _Data(
        train_pixels=train,
        train_labels=train_labels[part],
        test_pixels=test,
        test_labels=test_labels,
    )


def _preprocessing(domain: str) -> dict[str, Any]:
    """How images reach the model, for the manifest."""
    result: dict[str, Any] = {
        "input_size": [1, 28, 28],
        "pixels": "float in [0, 1] (genq_core.bench.fashion_mnist.to_float_images)",
        "mean": list(MEAN),
        "std": list(STD),
    }
    if domain == "dark":
        result["shift"] = {
            "function": f"{BUILDER_MODULE}:darken_images",
            "gamma": DARKEN_GAMMA,
            "applied": "to the [0, 1] pixels, before normalization",
        }
    elif domain == "shifted":
        result["shift"] = {
            "function": f"{BUILDER_MODULE}:shift_images",
            "rotation_degrees": SHIFT_ROTATION_DEGREES,
            "scale": SHIFT_SCALE,
            "invert": True,
            "applied": "to the [0, 1] pixels, before normalization",
        }
    return result


def _update_manifest(out: Path, name: str, entry: dict[str, Any]) -> None:
    """Replace ``name``'s entry of ``out/classifiers.json``; other processes' entries survive."""
    path = out / MANIFEST
    with _locked(out):
        manifest: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        models = manifest.setdefault("models", {})
        models[name] = entry
        manifest["models"] = dict(sorted(models.items()))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, path)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the directory itself (no lock file left behind)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _progress(name: str) -> Callable[[int, int], None]:
    """Log every 10% of the steps."""
    started = time.perf_counter()

    def report(step: int, total: int) -> None:
        if step == total or step % max(1, total // 10) == 0:
            elapsed = time.perf_counter() - started
            logger.info(
                "%s: step %d/%d, %.0f s elapsed, ~%.0f s left",
                name,
                step,
                total,
                elapsed,
                elapsed / step * (total - step),
            )

    return report


def _setup_logging(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        handlers=[logging.FileHandler(path, mode="w"), logging.StreamHandler()],
        force=True,
    )


def _machine() -> str:
    cpu = cpu_name()
    return f"{cpu}, {os.cpu_count()} cores, CPU only"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train the Fashion-MNIST reference classifiers of the GenQ benchmark.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=list(MODELS),
        help="train only this model (repeatable; default: all, one after another)",
    )
    parser.add_argument(
        "--epochs", type=_positive_int, help="override the recipe's epochs (every model run)"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--threads", type=_positive_int, default=1, help="torch intra-op threads (default 1)"
    )
    parser.add_argument(
        "--limit",
        type=_positive_int,
        help="train on a seeded subset of this many classifier-part images (smoke tests)",
    )
    parser.add_argument(
        "--test-limit", type=_positive_int, help="evaluate on the first N test images only"
    )
    parser.add_argument("--log", type=Path, help="log file (default <out>/logs/train_<models>.log)")
    return parser


if __name__ == "__main__":
    main()
