"""Train the benchmark's small Stable Diffusion on Fashion-MNIST and measure its agreement.

Trains the generator of ``genq_core.bench.generator`` in two stages (VAE, then UNet + text
encoder) on the generator part of the fixed split only, saves it with ``save_pretrained`` (fp16
safetensors, loadable with ``genq_core.generate.pipeline.load_generator``), and measures how often
the committed BN CNN classifies its images as the prompted class (50 per class, guidance 5, DDIM
25 steps). Next to the pipeline folder ``<out>`` it writes ``<out>-samples.png`` (one row per
class; red frames mark images the classifier put in another class) and ``<out>.json`` (config,
times, losses, agreement, sha256 of every saved file). Checkpoints and loss files go to
``--work-dir``, so ``--resume`` continues a killed run; budgets may grow on resume.

    python benchmarks/fashion/train_generator.py --threads 2     # the recipe: 1000 VAE + 2500
                                        # UNet steps, ~65 min on 2 idle cores
    python benchmarks/fashion/train_generator.py --threads 2 --resume  # continue a killed run
    python benchmarks/fashion/train_generator.py --eval-only         # re-measure a saved folder
    python benchmarks/fashion/train_generator.py --init-from benchmarks/assets/fashion-sd \\
        --config benchmarks/fashion/looks_finetune.yaml --eval-steps 10 --threads 2 \\
        --out benchmarks/assets/fashion-sd-looks   # fine-tune with captions that describe looks
    python benchmarks/fashion/train_generator.py --config tiny.yaml --per-class 10 \\
        --eval-per-class 2 --eval-steps 4 --out /tmp/sd --work-dir /tmp/sd-work   # smoke run
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file

from genq_core.bench.classifiers import BNConvNet
from genq_core.bench.generator import (
    Agreement,
    GeneratorTrainConfig,
    load_generator_data,
    measure_agreement,
    train_unet_and_text_encoder,
    train_vae,
)
from genq_core.bench.runinfo import cpu_name, file_sha256
from genq_core.configio import load_config
from genq_core.generate.pipeline import load_generator

logger = logging.getLogger("bench.train_generator")

ROOT = Path(__file__).resolve().parents[1]
REPO = ROOT.parent
DEFAULT_OUT = ROOT / "assets" / "fashion-sd"
DEFAULT_WORK_DIR = REPO / "runs" / "fashion-sd-train"
DEFAULT_CLASSIFIER = ROOT / "assets" / "bn_cnn_fmnist.safetensors"
GRID_COLUMNS = 10
GRID_SCALE = 2
LABEL_WIDTH = 120


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    out: Path = args.out.resolve()
    report_path = out.with_name(out.name + ".json")
    grid_path = out.with_name(out.name + "-samples.png")
    _setup_logging(args.work_dir / "train_generator.log")
    torch.set_num_threads(args.threads)
    command = " ".join(["python benchmarks/fashion/train_generator.py", *sys.argv[1:]])
    logger.info("command: %s", command)
    classifier = _classifier(args.classifier, args.device)
    report: dict[str, Any] = (
        json.loads(report_path.read_text()) if args.eval_only and report_path.is_file() else {}
    )

    if not args.eval_only:
        # 1. the config: defaults, a file, or the one --init-from was trained with; the command
        # line's seed, budgets and captions on top
        init = _initial_pipeline(args.init_from, args.device) if args.init_from else None
        config = (
            load_config(GeneratorTrainConfig, args.config)
            if args.config
            else _saved_config(args.init_from)
            if args.init_from
            else None
        )
        config = dataclasses.replace(
            config or GeneratorTrainConfig(),
            seed=args.seed,
            **_overrides(args),
        )
        logger.info("config: %s", config)

        # 2. data: the generator part of the fixed split, never the classifier part or test set
        data = load_generator_data(split_seed=config.split_seed, per_class=args.per_class)

        # 3. the two stages, each resumable from its checkpoint in the work dir (a fine-tune
        # keeps --init-from's VAE and starts the second stage from its weights)
        started = time.perf_counter()
        if init is None:
            vae, vae_result = train_vae(
                data,
                config,
                args.work_dir,
                resume=args.resume,
                device=args.device,
                on_progress=_progress(),
            )
        else:
            vae, vae_result = init.vae, None
        pipe, unet_result = train_unet_and_text_encoder(
            vae,
            data,
            config,
            args.work_dir,
            resume=args.resume,
            init=init,
            device=args.device,
            on_progress=_progress(),
        )
        wall_seconds = time.perf_counter() - started

        # 4. save; a previous pipeline folder is replaced whole
        if (out / "model_index.json").is_file():
            shutil.rmtree(out)
        # stored in fp16 (half the size in git); load_generator casts to the dtype asked for
        pipe.to(dtype=getattr(torch, args.save_dtype)).save_pretrained(out)
        report = {
            "pipeline": _relative(out),
            "command": command,
            "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "machine": _machine(args.device),
            "threads": args.threads,
            "versions": {
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
            },
            "train_images": len(data.labels),
            "train_part": f"split_train_indices(train_labels, seed={config.split_seed}).generator"
            + (f", first {args.per_class} per class" if args.per_class else ""),
            "config": config.to_dict(),
            "init_from": _init_record(args.init_from) if args.init_from else None,
            "parameters": _parameters(pipe),
            "vae": {
                **(
                    _rounded(dataclasses.asdict(vae_result))
                    if vae_result is not None
                    else {"kept_from": _relative(args.init_from)}
                ),
                "scaling_factor": float(vae.config["scaling_factor"]),
                "loss_curve": _loss_curve(args.work_dir / "vae_loss.csv") if vae_result else [],
            },
            "unet_and_text_encoder": {
                **_rounded(dataclasses.asdict(unet_result)),
                "loss_curve": _loss_curve(args.work_dir / "unet_loss.csv"),
            },
            "wall_seconds_this_run": round(wall_seconds, 1),
        }

    # 5. the agreement of what was saved: reload the folder the way the benchmark does
    saved = load_generator(out, device=args.device, dtype=torch.float32)
    if not isinstance(saved, StableDiffusionPipeline):
        raise SystemExit(f"{out} holds a {type(saved).__name__}, not a StableDiffusionPipeline")
    agreement = measure_agreement(
        saved,
        classifier,
        num_per_class=args.eval_per_class,
        guidance_scale=args.guidance,
        steps=args.eval_steps,
        seed=args.eval_seed,
        on_progress=_progress(),
    )
    logger.info(
        "agreement %.1f%% (%s)",
        100 * agreement.overall,
        ", ".join(f"{name} {100 * v:.0f}%" for name, v in agreement.per_class.items()),
    )

    # 6. the sample grid and the report
    _write_grid(agreement, grid_path)
    files = _checksums(out)
    report.update(
        {
            "agreement": {
                **_rounded(agreement.to_dict()),
                "classifier": _relative(args.classifier),
                "classifier_sha256": file_sha256(args.classifier),
                "num_per_class": args.eval_per_class,
                "guidance_scale": args.guidance,
                "steps": args.eval_steps,
                "scheduler": type(saved.scheduler).__name__,
                "seed": args.eval_seed,
                "measured": datetime.now(UTC).strftime("%Y-%m-%d"),
                "command": command,
            },
            "files": files,
            "megabytes": round(sum(f["bytes"] for f in files.values()) / 1e6, 1),
            "samples": _relative(grid_path),
        }
    )
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    logger.info(
        "wrote %s (%.1f MB), %s and %s", out, report["megabytes"], grid_path.name, report_path.name
    )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The fields given on the command line (``None``: keep the config's)."""
    pairs = {
        "vae_steps": args.vae_steps,
        "vae_minutes": args.vae_minutes,
        "unet_steps": args.unet_steps,
        "unet_minutes": args.unet_minutes,
        "unet_lr": args.unet_lr,
        "look_words": args.look_words,
    }
    return {name: value for name, value in pairs.items() if value is not None}


def _initial_pipeline(folder: Path, device: str) -> StableDiffusionPipeline:
    """The saved generator a fine-tune starts from, in fp32."""
    pipe = load_generator(folder, device=device, dtype=torch.float32)
    if not isinstance(pipe, StableDiffusionPipeline):
        raise SystemExit(f"{folder} holds a {type(pipe).__name__}, not a StableDiffusionPipeline")
    return pipe


def _saved_config(folder: Path) -> GeneratorTrainConfig:
    """The config ``folder`` was trained with, from the report next to it."""
    report = folder.resolve().with_name(folder.resolve().name + ".json")
    if not report.is_file():
        raise SystemExit(f"--init-from {folder}: no {report} with its config; pass --config")
    return GeneratorTrainConfig.from_dict(json.loads(report.read_text())["config"])


def _init_record(folder: Path) -> dict[str, Any]:
    """Which weights a fine-tune started from: the folder and its files' checksums."""
    return {"pipeline": _relative(folder), "files": _checksums(folder.resolve())}


def _look_words(text: str) -> tuple[str, ...]:
    """``dark,,bright`` -> ``("dark", "", "bright")``; empty text: no look words."""
    return tuple(word.strip() for word in text.split(",")) if text.strip() else ()


def _rounded(values: dict[str, Any]) -> dict[str, Any]:
    """Floats to 5 significant digits, for a readable report."""
    return {k: float(f"{v:.5g}") if isinstance(v, float) else v for k, v in values.items()}


def _classifier(path: Path, device: str) -> BNConvNet:
    model = BNConvNet()
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


def _write_grid(agreement: Agreement, path: Path) -> None:
    """Rows = classes, the first ``GRID_COLUMNS`` images of each; misclassified ones framed red."""
    num_classes = len(agreement.per_class)
    per_class = agreement.labels.numel() // num_classes
    columns = min(GRID_COLUMNS, per_class)
    side = agreement.images.shape[-1] * GRID_SCALE
    grid = Image.new("RGB", (LABEL_WIDTH + columns * (side + 2), num_classes * (side + 2)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for row, (name, fraction) in enumerate(agreement.per_class.items()):
        top = row * (side + 2)
        draw.text((4, top + side // 2 - 12), name, fill="black", font=font)
        draw.text((4, top + side // 2 + 2), f"{100 * fraction:.0f}% agree", fill="gray", font=font)
        for column in range(columns):
            index = row * per_class + column
            tile = Image.fromarray(agreement.images[index].numpy(), mode="L").convert("RGB")
            tile = tile.resize((side, side), Image.Resampling.NEAREST)
            left = LABEL_WIDTH + column * (side + 2)
            wrong = int(agreement.predictions[index]) != int(agreement.labels[index])
            if wrong:
                draw.rectangle((left, top, left + side + 1, top + side + 1), outline="red")
            grid.paste(tile, (left + 1, top + 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def _loss_curve(path: Path) -> list[list[float]]:
    """``[[step, loss, seconds], ...]`` from a stage's loss file."""
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [[int(r["step"]), float(r["loss"]), float(r["seconds"])] for r in rows]


def _parameters(pipe: StableDiffusionPipeline) -> dict[str, int]:
    return {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("vae", "unet", "text_encoder")
    }


def _checksums(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file of the saved pipeline, by path relative to it."""
    return {
        str(path.relative_to(folder)): {"sha256": file_sha256(path), "bytes": path.stat().st_size}
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _relative(path: Path) -> str:
    resolved = path.resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(resolved)


def _progress() -> Callable[[str, int, int], None]:
    """Log a stage's progress every 5% of its total."""
    started = time.perf_counter()

    def report(stage: str, done: int, total: int) -> None:
        if done == total or done % max(1, total // 20) == 0:
            elapsed = time.perf_counter() - started
            logger.info(
                "%s: %d/%d, %.0f s elapsed, ~%.0f s left at most",
                stage,
                done,
                total,
                elapsed,
                elapsed / done * (total - done),
            )

    return report


def _machine(device: str) -> str:
    cpu = cpu_name()
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))} ({cpu})"
    return f"{cpu}, {os.cpu_count()} cores, CPU only"


def _setup_logging(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        handlers=[logging.FileHandler(path, mode="a"), logging.StreamHandler()],
        force=True,
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="pipeline folder")
    parser.add_argument(
        "--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="checkpoints, loss files, log"
    )
    parser.add_argument("--config", type=Path, help="YAML/JSON of GeneratorTrainConfig fields")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--vae-steps", type=_positive_int, help="most VAE steps")
    parser.add_argument("--vae-minutes", type=_positive_float, help="VAE wall-clock budget")
    parser.add_argument("--unet-steps", type=_positive_int, help="most UNet steps")
    parser.add_argument("--unet-minutes", type=_positive_float, help="UNet wall-clock budget")
    parser.add_argument("--unet-lr", type=_positive_float, help="peak UNet + text encoder lr")
    parser.add_argument(
        "--look-words",
        type=_look_words,
        help="comma-separated words describing each image's brightness within its class, "
        "darkest first, empty for none (e.g. dark,,bright; see GeneratorTrainConfig.look_words)",
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        help="fine-tune this saved generator: keep its VAE, start the UNet and text encoder "
        "from its weights (config from <folder>.json unless --config)",
    )
    parser.add_argument("--threads", type=_positive_int, default=2, help="torch threads")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--save-dtype",
        choices=("float16", "float32"),
        default="float16",
        help="dtype of the saved weights (training is fp32)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoints")
    parser.add_argument(
        "--per-class", type=_positive_int, help="train on the first N images per class (smoke)"
    )
    parser.add_argument(
        "--eval-only", action="store_true", help="only re-measure the agreement of --out"
    )
    parser.add_argument("--classifier", type=Path, default=DEFAULT_CLASSIFIER)
    parser.add_argument("--eval-per-class", type=_positive_int, default=50)
    parser.add_argument("--eval-steps", type=_positive_int, default=25)
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=5.0)
    return parser


if __name__ == "__main__":
    main()
