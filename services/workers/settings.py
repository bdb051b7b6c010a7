"""Settings of the worker processes: where models run, where they are cached, how often to report.

Every field comes from an environment variable ``GENQ_<FIELD>`` (``GENQ_DEVICE=cuda``,
``GENQ_SHARD_IMAGES=256``) on top of the shared :class:`~services.common.settings.StoreSettings`
(Redis, S3, buckets, mode). The Ray fields are read by the dispatcher that places jobs on actors;
the job runner itself (``services.workers.runner``) does not use them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from services.common.settings import StoreSettings

__all__ = ["WorkerSettings"]


class WorkerSettings(StoreSettings):
    """What a worker needs beyond the stores.

    Relative paths (``assets_dir``, ``model_cache_dir``) are taken relative to the worker's working
    directory; deployments set absolute ones.
    """

    # -- where and how the models run ---------------------------------------------------------
    device: Literal["cpu", "cuda"] = Field(
        default="cpu", description="cpu, or cuda for the node's (or the actor's) GPU"
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        description=(
            "torch intra-op threads, set once per worker process (an actor's __init__); None "
            "keeps torch's default (all cores)"
        ),
    )
    assets_dir: Path = Field(
        default=Path("benchmarks/assets"),
        description="the built-in models: classifier weights, classifiers.json, fashion-sd/",
    )
    model_cache_dir: Path = Field(
        default=Path("runs/model-cache"),
        description="downloaded uploads (models, image sets) and built-in models built on demand",
    )
    max_unpacked_bytes: int = Field(
        default=4 * 1024**3,
        ge=1,
        description="largest total size of an uploaded image archive once unpacked (zip bombs)",
    )
    max_unpacked_files: int = Field(
        default=200_000, ge=1, description="most files in an uploaded image archive"
    )

    # -- how a job runs -----------------------------------------------------------------------
    shard_images: int = Field(
        default=256,
        ge=1,
        description=(
            "images per generation shard: the unit of resuming a generation and of spreading it "
            "over actors (whole classes when they fit, else image ranges of one class)"
        ),
    )
    progress_interval_s: float = Field(
        default=1.0,
        ge=0.0,
        description="at most one progress write per job this often (stage ends always write)",
    )
    cancel_poll_s: float = Field(
        default=1.0, ge=0.0, description="how often a running job reads its cancel flag"
    )

    # -- Ray (read by the dispatcher, not by the job runner) ---------------------------------
    ray_address: str | None = Field(
        default=None,
        description="ray.init address: None starts a local Ray, 'auto' or host:port joins a cluster",
    )
    num_actors: int = Field(
        default=1, ge=1, description="job-running actors in the pool (one job at a time each)"
    )
    actor_num_gpus: float = Field(
        default=0.0, ge=0.0, description="GPUs per actor: 1 on GPU nodes, 0 on CPU-only nodes"
    )
    actor_num_cpus: float = Field(default=1.0, gt=0.0, description="CPUs Ray reserves per actor")
    model_cache_size: int = Field(
        default=2,
        ge=1,
        description="models an actor keeps loaded (LRU), per kind (classifiers, pipelines)",
    )
