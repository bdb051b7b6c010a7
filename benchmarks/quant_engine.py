"""Quantization engine benchmark on real data: a small BN CNN on Fashion-MNIST.

The classifier is a plain 4-conv BatchNorm CNN (the shape of network the public QDrop reference
was measured on here). It has no residual blocks, so ``brecq`` and ``qdrop`` reconstruct it layer
by layer like ``adaround``; ``qdrop`` differs by its random quantization drop.

Trains (or loads) the float classifier on the classifier part of the training split, calibrates
on 1024 real training images, and quantizes it with every preset at several bit settings, all
through the same ``quantize_model``. Prints one table (top-1 on the 10k test set, time) and writes
``benchmarks/results/quant_engine.json`` and the "Quantization engine" section of BENCHMARKS.md.

    python benchmarks/quant_engine.py                 # full run
    python benchmarks/quant_engine.py --quick         # a few minutes: fewer settings and steps
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import genq_core
from genq_core.bench.classifiers import BNConvNet, evaluate_top1
from genq_core.bench.fashion_mnist import (
    load_split,
    normalize,
    split_train_indices,
    to_float_images,
)
from genq_core.bench.runinfo import cpu_name, file_sha256
from genq_core.quant import QuantConfig, ReconstructionConfig, quantize_model

logger = logging.getLogger("bench.quant_engine")

ROOT = Path(__file__).resolve().parent
WEIGHTS = ROOT / "assets" / "bn_cnn_fmnist.safetensors"
RESULTS = ROOT / "results" / "quant_engine.json"
BENCHMARKS_MD = ROOT.parent / "BENCHMARKS.md"
SECTION = "quant-engine"
# the rounding learning rate of runs saved before the results recorded it
OLD_WEIGHT_LR = 1e-3

ALL_PRESETS = ["minmax", "percentile", "mse", "adaround", "brecq", "qdrop"]
FAST_AND_QDROP = ["minmax", "mse", "qdrop"]
# (weight bits, activation bits) -> presets run there
FULL_PLAN: list[tuple[int, int, list[str]]] = [
    (8, 8, FAST_AND_QDROP),
    (4, 4, ALL_PRESETS),
    (2, 4, ALL_PRESETS),
    (3, 3, FAST_AND_QDROP),
]
QUICK_PLAN: list[tuple[int, int, list[str]]] = [(8, 8, ["minmax"]), (4, 4, FAST_AND_QDROP)]


def main() -> None:
    args = _parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.render:
        # re-render a saved run's table into BENCHMARKS.md (no new measurement)
        saved = json.loads(Path(args.render).read_text())
        _write_section(_markdown(saved), SECTION + (f"-{args.tag}" if args.tag else ""))
        return
    torch.set_num_threads(args.threads)

    # 1. data: classifier part of the training split, 10k test set
    train_images, train_labels = load_split("train")
    test_images, test_labels = load_split("test")
    split = split_train_indices(train_labels, seed=0)
    x_train = normalize(to_float_images(train_images[split.classifier]))
    y_train = train_labels[split.classifier]
    x_test = normalize(to_float_images(test_images))

    # 2. the float classifier: load the committed weights or train them
    model = _classifier(x_train, y_train, retrain=args.retrain)
    fp_top1 = evaluate_top1(model, x_test, test_labels)
    logger.info("float top-1 %.2f", fp_top1)

    # 3. 1024 real calibration images from the classifier's own training images
    gen = torch.Generator().manual_seed(0)
    calibration = x_train[torch.randperm(x_train.shape[0], generator=gen)[: args.num_calib]]

    # 4. every preset at every setting
    plan = _parse_only(args.only) if args.only else QUICK_PLAN if args.quick else FULL_PLAN
    iters = args.iters or (200 if args.quick else ReconstructionConfig.iters)
    reconstruction = ReconstructionConfig(iters=iters)
    if args.weight_lr is not None:
        reconstruction = dataclasses.replace(reconstruction, weight_lr=args.weight_lr)
    rows = []
    for weight_bits, act_bits, presets in plan:
        for preset in presets:
            config = QuantConfig(
                weight_bits=weight_bits,
                act_bits=act_bits,
                preset=preset,
                reconstruction=reconstruction,
                seed=args.seed,
            )
            started = time.perf_counter()
            qmodel = quantize_model(model, config, calibration)
            seconds = time.perf_counter() - started
            top1 = evaluate_top1(qmodel, x_test, test_labels)
            rows.append(
                {
                    "setting": f"W{weight_bits}A{act_bits}",
                    "preset": preset,
                    "top1": top1,
                    "delta": top1 - fp_top1,
                    "seconds": seconds,
                }
            )
            logger.info(
                "W%dA%d %-10s top-1 %.2f  (%.1f s)", weight_bits, act_bits, preset, top1, seconds
            )

    # 5. report
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "command": "python benchmarks/quant_engine.py"
        + (" --quick" if args.quick else "")
        + (f" --iters {args.iters}" if args.iters else "")
        + (f" --weight-lr {args.weight_lr:g}" if args.weight_lr is not None else "")
        + (f" --threads {args.threads}" if args.threads != 1 else "")
        + (f" --only {args.only}" if args.only else "")
        + (f" --tag {args.tag}" if args.tag else ""),
        "machine": _machine(args.threads),
        "float_top1": fp_top1,
        "calibration_images": int(calibration.shape[0]),
        "reconstruction_iters": iters,
        "weight_lr": reconstruction.weight_lr,
        "seed": args.seed,
        "weights_sha256": file_sha256(WEIGHTS),
        "versions": {"genq": genq_core.__version__, "torch": torch.__version__},
        "rows": rows,
    }
    table = _markdown(result)
    print(table)
    if not args.no_write:
        suffix = f"_{args.tag}" if args.tag else ""
        RESULTS.with_name(f"{RESULTS.stem}{suffix}.json").write_text(
            json.dumps(result, indent=2) + "\n"
        )
        _write_section(table, SECTION + (f"-{args.tag}" if args.tag else ""))


def _classifier(x_train: torch.Tensor, y_train: torch.Tensor, retrain: bool) -> BNConvNet:
    """The committed float classifier, trained deterministically when missing (or asked)."""
    torch.manual_seed(0)
    model = BNConvNet()
    if WEIGHTS.is_file() and not retrain:
        model.load_state_dict(load_file(str(WEIGHTS)))
        return model.eval()
    # Adam with a cosine schedule, 6 epochs, batch 128, no augmentation
    started = time.perf_counter()
    epochs, batch_size = 6, 128
    steps = epochs * ((x_train.shape[0] + batch_size - 1) // batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(x_train.shape[0], generator=gen)
        for start in range(0, x_train.shape[0], batch_size):
            index = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(model(x_train[index]), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        logger.info("epoch %d/%d, last loss %.3f", epoch + 1, epochs, loss.item())
    logger.info("trained the float classifier in %.0f s", time.perf_counter() - started)
    WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(WEIGHTS))
    return model.eval()


def _markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    by_key = {(r["setting"], r["preset"]): r for r in rows}
    lines = [
        f"4-conv BN CNN (`BNConvNet`, 97k parameters) on Fashion-MNIST, float top-1 "
        f"**{result['float_top1']:.2f}%** on the 10k test set; {result['calibration_images']} "
        f"real calibration images; first/last layer 8-bit; {result['reconstruction_iters']} "
        f"reconstruction steps per unit (batch 32, rounding learning rate "
        f"{result.get('weight_lr', OLD_WEIGHT_LR):g}). Cells: test top-1 % (change vs float) / "
        "wall seconds for the whole `quantize_model` call. The network has no residual blocks, "
        "so `brecq` and `qdrop` reconstruct it layer by layer as `adaround` does (`brecq` equals "
        "`adaround` here); `qdrop` adds its random activation-quantization drop.",
        "",
        "| preset | " + " | ".join(settings) + " |",
        "|---|" + "---|" * len(settings),
    ]
    for preset in presets:
        cells = []
        for setting in settings:
            row = by_key.get((setting, preset))
            cells.append(
                ""
                if row is None
                else f"{row['top1']:.2f} ({row['delta']:+.2f}) / {row['seconds']:.0f} s"
            )
        lines.append(f"| {preset} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Command: `{result['command']}` ({result['date']}; {result['machine']}; "
        f"genq {result['versions']['genq']}, torch {result['versions']['torch']}).",
    ]
    return "\n".join(lines) + "\n"


def _parse_only(text: str) -> list[tuple[int, int, list[str]]]:
    """``"W4A4:qdrop,W2A4:qdrop"`` -> the plan of those runs."""
    plan: list[tuple[int, int, list[str]]] = []
    for item in text.split(","):
        match = re.fullmatch(r"W(\d)A(\d):(\w+)", item.strip())
        if match is None:
            raise SystemExit(f"--only: expected entries like W4A4:qdrop, got {item!r}")
        plan.append((int(match[1]), int(match[2]), [match[3]]))
    return plan


def _write_section(table: str, section: str) -> None:
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    block = f"{begin}\n{table}{end}"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.is_file() else "# Benchmarks\n"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        title = "Quantization engine" + (f" ({section})" if section != SECTION else "")
        text = text.rstrip("\n") + f"\n\n## {title}\n\n{block}\n"
    BENCHMARKS_MD.write_text(text)


def _machine(threads: int) -> str:
    cpu = cpu_name()
    return f"{cpu}, {os.cpu_count()} cores, {threads} torch thread(s), CPU only"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer settings, presets and steps")
    parser.add_argument("--iters", type=int, help="reconstruction steps per unit")
    parser.add_argument(
        "--weight-lr", type=float, help="rounding learning rate (default: the engine's)"
    )
    parser.add_argument("--num-calib", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--retrain", action="store_true", help="retrain the float classifier")
    parser.add_argument("--only", help="run just these, e.g. W4A4:qdrop,W2A4:qdrop")
    parser.add_argument("--tag", help="names a separate results file and BENCHMARKS.md section")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--render", help="only re-render the table of a saved results JSON")
    return parser


if __name__ == "__main__":
    main()
