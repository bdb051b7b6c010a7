"""The pool's workers: long-lived processes (Ray actors) that keep models warm and run job work.

:class:`GenQWorker` is the body of one actor. It holds the worker settings, one Redis client, the
buckets and a :class:`~services.workers.models.WarmModels` LRU, and runs one piece of job work at a
time for the dispatcher:

- :meth:`GenQWorker.plan_generation`: the job's generation shards that still need images (the
  plan is stored with the job, so every actor and every later attempt agrees on it);
- :meth:`GenQWorker.generate_shard`: one shard's images, written straight into the job's storage;
- :meth:`GenQWorker.run_job`: :func:`~services.workers.runner.run_job`, i.e. the remaining stages
  (it finds the shards done and only gathers them).

Only ids and small dicts cross process boundaries; images, manifests and models go through object
storage. Every method returns an :class:`Outcome` instead of raising, so the dispatcher never
depends on how Ray wraps exceptions (a Ray ``RayTaskError`` subclassing a custom exception with
its own ``__init__`` does not always rebuild); only a dead actor surfaces as an exception.

:data:`GenQActor` is the Ray actor class (``GenQActor.options(num_cpus=..., num_gpus=...,
resources=...).remote(settings)``); :class:`RayPool` creates and addresses a pool of them.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

import ray
import torch
from redis import Redis
from redis.exceptions import RedisError

from genq_core.classifier import LoadedClassifier
from genq_core.inversion import apply_tokens
from genq_core.pipeline import TOKENS_KEY, generation_specs
from genq_core.progress import Canceled, ProgressFn
from services.common.jobs import InvalidTransition, JobError, Stage, is_job_id
from services.common.jobstore import JobNotFound, JobStore, StaleAttempt
from services.common.logs import configure_logging
from services.common.worker_metrics import record_generation, record_gpu_peak
from services.workers import runner
from services.workers.checkpoints import dataset_is_complete, read_checkpoint
from services.workers.models import LOADING, WarmModels
from services.workers.resolve import JobInputError, ResolvedJob, resolve_job
from services.workers.settings import WorkerSettings
from services.workers.shards import generate_shard, load_or_plan, read_shard
from services.workers.storage import JobStorage, Storages, open_storages
from services.workers.sweeps import current_attempt

__all__ = ["ActorMethod", "GenQActor", "GenQWorker", "Outcome", "RayPool"]

logger = logging.getLogger(__name__)

ActorMethod = Literal["plan_generation", "generate_shard", "run_job"]
"""The worker methods the dispatcher calls (each returns an :class:`Outcome`)."""

OutcomeStatus = Literal["ok", "canceled", "stale", "gone", "failed"]


@dataclass(frozen=True)
class Outcome:
    """How one call on a worker ended.

    Attributes:
        status: ``ok`` (``value`` holds the answer); ``canceled`` (the user canceled the job);
            ``stale`` (a newer attempt owns the job: write nothing, don't ack); ``gone`` (the job
            no longer exists or is no longer running: drop its message); ``failed`` (``error``
            says what, and whether a retry may help, from ``runner.job_error``).
        value: the method's answer (small: counts, keys, the job's result).
        error: the structured error of a failed call.
        node_id: the Ray node (or host, outside Ray) that ran the call.
        seconds: how long the call ran.
    """

    status: OutcomeStatus
    value: dict[str, Any] = field(default_factory=dict)
    error: JobError | None = None
    node_id: str = ""
    seconds: float = 0.0


class GenQWorker:
    """One pool worker: warm models, one Redis client, the buckets; one call at a time.

    Args:
        settings: the worker settings (paths must be valid where the worker runs: absolute ones
            on a Ray cluster).
        redis: the client to use (default: a new one on ``settings.redis_url``); one per worker.
        storages: the buckets (default: ``open_storages(settings)``).
        models: the model provider (default: a ``WarmModels`` of ``settings.model_cache_size``).
        observer: also told every ``genq_core`` progress event of ``run_job`` (tracing, tests).
    """

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        redis: Redis | None = None,
        storages: Storages | None = None,
        models: WarmModels | None = None,
        observer: ProgressFn | None = None,
    ) -> None:
        # 1. one process, one thread budget: torch's default takes every core of the node
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        # 2. the stores
        if redis is None:
            if not settings.redis_url:
                raise ValueError("a worker needs GENQ_REDIS_URL (or a Redis client)")
            redis = Redis.from_url(settings.redis_url, health_check_interval=30)
        self.settings = settings
        self._redis = redis
        self._store = JobStore(redis, settings.redis_prefix)
        self._storages = storages if storages is not None else open_storages(settings)
        self._models = models if models is not None else WarmModels(settings.model_cache_size)
        self._observer = observer
        # the last data-scarce job's pipeline with its learned tokens: ((job id, token), pipe)
        self._private_pipe: tuple[tuple[str, int], Any] | None = None

    # ---- what the dispatcher calls ---------------------------------------------------------

    def node_id(self) -> str:
        """The Ray node this worker runs on, or the host name outside Ray."""
        if ray.is_initialized():
            return str(ray.get_runtime_context().get_node_id())
        return socket.gethostname()

    def stats(self) -> dict[str, int]:
        """The warm models' load counts and cache sizes."""
        return self._models.stats()

    def plan_generation(self, job_id: str, token: int) -> Outcome:
        """The generation shards of the job that still need images (``value["pending"]``).

        Empty when the job generates nothing now: a ``quantize`` job, generation already
        checkpointed, a dataset to reuse, or a data-scarce job whose tokens aren't learned yet
        (inversion and generation then run in ``run_job`` on one actor). Also ``shards`` (all of
        them), ``images`` (the whole set) and ``images_done`` (in finished shards).
        """
        return self._call(job_id, token, lambda: self._plan(job_id))

    def generate_shard(self, job_id: str, token: int, shard_index: int) -> Outcome:
        """Generate one shard of the job's stored plan (``value``: ``node_id``, ``images``).

        Writes only to object storage (the shard's images, manifest and done marker), never to
        the job store: the dispatcher owns the job's progress. Stops between batches when the
        job is canceled or another attempt took it over. A shard already done is not redone.
        """
        return self._call(job_id, token, lambda: self._shard(job_id, token, shard_index))

    def run_job(self, job_id: str, token: int) -> Outcome:
        """Run the job's remaining stages (``value``: the job's result for ``store.finish``)."""

        def run() -> dict[str, Any]:
            result = runner.run_job(
                job_id,
                token,
                self._store,
                self._storages,
                self.settings,
                redis=self._redis,
                models=self._models,
                on_progress=self._observer,
            )
            self._record_metrics()
            return result

        return self._call(job_id, token, run)

    def close(self) -> None:
        """Drop the warm models and close the Redis client."""
        self._models.clear()
        self._private_pipe = None
        self._redis.close()

    # ---- the work ---------------------------------------------------------------------------

    def _plan(self, job_id: str) -> dict[str, Any]:
        nothing: dict[str, Any] = {"pending": [], "shards": 0, "images": 0, "images_done": 0}
        # 1. does this attempt start by generating? (the runner resumes at the first stage
        #    without a checkpoint; inversion must be done for shards to know the tokens)
        resolved = self._resolve(job_id)
        if not resolved.generates:
            return nothing
        storage = JobStorage(job_id, self._storages)
        first = next(
            (s for s in runner.stages_for(resolved) if read_checkpoint(storage, s) is None), None
        )
        if first != Stage.GENERATING or self._reusable_dataset(resolved):
            return nothing
        # 2. the stored plan (or a new one), and which shards are not done
        classifier = self._classifier(resolved)
        shards = load_or_plan(
            storage,
            classifier.num_classes,
            resolved.config.generation.num_per_class,
            self.settings.shard_images,
        )
        done = [shard for shard in shards if read_shard(storage, shard) is not None]
        return {
            "pending": [shard.index for shard in shards if shard not in done],
            "shards": len(shards),
            "images": sum(shard.size for shard in shards),
            "images_done": sum(shard.size for shard in done),
        }

    def _shard(self, job_id: str, token: int, shard_index: int) -> dict[str, Any]:
        # 1. the job, its classes, and the tokens an earlier inversion learned
        resolved = self._resolve(job_id)
        config = resolved.config
        storage = JobStorage(job_id, self._storages)
        classifier = self._classifier(resolved)
        inversion: dict[str, Any] = {}
        if config.data_scarce is not None:
            found = read_checkpoint(storage, Stage.INVERTING)
            if found is None:
                raise RuntimeError(f"job {job_id}: a shard was sent before inversion finished")
            inversion = found
        specs = generation_specs(
            config,
            classifier.class_names,
            inversion.get("style_token"),
            inversion.get("tokens_by_class"),
        )
        # 2. the shard of the stored plan, unless another attempt or actor finished it
        shards = load_or_plan(
            storage,
            classifier.num_classes,
            config.generation.num_per_class,
            self.settings.shard_images,
        )
        if not 0 <= shard_index < len(shards):
            raise RuntimeError(f"job {job_id} has no shard {shard_index} ({len(shards)} planned)")
        shard = shards[shard_index]
        result = read_shard(storage, shard)
        if result is None:
            should_stop = _ShardStop(
                self._store,
                self._redis,
                self.settings.redis_prefix,
                job_id,
                token,
                self.settings.cancel_poll_s,
            )
            generator = self._generator(resolved, storage, token)
            clock = time.perf_counter()
            try:
                result = generate_shard(
                    generator, shard, specs, config.generation, storage, should_stop=should_stop
                )
            except Canceled:
                if should_stop.lost:
                    raise StaleAttempt(job_id, token, should_stop.current) from None
                raise
            self._record_metrics(len(result.records), time.perf_counter() - clock)
        return {"node_id": self.node_id(), "images": len(result.records), "shard": shard_index}

    def _record_metrics(self, images: int = 0, seconds: float = 0.0) -> None:
        """A shard's throughput and, on a GPU, this node's peak memory so far (``/metrics``)."""
        prefix = self.settings.redis_prefix
        try:
            if images:
                record_generation(self._redis, prefix, images, seconds)
            if self.settings.device == "cuda" and torch.cuda.is_available():
                peak = torch.cuda.max_memory_allocated()
                record_gpu_peak(self._redis, prefix, self.node_id(), peak)
        except RedisError as err:  # metrics never fail a shard
            logger.warning("could not record worker metrics: %s", err)

    def _resolve(self, job_id: str) -> ResolvedJob:
        job = self._store.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        with LOADING:  # it may build a built-in generator (see models.LOADING)
            return resolve_job(job, self._store, self._storages, self.settings)

    def _classifier(self, resolved: ResolvedJob) -> LoadedClassifier:
        try:
            return self._models.classifier(resolved.config, None)
        except (ValueError, FileNotFoundError) as err:  # as the runner does: bad input
            raise JobInputError("model", str(err)) from err

    def _generator(self, resolved: ResolvedJob, storage: JobStorage, token: int) -> Any:
        """The shared warm pipeline, or for a data-scarce job a private one with its tokens."""
        config = resolved.config
        if config.data_scarce is None:
            return self._models.generator(config, exclusive=False)
        key = (resolved.job_id, token)
        if self._private_pipe is None or self._private_pipe[0] != key:
            self._private_pipe = None  # free the last job's copy before making the next
            pipe = self._models.generator(config, exclusive=True)
            apply_tokens(pipe, storage.get_bytes(TOKENS_KEY))
            self._private_pipe = (key, pipe)
        return self._private_pipe[1]

    def _reusable_dataset(self, resolved: ResolvedJob) -> bool:
        """Whether the runner will copy a finished dataset instead of generating (its rule)."""
        if resolved.fingerprint is None:
            return False
        key = runner.dataset_key(self.settings.redis_prefix, resolved.tenant, resolved.fingerprint)
        raw = self._redis.get(key)
        if raw is None:
            return False
        source = raw.decode() if isinstance(raw, bytes) else str(raw)
        if source == resolved.job_id or not is_job_id(source):
            return False
        return dataset_is_complete(JobStorage(source, self._storages))

    def _call(self, job_id: str, token: int, work: Callable[[], dict[str, Any]]) -> Outcome:
        """Run ``work`` and say how it ended (the contract in :class:`Outcome`)."""
        clock = time.perf_counter()
        node = self.node_id()
        extra = {"job_id": job_id, "attempt": token}

        def ended(status: OutcomeStatus, **fields: Any) -> Outcome:
            return Outcome(status, node_id=node, seconds=time.perf_counter() - clock, **fields)

        try:
            return ended("ok", value=work())
        except Canceled:
            return ended("canceled")
        except StaleAttempt as err:
            logger.info("job %s: %s", job_id, err, extra=extra)
            return ended("stale")
        except (JobNotFound, InvalidTransition) as err:
            logger.info("job %s: no longer runs here: %s", job_id, err, extra=extra)
            return ended("gone")
        except Exception as err:
            error = runner.job_error(err)
            log = logger.exception if error.retryable else logger.warning
            log("job %s failed (%s): %s", job_id, error.code, error.message, extra=extra)
            return ended("failed", error=error)


class _ActorWorker(GenQWorker):
    """:class:`GenQWorker` in a Ray worker process: its logs are JSON lines with the job fields,
    like the dispatcher's (Ray keeps them in the session's worker logs and relays them)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        configure_logging("INFO")
        super().__init__(*args, **kwargs)


GenQActor = ray.remote(_ActorWorker)
"""The Ray actor class of :class:`GenQWorker`; create it with ``.options(...).remote(settings)``."""


class RayPool:
    """``size`` Ray actors of :class:`GenQWorker`, addressed by index (``0 .. size-1``).

    Each actor reserves ``settings.actor_num_cpus`` and ``settings.actor_num_gpus`` (1 on GPU
    nodes); Ray restarts an actor whose process dies (its calls in flight fail, the dispatcher
    retries their jobs). Actors are spread over the cluster's nodes (``SPREAD``) unless
    ``resources`` pins each to nodes that offer a custom resource (``{"gpu_node_a": 0.01}``).

    Args:
        settings: the worker settings shipped to every actor; ``assets_dir`` and
            ``model_cache_dir`` must be absolute, since actors run in other folders and hosts.
        size: number of actors (default ``settings.num_actors``).
        resources: per actor, the custom resources it needs (one entry per actor).
        start_timeout_s: how long to wait until every actor answers (``TimeoutError`` after).
        probe_every_s: how often an actor recovering from a failure is pinged.

    Raises:
        ValueError: a relative path in ``settings``, or ``resources`` of the wrong length.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        size: int | None = None,
        *,
        resources: Sequence[Mapping[str, float]] | None = None,
        start_timeout_s: float = 120.0,
        probe_every_s: float = 0.5,
    ) -> None:
        # 1. check inputs
        for name in ("assets_dir", "model_cache_dir"):
            if not getattr(settings, name).is_absolute():
                raise ValueError(
                    f"{name} must be an absolute path for Ray actors (set GENQ_{name.upper()}), "
                    f"got {getattr(settings, name)}"
                )
        count = settings.num_actors if size is None else size
        if count < 1:
            raise ValueError(f"size must be >= 1, got {count}")
        if resources is not None and len(resources) != count:
            raise ValueError(f"resources needs one entry per actor ({count}), got {len(resources)}")
        # 2. create the actors and wait until each has loaded its clients
        self.probe_every_s = probe_every_s
        self._lock = threading.Lock()  # done-callbacks run on Ray's threads
        self._recovering: dict[int, float] = {}  # actor -> when it was last pinged
        self._probes: dict[int, Future[Any]] = {}
        self._actors: list[Any] = []
        for index in range(count):
            options: dict[str, Any] = {
                "num_cpus": settings.actor_num_cpus,
                "num_gpus": settings.actor_num_gpus,
                "max_restarts": -1,
                "max_task_retries": 0,  # the dispatcher decides about retries, per job
            }
            if resources is not None:
                options["resources"] = dict(resources[index])
            else:
                options["scheduling_strategy"] = "SPREAD"
            self._actors.append(GenQActor.options(**options).remote(settings))
        self.node_ids: list[str] = ray.get(
            [actor.node_id.remote() for actor in self._actors], timeout=start_timeout_s
        )

    @property
    def size(self) -> int:
        return len(self._actors)

    def submit(self, actor: int, method: ActorMethod, *args: Any) -> Future[Outcome]:
        """Start ``method(*args)`` on actor ``actor``; the future holds its :class:`Outcome`.

        A call that fails (the actor's process died) marks the actor as recovering until it
        answers again (:meth:`healthy`).
        """
        future: Future[Outcome] = getattr(self._actors[actor], method).remote(*args).future()
        future.add_done_callback(lambda done: self._check(actor, done))
        return future

    def healthy(self, actor: int) -> bool:
        """Whether actor ``actor`` can take a call now.

        After a failed call Ray restarts the actor (``max_restarts``), and calls sent meanwhile
        fail at once ("the actor is restarting"): they would cost their jobs an attempt each.
        So a failed actor is pinged (at most every ``probe_every_s``) until it answers.
        """
        with self._lock:
            if actor not in self._recovering:
                return True
            probe = self._probes.get(actor)
            if probe is not None and probe.done() and probe.exception() is None:
                del self._recovering[actor]
                self._probes.pop(actor, None)
                return True
            if probe is None or (
                probe.done() and time.monotonic() - self._recovering[actor] >= self.probe_every_s
            ):
                self._recovering[actor] = time.monotonic()
                self._probes[actor] = self._actors[actor].node_id.remote().future()
            return False

    def handle(self, actor: int) -> Any:
        """Actor ``actor``'s Ray handle (``ray.kill`` it, call methods the pool doesn't wrap)."""
        return self._actors[actor]

    def stats(self, timeout_s: float = 60.0) -> list[dict[str, int]]:
        """Every actor's warm-model statistics (waits behind the call each one is running)."""
        stats: list[dict[str, int]] = ray.get(
            [actor.stats.remote() for actor in self._actors], timeout=timeout_s
        )
        return stats

    def close(self) -> None:
        """Kill the actors (work in flight is lost; its jobs are retried from checkpoints)."""
        for actor in self._actors:
            ray.kill(actor, no_restart=True)
        self._actors = []

    def _check(self, actor: int, done: Future[Outcome]) -> None:
        """(Ray's thread) a call that raised means the actor died: recover before new calls."""
        if done.cancelled() or done.exception() is not None:
            with self._lock:
                self._recovering.setdefault(actor, float("-inf"))
                self._probes.pop(actor, None)


class _ShardStop:
    """``should_stop`` of a shard: the job was canceled, or another attempt took it over.

    Read at most once per ``interval_s``. A shard doesn't write to the job store, so it would
    never hear ``StaleAttempt``; reading the attempt number is how it learns it lost the job.
    """

    def __init__(
        self,
        store: JobStore,
        redis: Redis,
        prefix: str,
        job_id: str,
        token: int,
        interval_s: float,
    ) -> None:
        self._store = store
        self._redis = redis
        self._prefix = prefix
        self._job_id = job_id
        self._token = token
        self._interval_s = interval_s
        self._last = float("-inf")
        self._stop = False
        self.lost = False
        self.current = token

    def __call__(self) -> bool:
        if not self._stop and time.monotonic() - self._last >= self._interval_s:
            self._last = time.monotonic()
            self.current = current_attempt(self._redis, self._prefix, self._job_id) or 0
            self.lost = self.current != self._token
            self._stop = self.lost or self._store.is_cancel_requested(self._job_id)
        return self._stop
