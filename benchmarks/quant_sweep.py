"""Sweep of reconstruction hyper-parameters on the quantization engine benchmark's setting.

Same model (the 4-conv BN CNN), calibration set (1024 real images) and test set as
``benchmarks/quant_engine.py``; QDrop at W4A4 and W2A4 with first/last layers at 8 bits. Each job
is one ``quantize_model`` call with a variant of :class:`ReconstructionConfig`; jobs run in a pool
of worker processes (one torch thread each) and every finished job is appended to a JSON-lines
file at once, so a run cut short keeps what it finished. Jobs not started by ``--deadline-s`` are
skipped and listed as such.

The data comes from the tensor file written by ``benchmarks/gpu_check.py --export-data FILE``
(the machine running the sweep may lack the Debian package).

    python benchmarks/quant_sweep.py --data FILE --device cuda --workers 10 --out sweep.jsonl
    python benchmarks/quant_sweep.py --data FILE --summary sweep.jsonl   # table of a finished run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from genq_core.bench.classifiers import BNConvNet, evaluate_top1
from genq_core.bench.fashion_mnist import normalize, to_float_images
from genq_core.quant import QuantConfig, ReconstructionConfig, quantize_model

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "benchmarks/assets/bn_cnn_fmnist.safetensors"

# name -> overrides of ReconstructionConfig (iters is set per job)
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "wlr3e-3": {"weight_lr": 3e-3},
    "wlr1e-2": {"weight_lr": 1e-2},
    "wlr3e-2": {"weight_lr": 3e-2},
    "alr1e-4": {"act_lr": 1e-4},
    "alr4e-4": {"act_lr": 4e-4},
    "wlr3e-3_alr1e-4": {"weight_lr": 3e-3, "act_lr": 1e-4},
    "bs64": {"batch_size": 64},
    "p2.4": {"p_norm": 2.4},
    "rw3e-3": {"round_weight": 3e-3},
    "warmup0.1": {"warmup": 0.1},
    "wlr3e-3_p2.4": {"weight_lr": 3e-3, "p_norm": 2.4},
}


@dataclass(frozen=True)
class Job:
    variant: str
    iters: int
    weight_bits: int
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.variant}|iters{self.iters}|W{self.weight_bits}A4|seed{self.seed}"


def plan(variants: list[str], iters: list[int], seeds: list[int]) -> list[Job]:
    """Jobs in priority order: W2A4 before W4A4, then by seed, then by variant and iters."""
    jobs = []
    for weight_bits in (2, 4):
        for seed in seeds:
            for steps in iters:
                for name in variants:
                    jobs.append(Job(name, steps, weight_bits, seed, VARIANTS[name]))
    return jobs


_STATE: dict[str, Any] = {}


def _init_worker(data_path: str, device: str, deadline: float) -> None:
    torch.set_num_threads(1)
    data = torch.load(data_path)
    model = BNConvNet()
    model.load_state_dict(load_file(str(WEIGHTS)))
    model.eval()
    _STATE.update(
        data=data,
        test_images=normalize(to_float_images(data["test_images"])),
        model=model,
        device=torch.device(device),
        deadline=deadline,
    )


def _run(job: Job) -> dict[str, Any]:
    if time.time() > _STATE["deadline"]:
        return {"key": job.key, "skipped": True}
    rec = replace(ReconstructionConfig(iters=job.iters), **job.overrides)
    config = QuantConfig(
        weight_bits=job.weight_bits, act_bits=4, preset="qdrop", seed=job.seed, reconstruction=rec
    )
    device = _STATE["device"]
    started = time.perf_counter()
    qmodel = quantize_model(_STATE["model"], config, _STATE["data"]["calibration"], device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    top1 = evaluate_top1(qmodel.cpu(), _STATE["test_images"], _STATE["data"]["test_labels"])
    return {
        "key": job.key,
        "variant": job.variant,
        "iters": job.iters,
        "setting": f"W{job.weight_bits}A4",
        "seed": job.seed,
        "overrides": job.overrides,
        "top1": top1,
        "seconds": round(seconds, 2),
        "device": str(device),
    }


def summary(lines: list[dict[str, Any]], float_top1: float) -> str:
    """Markdown table: mean top-1 change vs float (and seeds) per variant, iters and setting."""
    cells: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    seconds: dict[tuple[str, int], list[float]] = defaultdict(list)
    for line in lines:
        if line.get("skipped"):
            continue
        cells[(line["variant"], line["iters"])][line["setting"]].append(line["top1"] - float_top1)
        seconds[(line["variant"], line["iters"])].append(line["seconds"])
    rows = ["| variant | iters | W4A4 | W2A4 | seconds (mean) |", "|---|---|---|---|---|"]
    for variant, steps in sorted(cells, key=lambda k: (k[1], k[0])):
        parts = []
        for setting in ("W4A4", "W2A4"):
            values = cells[(variant, steps)].get(setting, [])
            parts.append(f"{statistics.mean(values):+.2f} (n={len(values)})" if values else "")
        mean_seconds = statistics.mean(seconds[(variant, steps)])
        rows.append(f"| {variant} | {steps} | {parts[0]} | {parts[1]} | {mean_seconds:.0f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--deadline-s", type=float, default=1e9, help="start no job after this")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--iters", nargs="+", type=int, default=[1000, 2000])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--out", type=Path, help="JSON-lines file, appended to")
    parser.add_argument("--summary", type=Path, help="print the table of a JSON-lines file")
    args = parser.parse_args()

    data = torch.load(args.data)
    model = BNConvNet()
    model.load_state_dict(load_file(str(WEIGHTS)))
    float_top1 = evaluate_top1(
        model.eval(), normalize(to_float_images(data["test_images"])), data["test_labels"]
    )
    if args.summary:
        lines = [json.loads(t) for t in args.summary.read_text().splitlines() if t.strip()]
        print(f"float top-1 {float_top1:.2f}\n" + summary(lines, float_top1))
        return
    if args.out is None:
        parser.error("--out is required unless --summary is given")
    jobs = plan(args.variants, args.iters, args.seeds)
    deadline = time.time() + args.deadline_s
    print(f"{len(jobs)} jobs on {args.workers} {args.device} workers; float top-1 {float_top1}")
    context = mp.get_context("spawn")
    with (
        context.Pool(args.workers, _init_worker, (str(args.data), args.device, deadline)) as pool,
        args.out.open("a") as out,
    ):
        for result in pool.imap_unordered(_run, jobs):
            out.write(json.dumps(result) + "\n")
            out.flush()
            print(json.dumps(result), flush=True)
    lines = [json.loads(t) for t in args.out.read_text().splitlines() if t.strip()]
    print(summary(lines, float_top1))


if __name__ == "__main__":
    main()
