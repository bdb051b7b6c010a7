"""Prometheus metrics of the API process: its requests, and the service's jobs read from Redis.

Exposed on ``GET /metrics`` (Prometheus text format):

- ``genq_http_requests_total{method, route, status}`` and
  ``genq_http_request_duration_seconds{method, route}`` (histogram): ``route`` is the route's
  template (``/v1/jobs/{job_id}``), so ids never become labels.
- ``genq_jobs{status}``: jobs in each status, from ``JobStore.counts_by_status()``.
- ``genq_queue_depth``: jobs waiting, in flight or delayed for a retry (``JobQueue.depth()``).
- ``genq_stage_duration_seconds{stage}`` (summary: ``_sum`` and ``_count``): time spent in each
  job stage, summed over every job.
- ``genq_images_generated_total`` and ``genq_generation_seconds_total`` (counters): images the
  workers' generation shards made and the seconds they took; ``rate()`` of the first over
  ``rate()`` of the second is the generation throughput in images per second.
- ``genq_worker_gpu_memory_peak_bytes{node}``: the most GPU memory a worker allocated on each Ray
  node (CUDA workers only). The worker metrics' Redis layout: ``services.common.worker_metrics``.
- ``genq_store_up``: 1 if Redis answered this scrape, else 0 (and the others are left out).

The job gauges are read at scrape time, so every API replica reports the same cluster-wide values.

Stage durations are written by the workers (which must not import this package) into one Redis
hash, ``{prefix}:metrics:stage_seconds``, with two float fields per stage::

    {stage}:sum    total seconds spent in the stage (HINCRBYFLOAT)
    {stage}:count  number of stage runs measured  (HINCRBYFLOAT by 1, or HINCRBY)

e.g. ``genq:metrics:stage_seconds`` -> ``generating:sum = 812.5``, ``generating:count = 3``.
``stage`` is a :class:`services.common.jobs.Stage` value. Fields of other shapes are ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError

from services.common.jobstore import JobStore
from services.common.queue import JobQueue
from services.common.worker_metrics import gpu_peak_key, stage_seconds_key, worker_metrics_key

__all__ = ["ApiMetrics"]

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ApiMetrics:
    """The API's own registry (not prometheus_client's global one, so several apps can live in
    one process, as in the tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "genq_http_requests",
            "HTTP requests answered, by route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "genq_http_request_duration_seconds",
            "HTTP request latency until the response is complete (streams: until they end)",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._jobs = _JobsCollector()
        self.registry.register(self._jobs)

    def bind(self, redis: Redis, prefix: str, store: JobStore, queue: JobQueue) -> None:
        """Start reporting the job gauges from this Redis (called once the clients exist)."""
        self._jobs.source = (redis, prefix, store, queue)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition (reads Redis for the job gauges)."""
        return generate_latest(self.registry)


class _JobsCollector(Collector):
    """Job gauges read from Redis at each scrape."""

    def __init__(self) -> None:
        self.source: tuple[Redis, str, JobStore, JobQueue] | None = None

    def describe(self) -> list[Metric]:
        return []  # not known before a scrape: keeps registration free of Redis calls

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("genq_store_up", "1 if Redis answered this scrape")
        if self.source is None:
            up.add_metric([], 0)
            yield up
            return
        redis, prefix, store, queue = self.source
        try:
            counts = store.counts_by_status()
            depth = queue.depth()
            stage_fields = _decoded(redis.hgetall(stage_seconds_key(prefix)))
            worker_fields = _decoded(redis.hgetall(worker_metrics_key(prefix)))
            gpu_fields = _decoded(redis.hgetall(gpu_peak_key(prefix)))
        except RedisError as err:
            log.warning("metrics: Redis did not answer: %s", err)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily("genq_jobs", "Jobs in each status", labels=["status"])
        for status, count in counts.items():
            jobs.add_metric([status], count)
        yield jobs
        yield GaugeMetricFamily(
            "genq_queue_depth", "Jobs waiting, in flight or delayed for a retry", value=depth
        )
        yield _stage_durations(stage_fields)
        yield from _worker_metrics(worker_fields, gpu_fields)


def _decoded(raw: dict[bytes | str, bytes | str]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }


def _worker_metrics(worker: dict[str, str], gpu: dict[str, str]) -> Iterator[Metric]:
    for field, name, text in (
        ("images_generated", "genq_images_generated", "Images made by generation shards"),
        ("generation_seconds", "genq_generation_seconds", "Seconds generation shards took"),
    ):
        try:
            value = float(worker.get(field, 0))
        except ValueError:
            continue
        yield CounterMetricFamily(name, text, value=value)
    peaks = GaugeMetricFamily(
        "genq_worker_gpu_memory_peak_bytes",
        "Most GPU memory a worker allocated on the node",
        labels=["node"],
    )
    for node, peak in sorted(gpu.items()):
        try:
            peaks.add_metric([node], float(peak))
        except ValueError:
            continue
    yield peaks


def _stage_durations(fields: dict[str, str]) -> SummaryMetricFamily:
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for name, value in fields.items():
        stage, _, part = name.rpartition(":")
        try:
            number = float(value)
        except ValueError:
            continue
        if part == "sum":
            sums[stage] = number
        elif part == "count":
            counts[stage] = round(number)
    family = SummaryMetricFamily(
        "genq_stage_duration_seconds", "Seconds spent in each job stage", labels=["stage"]
    )
    for stage in sorted(sums.keys() & counts.keys()):
        family.add_metric([stage], count_value=counts[stage], sum_value=sums[stage])
    return family
