"""The ``genq`` command line.

On this machine: ``genq run CONFIG --out DIR`` runs the GenQ pipeline (generate, filter, quantize,
evaluate) from a YAML/JSON config. ``genq quantize`` quantizes a float classifier on a folder of
calibration images (or a tensor file) and, given a labelled evaluation set, reports float vs
quantized accuracy as JSON and markdown. ``genq bench fashion`` runs the reference benchmark on
Fashion-MNIST (``--quick`` for a smoke run).

``genq serve --embedded`` runs the whole service in this process (API, one worker, local storage,
an in-process job store; ``services.embedded``); ``genq serve`` alone runs the distributed mode's
API (its workers are ``python -m services.workers``).

Against a GenQ server (``--server`` or ``$GENQ_SERVER``, ``--api-key`` or ``$GENQ_API_KEY``):
``genq submit FILE [--wait]``, ``genq status JOB``, ``genq wait JOB``, ``genq download JOB``,
``genq cancel JOB``, ``genq list`` and ``genq upload FILE --kind KIND``, through
:class:`genq_core.client.GenQClient`. ``--json`` prints machine-readable output; an error prints
the API's code and message and exits 2 when the request was at fault, 1 otherwise. These commands
need httpx, never torch: this module imports torch only inside the local commands.
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
from typing import TYPE_CHECKING, Any

import genq_core
from genq_core.progress import Canceled

if TYPE_CHECKING:
    import torch
    from tqdm import tqdm

    from genq_core.client import GenQClient
    from genq_core.data import Preprocessing
    from genq_core.quant import QuantConfig

__all__ = ["main"]

logger = logging.getLogger("genq")

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130

# Mirrors of genq_core.quant's registry and defaults, so that building the parser needs no torch
# (tests/genq_core/test_cli_client.py checks that they match).
_PRESET_NAMES = ("adaround", "brecq", "minmax", "mse", "percentile", "qdrop")
_RECONSTRUCTION_ITERS = 2000
_RECONSTRUCTION_BATCH_SIZE = 32
# What the server accepts (services.common.jobs, services.api.uploads; the same test checks them).
_JOB_STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
_JOB_KINDS = ("genq", "generate", "quantize")
_UPLOAD_KINDS = ("model", "calibration", "kshot", "eval")
_STAGES = ("inverting", "generating", "filtering", "quantizing", "evaluating", "uploading")


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
        return EXIT_INTERRUPTED


def run_command(args: argparse.Namespace) -> int:
    """``genq run``: the whole pipeline from a config file, with progress bars."""
    # imported here: the pipeline pulls in diffusers, which ``genq quantize`` does not need
    import torch

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
    import torch

    from genq_core.classifier import load_classifier
    from genq_core.quant import (
        QuantConfig,
        ReconstructionConfig,
        export_onnx_qdq,
        quantize_model,
        save_quantized,
    )

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
        bn_align_iters=args.bn_align_iters,
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
    import torch

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
    if args.data_scarce_rows:
        overrides["data_scarce_rows"] = tuple(_names(args.data_scarce_rows))
    if args.ks:
        overrides["data_scarce_ks"] = tuple(int(k) for k in _names(args.ks))
    for key, field in (
        ("iters", "iters"),
        ("num_calib", "num_calibration"),
        ("test_images", "test_images"),
        ("steps", "steps"),
        ("guidance", "guidance_scale"),
        ("energy_keep", "energy_keep"),
        ("distribution_keep", "distribution_keep"),
        ("inversion_iters", "inversion_iters"),
        ("bn_align_iters", "bn_align_iters"),
        ("ti_steps", "textual_inversion_steps"),
        ("ti_lr", "textual_inversion_lr"),
        ("data_scarce_model", "data_scarce_model"),
        ("assets", "assets_dir"),
        ("generator", "generator_dir"),
        ("device", "device"),
    ):
        if getattr(args, key) is not None:
            overrides[field] = getattr(args, key)
    if args.no_data_scarce:
        overrides["data_scarce_model"] = None
    if args.ti_per_class:
        overrides["textual_inversion_per_class"] = True
    if args.kshot_share is not None:
        overrides["kshot_share"] = args.kshot_share
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
        cached_only=args.cached_only,
    )
    print(result.markdown)
    written = [*result.files, *([benchmarks_md] if benchmarks_md else [])]
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def serve_command(args: argparse.Namespace) -> int:
    """``genq serve``: the service's API, with (``--embedded``) or without its workers."""
    if not args.embedded and (args.data_dir or args.workers != 1 or args.threads):
        raise ValueError(
            "--data-dir, --workers and --threads are for --embedded; the distributed "
            "workers take GENQ_* settings (python -m services.workers)"
        )
    try:
        import uvicorn

        if args.embedded:
            from services.embedded import serve
    except ImportError as err:
        raise ValueError(
            f"genq serve needs the service's packages ({err}); install the 'api' and 'worker' "
            "extras: pip install -e '.[api,worker]'"
        ) from None
    log_level = "debug" if args.verbose else args.log_level
    from services.common.logs import configure_logging

    json_lines = (args.log_format or ("text" if args.embedded else "json")) == "json"
    configure_logging(log_level, json_lines=json_lines)
    if args.embedded:
        data_dir = Path(args.data_dir or os.environ.get("GENQ_DATA_DIR") or "runs/service")
        serve(
            data_dir,
            host=args.host,
            port=args.port,
            workers=args.workers,
            threads=args.threads,
            log_level=log_level,
        )
    else:
        # the distributed mode's settings all come from GENQ_* (services.api.settings)
        uvicorn.run(
            "services.api.app:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            log_level=log_level,
            # uvicorn logs through the root handler above; the API's own access lines (with the
            # request id, tenant and job id) replace uvicorn's
            log_config=None,
            access_log=False,
        )
    return 0


def stack_command(args: argparse.Namespace) -> int:
    """``genq stack up | down | status | env``: the distributed topology as local processes."""
    try:
        from services.stack import LocalStack, StackError, describe
    except ImportError as err:
        raise ValueError(
            f"genq stack needs the service's packages ({err}); install the 'api' and 'worker' "
            "extras"
        ) from None
    stack = LocalStack(
        Path(args.dir),
        workers=args.workers,
        worker_cpus=args.worker_cpus,
        api_port=args.api_port,
    )
    try:
        if args.action == "up":
            print(f"starting the stack in {stack.folder} (logs in {stack.folder / 'logs'}) ...")
            state = stack.up()
            for name, url in state.urls.items():
                print(f"  {name}: {url}")
            print(f"use it: source {stack.folder / 'stack.env'}   (GENQ_SERVER, GENQ_API_KEY)")
        elif args.action == "down":
            stopped = stack.down()
            print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
        elif args.action == "env":
            for name, value in stack.env().items():
                print(f"export {name}={shlex.quote(value)}")
        else:
            rows = describe(stack)
            if not rows:
                print(f"no stack in {stack.folder}")
            for row in rows:
                state_text = "running" if row["running"] else "stopped"
                port = f":{row['port']}" if row["port"] else ""
                print(
                    f"{row['name']:<14} {state_text:<8} pid {row['pid']:<8} {port:<7} {row['log']}"
                )
            return 0 if rows and all(row["running"] for row in rows) else EXIT_FAILURE
    except StackError as err:
        print(f"genq: error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def submit_command(args: argparse.Namespace, client: GenQClient) -> int:
    """``genq submit``: send a job request (YAML or JSON) and print its id; ``--wait`` follows it."""
    # 1. the request, checked to be a mapping before anything is sent
    body = _load_request(args.file)
    # 2. submit (the client sends an Idempotency-Key, so its own retries never make two jobs)
    accepted = client.submit(body, idempotency_key=args.idempotency_key)
    job_id = accepted["id"]
    if not args.wait:
        if args.json:
            _print_json(accepted)
        else:
            print(job_id)
            print(
                f"submitted a {accepted['kind']} job ({accepted['status']}); "
                f"follow it with: genq wait {job_id}",
                file=sys.stderr,
            )
        return 0
    # 3. or follow it to its end
    if not args.json:
        print(f"submitted {job_id} ({accepted['kind']})", file=sys.stderr)
    return _wait_and_report(args, client, job_id, timeout=args.timeout)


def status_command(args: argparse.Namespace, client: GenQClient) -> int:
    """``genq status``: a job's status, stage, progress and error."""
    job = client.get(args.job)
    if args.json:
        _print_json(job)
    else:
        print(_job_summary(job))
    return 0


def wait_command(args: argparse.Namespace, client: GenQClient) -> int:
    """``genq wait``: follow a job's progress until it ends; exit 0 only if it succeeded."""
    return _wait_and_report(args, client, args.job, timeout=args.timeout)


def download_command(args: argparse.Namespace, client: GenQClient) -> int:
    """``genq download``: fetch a job's artifacts (checked against their sha256) into a folder."""
    dest = Path(args.dest) if args.dest else Path(args.job)
    paths = client.download(args.job, dest, names=args.name)
    if args.json:
        _print_json([str(path) for path in paths])
    else:
        for path in paths:
            print(path)
        print(f"downloaded {len(paths)} artifacts of {args.job} into {dest}", file=sys.stderr)
    return 0


def cancel_command(args: argparse.Namespace, client: GenQClient) -> int:
    """``genq cancel``: cancel a job (a no-op on a finished one)."""
    job = client.cancel(args.job)
    if args.json:
        _print_json(job)
    elif job["status"] == "canceled":
        print(f"{job['id']} canceled")
    elif job["cancel_requested"]:
        print(f"{job['id']} cancel requested; it stops at its next checkpoint ({job['status']})")
    else:
        print(f"{job['id']} already {job['status']}; nothing to cancel")
    return 0


def list_command(args: argparse.Namespace, client: GenQClient) -> int:
    """``genq list``: the tenant's jobs, newest first."""
    jobs = list(client.list(status=args.status, kind=args.kind, limit=args.limit))
    if args.json:
        _print_json(jobs)
        return 0
    if not jobs:
        print("no jobs", file=sys.stderr)
        return 0
    rows = [("ID", "KIND", "STATUS", "STAGE", "CREATED")]
    rows += [
        (job["id"], job["kind"], job["status"], job["stage"] or "-", _when(job["created_at"]))
        for job in jobs
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0


def upload_command(args: argparse.Namespace, client: GenQClient) -> int:
    """``genq upload``: upload a model or an image set, validated by the server; prints its id."""
    upload = client.upload(args.file, args.kind)
    if args.json:
        _print_json(upload)
    else:
        print(upload["id"])
        print(
            f"uploaded {upload['filename']}: {upload['kind']} ({upload['format']}), "
            f"{upload['size']} bytes, {upload['status']}; use it as upload id {upload['id']}",
            file=sys.stderr,
        )
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
    quant.add_argument("--preset", choices=_PRESET_NAMES, default="qdrop")
    quant.add_argument(
        "--first-last-bits", default="8", help="bits of the first and last layers, or 'same'"
    )
    quant.add_argument("--iters", type=_positive_int, default=_RECONSTRUCTION_ITERS)
    quant.add_argument("--batch-size", type=_positive_int, default=_RECONSTRUCTION_BATCH_SIZE)
    quant.add_argument("--seed", type=int, default=0)
    quant.add_argument(
        "--bn-align-iters",
        type=_non_negative_int,
        default=0,
        help="steps that pull synthetic calibration images towards the model's BatchNorm "
        "statistics first (0: off; 50 on the reference benchmark)",
    )
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
    f.add_argument(
        "--energy-keep", type=float, help="fraction of each class the energy filter keeps (0.5)"
    )
    f.add_argument(
        "--distribution-keep",
        type=float,
        help="fraction the distribution filter then keeps (0.8); the pool grows to match",
    )
    f.add_argument("--inversion-iters", type=_positive_int, help="model inversion steps")
    f.add_argument(
        "--bn-align-iters", type=_positive_int, help="BN alignment steps of genq_aligned (50)"
    )
    f.add_argument("--ti-steps", type=_positive_int, help="textual inversion steps")
    f.add_argument("--ti-lr", type=float, help="textual inversion learning rate (5e-3)")
    f.add_argument(
        "--ti-per-class",
        action="store_true",
        help="textual inversion learns one token per class, not one shared style token",
    )
    f.add_argument(
        "--kshot-share",
        type=float,
        help="share of the calibration set the k real images fill at least (repeated) in the "
        "rows that add them to a generated set (default: each once; GenQ jobs use 0.5)",
    )
    f.add_argument("--ks", help="comma-separated k of the data-scarce block (default 1,5,10)")
    f.add_argument("--data-scarce-model", help="the shifted target (default resnet_shifted)")
    f.add_argument("--data-scarce-settings", help="comma-separated settings of that block")
    f.add_argument(
        "--data-scarce-seeds", help="comma-separated seeds of that block (default --seeds)"
    )
    f.add_argument(
        "--data-scarce-rows",
        help="comma-separated rows of that block to run (default all: textual_inversion, "
        "textual_inversion_with_k, plain_prompts, plain_prompts_with_k, "
        "textual_inversion_aligned, textual_inversion_with_k_aligned, "
        "plain_prompts_with_k_aligned, real_k, real_full)",
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
        "--cached-only",
        action="store_true",
        help="run nothing: report what --work-dir holds (e.g. after one invocation per seed)",
    )
    f.add_argument(
        "--section",
        type=_section_name,
        default="fashion-bench",
        help="BENCHMARKS.md section to replace (default fashion-bench; another name, e.g. "
        "fashion-bench-vit, keeps a second table)",
    )
    f.add_argument("--device", help="cpu (default), cuda, cuda:1")
    f.add_argument("--threads", type=_positive_int, help="torch CPU threads")
    f.add_argument("-q", "--quiet", action="store_true", help="no progress logging")

    sv = commands.add_parser(
        "serve",
        help="run the GenQ service",
        description="Run the REST API. --embedded: the whole service in this process (one "
        "worker, local storage, an in-process job store saved under --data-dir), no external "
        "servers. Without it: the distributed mode's API, configured by GENQ_* variables "
        "(Redis, S3, API keys); run its workers with python -m services.workers.",
    )
    sv.set_defaults(handler=serve_command)
    sv.add_argument("--embedded", action="store_true", help="API and workers in this process")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    sv.add_argument("--port", type=_positive_int, default=8000, help="port (default 8000)")
    sv.add_argument(
        "--data-dir",
        metavar="DIR",
        help="embedded: storage, job store and API key (default $GENQ_DATA_DIR or runs/service)",
    )
    sv.add_argument(
        "--workers", type=_positive_int, default=1, help="embedded: in-process workers (1)"
    )
    sv.add_argument("--threads", type=_positive_int, help="embedded: torch CPU threads")
    sv.add_argument(
        "--log-format",
        choices=("json", "text"),
        help="json lines with the job and request ids (default), or text (default embedded)",
    )
    sv.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="server log level (default info)",
    )

    sk = commands.add_parser(
        "stack",
        help="run the distributed topology as local processes",
        description="up: start redis-server, an S3 server, a Ray head and worker nodes, the "
        "dispatcher and the API on this machine (logs, PIDs and data in --dir); down: stop "
        "exactly those; status: which run (exit 1 unless all do); env: the client settings.",
    )
    sk.set_defaults(handler=stack_command)
    sk.add_argument("action", choices=("up", "down", "status", "env"))
    sk.add_argument("--dir", default="runs/stack", help="the stack's folder (runs/stack)")
    sk.add_argument("--workers", type=_positive_int, default=1, help="Ray worker nodes (1)")
    sk.add_argument("--worker-cpus", type=_positive_int, default=1, help="CPUs per worker node (1)")
    sk.add_argument("--api-port", type=_positive_int, help="the API's port (default: a free one)")

    # ---- against a server ----
    server = _server_options()
    s = commands.add_parser(
        "submit",
        parents=[server],
        help="submit a job to a GenQ server",
        description="Submit a job request (a YAML or JSON file, '-' for stdin: kind genq, "
        "generate or quantize) and print its id.",
    )
    s.set_defaults(handler=_client_handler(submit_command))
    s.add_argument("file", help="the job request, YAML or JSON ('-': read stdin)")
    s.add_argument("--wait", action="store_true", help="follow the job until it ends")
    s.add_argument(
        "--timeout", type=_positive_float, metavar="S", help="with --wait: give up after S seconds"
    )
    s.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="resubmitting with the same key returns the same job instead of a new one",
    )
    s.add_argument("-q", "--quiet", action="store_true", help="with --wait: no progress output")

    st = commands.add_parser("status", parents=[server], help="a job's status and progress")
    st.set_defaults(handler=_client_handler(status_command))
    st.add_argument("job", help="job id")

    w = commands.add_parser(
        "wait",
        parents=[server],
        help="follow a job until it ends",
        description="Show a job's progress until it ends; exit 0 if it succeeded, 1 otherwise.",
    )
    w.set_defaults(handler=_client_handler(wait_command))
    w.add_argument("job", help="job id")
    w.add_argument(
        "--timeout", type=_positive_float, metavar="S", help="give up after S seconds (exit 1)"
    )
    w.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    d = commands.add_parser(
        "download",
        parents=[server],
        help="download a job's artifacts",
        description="Download a job's artifacts through their presigned URLs, each checked "
        "against the sha256 of the job's manifest.",
    )
    d.set_defaults(handler=_client_handler(download_command))
    d.add_argument("job", help="job id")
    d.add_argument("--dest", metavar="DIR", help="folder to download into (default: ./JOB)")
    d.add_argument(
        "--name",
        action="append",
        metavar="NAME",
        help="only this artifact (its name or key); repeat for several",
    )

    c = commands.add_parser("cancel", parents=[server], help="cancel a job")
    c.set_defaults(handler=_client_handler(cancel_command))
    c.add_argument("job", help="job id")

    ls = commands.add_parser("list", parents=[server], help="your jobs, newest first")
    ls.set_defaults(handler=_client_handler(list_command))
    ls.add_argument("--status", choices=_JOB_STATUSES)
    ls.add_argument("--kind", choices=_JOB_KINDS)
    ls.add_argument(
        "--limit", type=_positive_int, default=20, metavar="N", help="at most N jobs (default 20)"
    )

    u = commands.add_parser(
        "upload",
        parents=[server],
        help="upload a model or an image set for jobs to use",
        description="Upload a model (.safetensors weights or a torch.export .pt2) or an image "
        "set (.zip, .tar, .tar.gz) and print its upload id; the server validates it first.",
    )
    u.set_defaults(handler=_client_handler(upload_command))
    u.add_argument("file", help="the file to upload")
    u.add_argument("--kind", required=True, choices=_UPLOAD_KINDS, help="what the upload is for")
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
    "energy_keep",
    "distribution_keep",
    "inversion_iters",
    "bn_align_iters",
    "ti_steps",
    "ti_lr",
    "ti_per_class",
    "kshot_share",
    "ks",
    "data_scarce_model",
    "data_scarce_settings",
    "data_scarce_seeds",
    "data_scarce_rows",
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
    from genq_core.data import Preprocessing

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
    from genq_core.data import load_image_folder, load_tensor_file

    path = Path(source)
    if path.is_dir():
        return load_image_folder(path, preprocessing, limit)
    images, _ = load_tensor_file(path)
    return images[:limit]


def _load_labelled(source: str, preprocessing: Preprocessing) -> tuple[torch.Tensor, torch.Tensor]:
    from genq_core.data import load_labelled_image_folder, load_tensor_file

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
    import torch

    from genq_core.evaluate import accuracy, agreement, layer_sqnr, model_size, output_sqnr
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
            from tqdm import tqdm

            bar = tqdm(total=total, desc=stage, disable=self.disable, file=sys.stderr)
            self.bars[stage] = bar
        bar.update(done - bar.n)


def _section_name(text: str) -> str:
    from genq_core.bench.fashion_bench import check_section_name

    try:
        return check_section_name(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("section: ")) from err


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
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


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


# ---- helpers of the client commands -------------------------------------------------------------


def _server_options() -> argparse.ArgumentParser:
    """The options every command against a server takes."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("server")
    group.add_argument(
        "--server", metavar="URL", help="the GenQ server's URL (default: $GENQ_SERVER)"
    )
    group.add_argument(
        "--api-key",
        metavar="KEY",
        help="API key (default: $GENQ_API_KEY, which is better: arguments show in ps)",
    )
    group.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return options


def _client_handler(
    command: Callable[[argparse.Namespace, GenQClient], int],
) -> Callable[[argparse.Namespace], int]:
    """``command`` run with a client of the configured server; the API's errors become a line
    on stderr (code and message) and exit code 2 when the request was at fault, else 1."""

    def handler(args: argparse.Namespace) -> int:
        # imported here: the local commands must keep working where httpx is not installed
        try:
            from genq_core.client import GenQClient, GenQError
        except ImportError as err:
            print(f"genq: error: the server commands need httpx ({err})", file=sys.stderr)
            return EXIT_FAILURE
        server = args.server or os.environ.get("GENQ_SERVER")
        api_key = args.api_key or os.environ.get("GENQ_API_KEY")
        if not server:
            raise ValueError("no server: pass --server URL or set GENQ_SERVER")
        if not api_key:
            raise ValueError("no API key: set GENQ_API_KEY (or pass --api-key)")
        try:
            with GenQClient(server, api_key) as client:
                return command(args, client)
        except GenQError as err:
            print(f"genq: error: {err.code}: {err.message}", file=sys.stderr)
            return EXIT_USAGE if err.is_user_error else EXIT_FAILURE
        except KeyboardInterrupt:
            print("genq: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED

    return handler


def _load_request(source: str) -> dict[str, Any]:
    """A job request from a JSON or YAML file (``-``: stdin); ``ValueError`` naming the problem."""
    if source == "-":
        text, name = sys.stdin.read(), "stdin"
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist or is not a file")
        text, name = path.read_text(), str(path)
    if source.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{name} is not valid JSON: {err}") from err
    else:
        try:
            import yaml
        except ImportError:
            raise ValueError(
                f"reading {name} needs PyYAML (pip install pyyaml); or give a .json file"
            ) from None
        try:
            data = yaml.safe_load(text)  # YAML includes JSON
        except yaml.YAMLError as err:
            raise ValueError(f"{name} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(
            f"{name} must hold a job request (a mapping with 'kind'), got {type(data).__name__}"
        )
    return data


def _wait_and_report(
    args: argparse.Namespace, client: GenQClient, job_id: str, timeout: float | None
) -> int:
    """Follow the job with a progress view, print its final state; 0 only if it succeeded."""
    try:
        with _JobProgressView(quiet=args.quiet or args.json) as view:
            job = client.wait(job_id, timeout=timeout, on_update=view.update)
    except KeyboardInterrupt:
        print(
            f"genq: stopped waiting; {job_id} keeps running (genq cancel {job_id} stops it)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if args.json:
        _print_json(job)
    else:
        print(_job_summary(job))
    return 0 if job["status"] == "succeeded" else EXIT_FAILURE


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _job_summary(job: dict[str, Any]) -> str:
    """A job for people: id, kind and status, then progress, error and timestamps."""
    state = job["status"]
    details = [f"stage {job['stage']}"] if job.get("stage") and state == "running" else []
    if job.get("attempt", 0) > 1:
        details.append(f"attempt {job['attempt']}")
    if job.get("cancel_requested") and state not in ("canceled", "succeeded", "failed"):
        details.append("cancel requested")
    head = f"{job['id']}  {job['kind']}  {state}" + (f" ({', '.join(details)})" if details else "")
    lines = [head]
    progress = _progress_text(job.get("progress"))
    if progress:
        lines.append(f"  progress  {progress}")
    error = job.get("error")
    if error:
        retry = " (retryable)" if error.get("retryable") else ""
        lines.append(f"  error     {error['code']}: {error['message']}{retry}")
    lines.append(f"  created   {_when(job['created_at'])}")
    lines.append(f"  updated   {_when(job['updated_at'])}")
    return "\n".join(lines)


def _progress_text(progress: dict[str, Any] | None) -> str:
    """``generating 64/64, filtering 64/64; images 64 generated, 32 kept; 3 blocks reconstructed``."""
    if not progress:
        return ""
    stages = sorted((progress.get("stages") or {}).items(), key=lambda item: _stage_rank(item[0]))
    parts = [", ".join(f"{stage} {p.get('done', 0)}/{p.get('total', 0)}" for stage, p in stages)]
    parts.append(_counters_text(progress))
    return "; ".join(part for part in parts if part)


def _counters_text(progress: dict[str, Any]) -> str:
    """``images 64 generated, 32 kept; 3 blocks reconstructed`` (what is non-zero of it)."""
    parts = []
    generated, kept = progress.get("images_generated", 0), progress.get("images_kept", 0)
    if generated or kept:
        parts.append(f"images {generated} generated, {kept} kept")
    blocks = progress.get("blocks_reconstructed", 0)
    if blocks:
        parts.append(f"{blocks} block{'s' if blocks != 1 else ''} reconstructed")
    return "; ".join(parts)


def _has_tqdm() -> bool:
    try:
        import tqdm  # noqa: F401  (optional: plain status lines without it)
    except ImportError:
        return False
    return True


def _stage_rank(stage: str) -> int:
    return _STAGES.index(stage) if stage in _STAGES else len(_STAGES)


def _when(timestamp: str) -> str:
    """An ISO timestamp to the second, as ``2025-01-31 12:00:05``."""
    return timestamp.replace("T", " ")[:19]


class _JobProgressView:
    """Shows what ``GenQClient.wait`` reports on stderr: a status line on each change of status
    or stage (``running  generating``), then on a terminal a tqdm bar of the stage's done/total
    with the job's counters, elsewhere status lines with them
    (``running  generating 32/64  images 32 generated, 0 kept``), at most one a second.

    Updates are job records or events: both carry ``status``, ``stage`` and ``progress`` (events
    other than progress events carry ``None``; the last progress seen is kept)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.stream = sys.stderr
        self.progress: dict[str, Any] = {}
        self.use_bars = not quiet and self.stream.isatty() and _has_tqdm()
        self._bar: tqdm[Any] | None = None
        self._state: tuple[Any, Any] = (None, None)
        self._printed = ""
        self._pending = ""  # the latest line held back by the once-a-second limit
        self._printed_at = 0.0

    def __enter__(self) -> _JobProgressView:
        return self

    def __exit__(self, *_: object) -> None:
        if self._bar is not None:
            self._bar.close()

    def update(self, update: dict[str, Any]) -> None:
        """Take one job record or event from ``GenQClient.wait``."""
        if self.quiet:
            return
        if update.get("progress"):
            self.progress = update["progress"]
        state = (update.get("status"), update.get("stage"))
        if self.use_bars:
            self._update_bar(state)
            return
        line = _status_line(*state, self.progress)
        if state != self._state:
            # a new status or stage: first the held-back end of the previous one
            if self._pending:
                self._print(self._pending)
            self._state = state
            self._print(line)
        elif line != self._printed:
            if time.monotonic() - self._printed_at >= 1.0:
                self._print(line)
            else:
                self._pending = line

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)
        self._printed, self._pending, self._printed_at = line, "", time.monotonic()

    def _update_bar(self, state: tuple[Any, Any]) -> None:
        """One bar at a time: the running stage's; a finished stage's bar stays on screen."""
        from tqdm import tqdm

        status, stage = state
        if state != self._state:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self._state = state
            print(_status_line(status, stage, {}), file=self.stream, flush=True)
        counts = (self.progress.get("stages") or {}).get(stage) if status == "running" else None
        if not counts or not counts.get("total"):
            return
        if self._bar is None:
            self._bar = tqdm(
                total=counts["total"],
                desc=stage,
                file=self.stream,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}",
            )
        self._bar.total = counts["total"]
        self._bar.n = counts.get("done", 0)
        self._bar.set_postfix_str(_counters_text(self.progress), refresh=False)
        self._bar.refresh()


def _status_line(status: Any, stage: Any, progress: dict[str, Any]) -> str:
    """``running  generating 32/64  images 32 generated, 0 kept``; ``succeeded`` at the end."""
    parts = [str(status)]
    if status == "running" and stage:
        counts = (progress.get("stages") or {}).get(stage)
        total = counts.get("total", 0) if counts else 0
        parts.append(f"{stage} {counts.get('done', 0)}/{total}" if counts and total else stage)
        parts.append(_counters_text(progress))
    return "  ".join(part for part in parts if part)


if __name__ == "__main__":
    sys.exit(main())
