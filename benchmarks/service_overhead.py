"""What the service costs on top of the library, measured on this machine with real components.

Starts redis-server (AOF on), a JuiceFS S3 gateway, a Ray head node, the API (``genq serve``) and a
dispatcher with one Ray actor (``python -m services.workers``), as the distributed mode runs
them (the process helpers of ``tests/support``). Then:

1. **Overhead**: the same small GenQ job (the benchmark's small Stable Diffusion and BN CNN,
   ``--per-class`` images per class, W4A4 QDrop) submitted over HTTP and followed to its end,
   against ``run_genq`` called directly in this process on the configuration the job resolved
   to (its ``config.json``), one torch thread each. Repeated ``--repeats`` times with a new seed
   each time (a repeated seed would reuse the dataset and skip generation); the first service
   job also loads the models into the actor, later ones find them warm.
2. **Status polls**: ``GET /v1/jobs/{id}`` sent open-loop at each of ``--poll-rates`` per second
   for ``--poll-seconds`` seconds from a small asyncio load generator in this process (same 2
   cores as the API): p50/p99 latency from each request's due time, and how many answered 200.
3. **Concurrent submissions**: ``--submissions`` ``POST /v1/jobs`` at once (the dispatcher is
   stopped first, so they stay queued); every one must be answered 202, readable back, and in
   the queue.

Prints a report and writes it to ``--out`` (default ``benchmarks/results/service_overhead.txt``).

    python benchmarks/service_overhead.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from genq_core.bench.runinfo import cpu_name  # noqa: E402
from genq_core.client import GenQClient  # noqa: E402
from services.common.queue import JobQueue  # noqa: E402
from tests.support.processes import stop_process  # noqa: E402
from tests.support.service_stack import ServiceStack, distributed_stack  # noqa: E402

API_KEY = "benchmark-key"


def job_body(per_class: int, seed: int, iters: int) -> dict[str, Any]:
    return {
        "kind": "genq",
        "model": {"source": "builtin", "name": "fashion-bn-cnn"},
        "generator": {"source": "builtin", "name": "fashion-sd"},
        "generation": {"num_per_class": per_class, "steps": 10, "guidance_scale": 5.0,
                       "batch_size": 16, "seed": seed},
        "filters": {"energy_keep": 0.5, "distribution_keep": 0.8},
        "calibration": {"num_images": per_class * 4},
        "quant": {"preset": "qdrop", "weight_bits": 4, "act_bits": 4, "iters": iters,
                  "seed": seed},
    }  # fmt: skip


@contextmanager
def service_stack(root: Path) -> Iterator[ServiceStack]:
    """Redis, S3, a Ray head, the dispatcher and the API, stopped on exit."""
    with distributed_stack(root, {API_KEY: "bench"}, {"GENQ_MAX_QUEUE_DEPTH": "10000"}) as stack:
        yield stack


# ---- 1. overhead ---------------------------------------------------------------------------


def service_run(client: GenQClient, body: dict[str, Any], folder: Path) -> tuple[float, Path]:
    """Seconds from submit to succeeded (as the client sees it); the job's config.json."""
    start = time.perf_counter()
    job_id = client.submit(body)["id"]
    final = client.wait(job_id, timeout=3600)
    seconds = time.perf_counter() - start
    if final["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} ended {final['status']}: {final.get('error')}")
    [config] = client.download(job_id, folder / job_id, names=["config.json"])
    return seconds, config


def direct_run(config_json: Path, out: Path) -> float:
    """Seconds of ``run_genq`` on the configuration the service job resolved to."""
    from genq_core.pipeline import load_genq_config, run_genq

    config_file = out.with_suffix(".config.json")
    config_file.write_text(json.dumps(json.loads(config_json.read_text())["config"]))
    config = load_genq_config(config_file)
    start = time.perf_counter()
    run_genq(config, out)
    return time.perf_counter() - start


# ---- 2. status polls -----------------------------------------------------------------------


async def poll_load(
    url: str, job_id: str, rate: float, seconds: float, connections: int = 32
) -> dict[str, Any]:
    """Open loop: request i is due at t0 + i / rate whatever the earlier ones are doing; its
    latency counts from then (so time spent waiting for a free connection counts too).

    The load generator is a few lines of asyncio over ``connections`` keep-alive HTTP/1.1
    connections, not an HTTP library: on 2 shared cores, a heavier client would take the CPU the
    API needs and measure itself.
    """
    parsed = httpx.URL(url)
    host, port = parsed.host, parsed.port or 80
    request = (
        f"GET /v1/jobs/{job_id} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {API_KEY}\r\n\r\n"
    ).encode()
    due: asyncio.Queue[float | None] = asyncio.Queue()
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while (at := await due.get()) is not None:
                writer.write(request)
                status = int((await reader.readline()).split()[1])
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - at)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    workers = [asyncio.create_task(connection()) for _ in range(connections)]
    count = int(rate * seconds)
    t0 = time.perf_counter() + 0.5  # connections open meanwhile
    for i in range(count):
        at = t0 + i / rate
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        due.put_nowait(at)
    for _ in workers:
        due.put_nowait(None)
    await asyncio.gather(*workers)
    elapsed = time.perf_counter() - t0
    latencies.sort()

    def quantile(q: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * q))]

    return {
        "requests": count,
        "achieved_per_s": count / elapsed,
        "statuses": statuses,
        "p50_ms": quantile(0.5),
        "p99_ms": quantile(0.99),
        "max_ms": 1000 * latencies[-1],
    }


# ---- 3. concurrent submissions -------------------------------------------------------------


async def submit_many(url: str, count: int, per_class: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits) as client:

        async def one(i: int) -> tuple[int, str | None]:
            body = job_body(per_class, 10_000 + i, 50)
            key = {"Idempotency-Key": f"bench-{i}"}
            response = await client.post("/v1/jobs", json=body, headers=key, timeout=60)
            job_id = response.json().get("id") if response.status_code == 202 else None
            return response.status_code, job_id

        start = time.perf_counter()
        answers = await asyncio.gather(*(one(i) for i in range(count)))
        seconds = time.perf_counter() - start
        ids = [job_id for _, job_id in answers if job_id]
        readable = 0
        for job_id in ids:
            response = await client.get(f"/v1/jobs/{job_id}")
            readable += response.status_code == 200 and response.json()["status"] == "queued"
    codes: dict[int, int] = {}
    for code, _ in answers:
        codes[code] = codes.get(code, 0) + 1
    return {"seconds": seconds, "codes": codes, "ids": ids, "unique": len(set(ids)),
            "readable_queued": readable}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=8, help="generated images per class")
    parser.add_argument("--iters", type=int, default=100, help="reconstruction steps per block")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--poll-rates", default="200,400", help="comma-separated status polls per second"
    )
    parser.add_argument("--poll-seconds", type=float, default=10.0)
    parser.add_argument("--submissions", type=int, default=100)
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "benchmarks/results/service_overhead.txt"
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    lines = [
        f"# service overhead, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {cpu_name()}, "
        f"{os.cpu_count()} cores",
        "command: python benchmarks/service_overhead.py " + " ".join(sys.argv[1:]),
    ]

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    with tempfile.TemporaryDirectory(prefix="genq-bench-") as tmp:
        root = Path(tmp)
        with service_stack(root) as stack, GenQClient(stack.url, API_KEY) as client:
            # 1. the same job through the service and directly, alternating
            say(f"\n## 1. one job: service (HTTP+Redis+Ray+S3) vs run_genq, {args.per_class} "
                f"images/class, {args.iters} steps/block, 1 thread")  # fmt: skip
            say("repeat  service_s  direct_s  ratio")
            ratios: list[float] = []
            for repeat in range(args.repeats):
                body = job_body(args.per_class, repeat, args.iters)
                service_s, config = service_run(client, body, root / "downloads")
                direct_s = direct_run(config, root / f"direct-{repeat}")
                ratios.append(service_s / direct_s)
                say(f"{repeat:6d}  {service_s:9.1f}  {direct_s:8.1f}  {ratios[-1]:5.3f}"
                    + ("  (actor loads the models)" if repeat == 0 else ""))  # fmt: skip
            warm = ratios[1:] or ratios
            say(f"ratio: first {ratios[0]:.3f}; warm median {statistics.median(warm):.3f} "
                f"(target <= 1.15)")  # fmt: skip

            # 2. status polls against a finished job's record
            job_id = next(iter(client.list(limit=1)))["id"]
            say(f"\n## 2. GET /v1/jobs/{{id}}, open loop for {args.poll_seconds:.0f} s per rate, "
                "32 keep-alive connections, load generator on the same cores")  # fmt: skip
            for rate in (float(r) for r in args.poll_rates.split(",")):
                result = asyncio.run(poll_load(stack.url, job_id, rate, args.poll_seconds))
                say(f"{rate:.0f}/s asked, {result['achieved_per_s']:.1f}/s done, statuses "
                    f"{result['statuses']}: p50 {result['p50_ms']:.1f} ms, p99 "
                    f"{result['p99_ms']:.1f} ms, max {result['max_ms']:.1f} ms")  # fmt: skip
            say("(target: p99 < 50 ms at 200/s)")

            # 3. many submissions at once, with no dispatcher to take them
            stop_process(stack.dispatcher, 60.0)
            from redis import Redis

            depth_before = JobQueue(Redis.from_url(stack.redis_url)).depth()
            subs = asyncio.run(submit_many(stack.url, args.submissions, args.per_class))
            depth_after = JobQueue(Redis.from_url(stack.redis_url)).depth()
            say(f"\n## 3. {args.submissions} concurrent POST /v1/jobs")
            say(f"answers {subs['codes']} in {subs['seconds']:.2f} s; {subs['unique']} distinct "
                f"ids; {subs['readable_queued']} read back as queued; queue depth "
                f"{depth_before} -> {depth_after}")  # fmt: skip
            lost = args.submissions - subs["readable_queued"]
            say(f"lost: {lost}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
