"""The ``genq`` command line.

``genq run CONFIG --out DIR`` runs the GenQ pipeline (generate, filter, quantize, evaluate) from a
YAML/JSON config. ``genq quantize`` quantizes a float classifier on a folder of calibration images (or a tensor file)
and, given a labelled evaluation set, reports float vs quantized accuracy as JSON and markdown.
``genq bench fashion`` runs the reference benchmark on Fashion-MNIST (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import genq_core
from genq_core.classifier import load_classifier
from genq_core.data import (
    Preprocessing,
    load_image_folder,
    load_labelled_image_folder,
    load_tensor_file,
)
from genq_core.evaluate import accuracy, agreement, layer_sqnr, model_size, output_sqnr
from genq_core.progress import Canceled
from genq_core.quant import (
    PRESETS,
    QuantConfig,
    ReconstructionConfig,
    export_onnx_qdq,
    quantize_model,
    save_quantized,
)

__all__ = ["main"]

logger = logging.getLogger("genq")

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``genq``; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"genq: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Canceled:
        print("genq: canceled", file=sys.stderr)
        return 130


def run_command(args: argparse.Namespace) -> int:
    """``genq run``: the whole pipeline from a config file, with progress bars."""
    # imported here: the pipeline pulls in diffusers, which ``genq quantize`` does not need
    from genq_core.pipeline import load_genq_config, markdown_report, run_genq

    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_genq_config(args.config)
    if args.device:
        config = dataclasses.replace(config, device=args.device)
    out = Path(args.out)
    with _ProgressBars(disable=args.quiet) as bars:
        result = run_genq(config, out, on_progress=bars.update)
    print(markdown_report(result.report))
    print(f"wrote {len(result.artifacts)} artifacts under {out} (listed in artifacts.json)")
    return 0


def quantize_command(args: argparse.Namespace) -> int:
    """``genq quantize``: load, calibrate, quantize, evaluate, save."""
    # 1. check inputs and load the model
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_classifier(
        args.model, args.arch, args.num_classes, args.in_chans, trust_pickle=args.trust_pickle
    )
    preprocessing = _preprocessing(model, args)
    config = QuantConfig(
        weight_bits=args.weight_bits,
        act_bits=args.act_bits,
        preset=args.preset,
        first_last_bits=None if args.first_last_bits == "same" else int(args.first_last_bits),
        max_calibration_images=args.num_calib,
        seed=args.seed,
        reconstruction=ReconstructionConfig(iters=args.iters, batch_size=args.batch_size),
    )
    if args.onnx and not (args.weight_bits == args.act_bits == 8):
        raise ValueError("--onnx needs --weight-bits 8 --act-bits 8 (ONNX QDQ is 8-bit)")

    # 2. calibration and evaluation data
    calibration = _load_images(args.calib, preprocessing, args.num_calib)
    evaluation = _load_labelled(args.eval, preprocessing) if args.eval else None

    # 3. quantize, with a progress bar per stage
    started = time.perf_counter()
    with _ProgressBars(disable=args.quiet) as bars:
        qmodel = quantize_model(
            model, config, calibration, device=args.device, on_progress=bars.update
        )
    quantize_seconds = time.perf_counter() - started

    # 4. evaluate and report
    report = _report(args, config, model, qmodel, calibration, evaluation, quantize_seconds)
    out = Path(args.output)
    save_quantized(qmodel, out / "model")
    if args.onnx:
        export_onnx_qdq(qmodel, out / "model.onnx", calibration[:1])
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(report))
    print(_markdown(report))
    print(f"wrote {out / 'model'}, {out / 'report.json'}, {out / 'report.md'}")
    return 0


def bench_fashion_command(args: argparse.Namespace) -> int:
    """``genq bench fashion``: the reference benchmark (every source, setting, seed)."""
    # imported here: the benchmark pulls in diffusers and the Fashion-MNIST assets
    from genq_core.bench.fashion_bench import BenchConfig, parse_setting, run_benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.quiet:
        logging.getLogger("genq_core.bench.fashion_bench").setLevel(logging.INFO)
    overrides: dict[str, Any] = {}
    for key, field in (("models", "models"), ("sources", "sources"), ("presets", "presets")):
        if getattr(args, key):
            overrides[field] = tuple(_names(getattr(args, key)))
    if args.settings:
        overrides["settings"] = tuple(parse_setting(s) for s in _names(args.settings))
    if args.data_scarce_settings:
        overrides["data_scarce_settings"] = tuple(
            parse_setting(s) for s in _names(args.data_scarce_settings)
        )
    if args.seeds:
        overrides["seeds"] = tuple(int(s) for s in _names(args.seeds))
    if args.data_scarce_seeds:
        overrides["data_scarce_seeds"] = tuple(int(s) for s in _names(args.data_scarce_seeds))
    if args.ks:
        overrides["data_scarce_ks"] = tuple(int(k) for k in _names(args.ks))
    for key, field in (
        ("iters", "iters"),
        ("num_calib", "num_calibration"),
        ("test_images", "test_images"),
        ("steps", "steps"),
        ("guidance", "guidance_scale"),
        ("inversion_iters", "inversion_iters"),
        ("ti_steps", "textual_inversion_steps"),
        ("data_scarce_model", "data_scarce_model"),
        ("assets", "assets_dir"),
        ("generator", "generator_dir"),
        ("device", "device"),
    ):
        if getattr(args, key) is not None:
            overrides[field] = getattr(args, key)
    if args.no_data_scarce:
        overrides["data_scarce_model"] = None
    config = BenchConfig.quick(**overrides) if args.quick else BenchConfig(**overrides)

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "genq"
    work_dir = Path(
        args.work_dir or cache / ("bench-fashion-quick" if args.quick else "bench-fashion")
    )
    out_dir = Path(
        args.out or (work_dir / "report" if args.quick else "benchmarks/results/fashion")
    )
    benchmarks_md: Path | None = None
    if args.benchmarks_md:
        benchmarks_md = Path(args.benchmarks_md)
    elif not args.quick and not args.no_benchmarks_md:
        benchmarks_md = Path("BENCHMARKS.md")
    result = run_benchmark(
        config,
        work_dir,
        out_dir,
        benchmarks_md=benchmarks_md,
        command=_bench_command(args),
        section=args.section,
    )
    print(result.markdown)
    written = [*result.files, *([benchmarks_md] if benchmarks_md else [])]
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genq", description=__doc__)
    parser.add_argument("--version", action="version", version=genq_core.__version__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    r = commands.add_parser("run", help="generate calibration data and quantize (GenQ pipeline)")
    r.set_defaults(handler=run_command)
    r.add_argument("config", help="YAML or JSON config (see examples/)")
    r.add_argument("--out", required=True, help="output folder for every artifact")
    r.add_argument("--device", help="override the config's device (cpu, cuda, cuda:1)")
    r.add_argument("--threads", type=int, help="torch CPU threads")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    q = commands.add_parser("quantize", help="quantize a classifier on calibration images")
    q.set_defaults(handler=quantize_command)
    model = q.add_argument_group("model")
    model.add_argument("--model", required=True, help="weights file (or pickled module)")
    model.add_argument("--arch", help="timm architecture, or a builder 'package.module:function'")
    model.add_argument("--num-classes", type=int, help="default: inferred from the weights")
    model.add_argument("--in-chans", type=int)
    model.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow --model to be a whole pickled module (runs code from the file)",
    )
    data = q.add_argument_group("data")
    data.add_argument(
        "--calib", required=True, help="folder of images, or a .safetensors/.pt tensor file"
    )
    data.add_argument(
        "--eval", help="labelled set: folder with one sub-folder per class, or a tensor file"
    )
    data.add_argument("--num-calib", type=_positive_int, default=1024)
    data.add_argument("--input-size", type=_int_triple, help="C,H,W (default: the model's)")
    data.add_argument("--mean", type=_float_tuple, help="per-channel mean, e.g. 0.5,0.5,0.5")
    data.add_argument("--std", type=_float_tuple, help="per-channel std")
    data.add_argument("--interpolation", choices=["bilinear", "bicubic", "nearest"])
    data.add_argument("--crop-pct", type=float)
    quant = q.add_argument_group("quantization")
    quant.add_argument("--weight-bits", "-w", type=int, default=4)
    quant.add_argument("--act-bits", "-a", type=int, default=4)
    quant.add_argument("--preset", choices=sorted(PRESETS), default="qdrop")
    quant.add_argument(
        "--first-last-bits", default="8", help="bits of the first and last layers, or 'same'"
    )
    quant.add_argument("--iters", type=_positive_int, default=ReconstructionConfig.iters)
    quant.add_argument("--batch-size", type=_positive_int, default=ReconstructionConfig.batch_size)
    quant.add_argument("--seed", type=int, default=0)
    quant.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    quant.add_argument("--threads", type=_positive_int, help="CPU threads for torch")
    out = q.add_argument_group("output")
    out.add_argument("--output", "-o", required=True, help="directory for the model and report")
    out.add_argument("--onnx", action="store_true", help="also export ONNX QDQ (8-bit only)")
    out.add_argument("--quiet", "-q", action="store_true", help="no progress bars")

    b = commands.add_parser("bench", help="reference benchmarks")
    benchmarks = b.add_subparsers(required=True, metavar="BENCHMARK")
    f = benchmarks.add_parser(
        "fashion",
        help="every calibration source through the same quantizer on Fashion-MNIST",
        description="GenQ's reference benchmark: real data, GenQ, the generator without filters, "
        "each filter alone, model inversion and noise, quantized at every setting and seed and "
        "evaluated on the Fashion-MNIST test set; plus the data-scarce block on the shifted "
        "target. Resumable: finished parts are kept in --work-dir.",
    )
    f.set_defaults(handler=bench_fashion_command)
    f.add_argument("--quick", action="store_true", help="a reduced run of a few CPU minutes")
    f.add_argument("--models", help="comma-separated classifiers (default resnet,vit)")
    f.add_argument("--settings", help="comma-separated, e.g. W8A8,W4A4,W2A4,W4A4-fl4")
    f.add_argument("--sources", help="comma-separated subset of the calibration sources")
    f.add_argument("--seeds", help="comma-separated seeds (default 0,1,2)")
    f.add_argument("--presets", help="comma-separated presets (default qdrop,minmax)")
    f.add_argument("--iters", type=_positive_int, help="reconstruction steps per block")
    f.add_argument("--num-calib", type=_positive_int, help="calibration images per run")
    f.add_argument("--test-images", type=_positive_int, help="evaluate on the first N only")
    f.add_argument("--steps", type=_positive_int, help="DDIM steps per generated image")
    f.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    f.add_argument("--inversion-iters", type=_positive_int, help="model inversion steps")
    f.add_argument("--ti-steps", type=_positive_int, help="textual inversion steps")
    f.add_argument("--ks", help="comma-separated k of the data-scarce block (default 1,5,10)")
    f.add_argument("--data-scarce-model", help="the shifted target (default resnet_shifted)")
    f.add_argument("--data-scarce-settings", help="comma-separated settings of that block")
    f.add_argument(
        "--data-scarce-seeds", help="comma-separated seeds of that block (default --seeds)"
    )
    f.add_argument("--no-data-scarce", action="store_true", help="skip the data-scarce block")
    f.add_argument("--assets", help="assets folder (default benchmarks/assets)")
    f.add_argument("--generator", help="generator folder (default <assets>/fashion-sd)")
    f.add_argument(
        "--work-dir", help="cache of pools, calibration sets and runs (default ~/.cache/genq/...)"
    )
    f.add_argument(
        "--out",
        help="results folder (default benchmarks/results/fashion; quick: <work-dir>/report)",
    )
    f.add_argument(
        "--benchmarks-md", help="BENCHMARKS.md to update (default BENCHMARKS.md; quick: none)"
    )
    f.add_argument("--no-benchmarks-md", action="store_true", help="leave BENCHMARKS.md alone")
    f.add_argument(
        "--section",
        default="fashion-bench",
        help="BENCHMARKS.md section to replace (default fashion-bench; another name, e.g. "
        "fashion-bench-vit, keeps a second table)",
    )
    f.add_argument("--device", help="cpu (default), cuda, cuda:1")
    f.add_argument("--threads", type=_positive_int, help="torch CPU threads")
    f.add_argument("-q", "--quiet", action="store_true", help="no progress logging")
    return parser


# the options of ``genq bench fashion``, in the order the echoed command lists them
_BENCH_FASHION_OPTIONS = (
    "quick",
    "models",
    "settings",
    "sources",
    "seeds",
    "presets",
    "iters",
    "num_calib",
    "test_images",
    "steps",
    "guidance",
    "inversion_iters",
    "ti_steps",
    "ks",
    "data_scarce_model",
    "data_scarce_settings",
    "no_data_scarce",
    "assets",
    "generator",
    "device",
    "threads",
)


def _bench_command(args: argparse.Namespace) -> str:
    """The command line that reproduces the benchmark's numbers (paths of outputs left out)."""
    words = ["genq", "bench", "fashion"]
    for key in _BENCH_FASHION_OPTIONS:
        value = getattr(args, key)
        flag = "--" + key.replace("_", "-")
        if value is True:
            words.append(flag)
        elif value is not None and value is not False:
            words += [flag, shlex.quote(str(value))]
    return " ".join(words)


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _preprocessing(model: torch.nn.Module, args: argparse.Namespace) -> Preprocessing:
    overrides: dict[str, Any] = {}
    if args.input_size:
        overrides["input_size"] = args.input_size
    elif args.in_chans:
        base = Preprocessing.from_model(model)
        overrides["input_size"] = (args.in_chans, *base.input_size[1:])
    for key in ("mean", "std", "interpolation", "crop_pct"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    channels = overrides.get("input_size", (None,))[0]
    if channels == 1:
        overrides.setdefault("mean", (0.5,))
        overrides.setdefault("std", (0.5,))
    return Preprocessing.from_model(model, overrides)


def _load_images(source: str, preprocessing: Preprocessing, limit: int) -> torch.Tensor:
    path = Path(source)
    if path.is_dir():
        return load_image_folder(path, preprocessing, limit)
    images, _ = load_tensor_file(path)
    return images[:limit]


def _load_labelled(source: str, preprocessing: Preprocessing) -> tuple[torch.Tensor, torch.Tensor]:
    path = Path(source)
    if path.is_dir():
        images, labels, _ = load_labelled_image_folder(path, preprocessing)
        return images, labels
    images, maybe_labels = load_tensor_file(path)
    if maybe_labels is None:
        raise ValueError(f"{path} has no 'labels'; --eval needs a labelled set")
    return images, maybe_labels


def _report(
    args: argparse.Namespace,
    config: QuantConfig,
    model: torch.nn.Module,
    qmodel: torch.nn.Module,
    calibration: torch.Tensor,
    evaluation: tuple[torch.Tensor, torch.Tensor] | None,
    quantize_seconds: float,
) -> dict[str, Any]:
    from genq_core.quant import QuantizedModel

    assert isinstance(qmodel, QuantizedModel)
    device = args.device
    model = model.to(device)
    size = model_size(qmodel)
    report: dict[str, Any] = {
        "model": {"file": str(args.model), "arch": args.arch},
        "config": config.to_dict(),
        "calibration": {"source": str(args.calib), "images": int(calibration.shape[0])},
        "quantize_seconds": round(quantize_seconds, 2),
        "size": {
            "float_bytes": size.float_bytes,
            "quantized_bytes": size.quantized_bytes,
            "compression": round(size.compression, 2),
        },
        "calibration_set": {
            "output_sqnr_db": round(output_sqnr(model, qmodel, calibration, device), 2),
            "layer_sqnr_db": {
                k: round(v, 2) for k, v in layer_sqnr(qmodel, calibration, device).items()
            },
        },
        "versions": {
            "genq": genq_core.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    if evaluation is not None:
        images, labels = evaluation
        report["eval"] = {
            "source": str(args.eval),
            "images": int(images.shape[0]),
            "float": accuracy(model, (images, labels), device=device),
            "quantized": accuracy(qmodel, (images, labels), device=device),
            "agreement": agreement(model, qmodel, images, device=device),
        }
    return report


def _markdown(report: dict[str, Any]) -> str:
    config = report["config"]
    lines = [
        f"# GenQ quantization report: W{config['weight_bits']}A{config['act_bits']} "
        f"{config['preset']}",
        "",
        f"- model: `{report['model']['file']}` ({report['model']['arch'] or 'pickled module'})",
        f"- calibration: {report['calibration']['images']} images from "
        f"`{report['calibration']['source']}`",
        f"- quantization time: {report['quantize_seconds']} s",
        f"- size: {report['size']['float_bytes']} B float -> "
        f"{report['size']['quantized_bytes']} B ({report['size']['compression']}x)",
        f"- output SQNR on the calibration set: {report['calibration_set']['output_sqnr_db']} dB",
    ]
    if "eval" in report:
        ev = report["eval"]
        lines += [
            "",
            f"| model | top-1 | top-5 | ({ev['images']} images from `{ev['source']}`)",
            "|---|---|---|",
            f"| float | {ev['float']['top1']:.2f} | {ev['float']['top5']:.2f} |",
            f"| quantized | {ev['quantized']['top1']:.2f} | {ev['quantized']['top5']:.2f} |",
            "",
            f"Top-1 agreement with the float model: {ev['agreement']:.2f}%",
        ]
    return "\n".join(lines) + "\n"


class _ProgressBars:
    """One tqdm bar per stage reported through ``on_progress(stage, done, total)``."""

    def __init__(self, disable: bool):
        self.disable = disable
        self.bars: dict[str, tqdm[Any]] = {}

    def __enter__(self) -> _ProgressBars:
        return self

    def __exit__(self, *_: object) -> None:
        for bar in self.bars.values():
            bar.close()

    def update(self, stage: str, done: int, total: int) -> None:
        bar = self.bars.get(stage)
        if bar is None:
            bar = tqdm(total=total, desc=stage, disable=self.disable, file=sys.stderr)
            self.bars[stage] = bar
        bar.update(done - bar.n)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _int_triple(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected C,H,W, got {text!r}")
    return parts[0], parts[1], parts[2]


def _float_tuple(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


if __name__ == "__main__":
    sys.exit(main())
