"""Worker metrics kept in Redis, written by the workers and exposed by the API's ``/metrics``.

Workers must not import the API, and Ray actors have no port of their own to scrape, so they add
to Redis hashes that every API replica reads at scrape time (``services.api.metrics``):

``{prefix}:metrics:stage_seconds`` (one hash, two fields per job stage)
    ``{stage}:sum``          seconds spent in the stage, over every job (HINCRBYFLOAT)
    ``{stage}:count``        stage runs measured (HINCRBY)
``{prefix}:metrics:worker`` (one hash)
    ``images_generated``     images made by generation shards (HINCRBY)
    ``generation_seconds``   seconds those shards took (HINCRBYFLOAT); their ratio over a window
                             is the cluster's generation throughput, images per second
``{prefix}:metrics:gpu_peak`` (one hash, a field per Ray node)
    ``{node_id}``            the most GPU memory a job stage or shard has allocated on the node,
                             bytes (only written on CUDA devices)
"""

from __future__ import annotations

from redis import Redis

__all__ = [
    "gpu_peak_key",
    "record_generation",
    "record_gpu_peak",
    "record_stage_seconds",
    "stage_seconds_key",
    "worker_metrics_key",
]

_MAX_SCRIPT = """
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > current then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""


def stage_seconds_key(prefix: str) -> str:
    return f"{prefix}:metrics:stage_seconds"


def worker_metrics_key(prefix: str) -> str:
    return f"{prefix}:metrics:worker"


def gpu_peak_key(prefix: str) -> str:
    return f"{prefix}:metrics:gpu_peak"


def record_stage_seconds(redis: Redis, prefix: str, stage: str, seconds: float) -> None:
    """Add one run of a job stage."""
    pipe = redis.pipeline(transaction=False)
    pipe.hincrbyfloat(stage_seconds_key(prefix), f"{stage}:sum", seconds)
    pipe.hincrby(stage_seconds_key(prefix), f"{stage}:count", 1)
    pipe.execute()


def record_generation(redis: Redis, prefix: str, images: int, seconds: float) -> None:
    """Add one shard's images and seconds."""
    pipe = redis.pipeline(transaction=False)
    pipe.hincrby(worker_metrics_key(prefix), "images_generated", images)
    pipe.hincrbyfloat(worker_metrics_key(prefix), "generation_seconds", seconds)
    pipe.execute()


def record_gpu_peak(redis: Redis, prefix: str, node_id: str, peak_bytes: int) -> None:
    """Raise the node's recorded peak to ``peak_bytes`` if it is higher (atomically)."""
    redis.eval(_MAX_SCRIPT, 1, gpu_peak_key(prefix), node_id, int(peak_bytes))
