"""The job runner: one attempt of one job, stage by stage, each stage checkpointed in object storage.

:func:`run_job` is what a worker calls once it holds a job (a fencing token from
``JobStore.start_attempt``). It runs the job's stages::

    genq:      [inverting] -> generating -> filtering -> quantizing -> evaluating -> uploading
    generate:  [inverting] -> generating -> filtering -> uploading
    quantize:                                quantizing -> evaluating -> uploading

(``inverting`` only in the data-scarce mode). Each stage is one of ``genq_core.pipeline``'s steps
and writes what ``run_genq`` writes, under ``jobs/{id}/`` (:class:`~services.workers.storage.JobStorage`),
then ``checkpoints/{stage}.json``. A retried attempt skips the stages with a checkpoint and
resumes at the first one without; generation also resumes shard by shard
(:mod:`services.workers.shards`). A ``genq`` or ``generate`` job whose generation fingerprint
matches a finished dataset of the same tenant copies that dataset instead of generating it.

Outputs (keys relative to the job's prefix): ``run_genq``'s (``synthetic/images/...``,
``synthetic/manifest.jsonl``, ``tokens/tokens.safetensors``, ``calibration/images.safetensors``,
``model/...``, ``config.json``, ``report.json``, ``report.md``, ``artifacts.json``), plus
``synthetic/dataset.tar`` (the kept images and their manifest, one download) and the
checkpoints. Redis keys (``P`` = ``settings.redis_prefix``): ``P:dataset:{tenant}:{fingerprint}``
-> the job id of a finished dataset, and the hash ``P:metrics:stage_seconds`` with
``{stage}:sum`` and ``{stage}:count`` per stage (read by the API's ``/metrics``).

What the caller (the dispatcher) does with the outcome:

- a returned dict: ``store.finish(job_id, token, "succeeded", result=...)``;
- :class:`~genq_core.progress.Canceled`: ``finish(..., "canceled")``;
- :class:`~services.common.jobstore.StaleAttempt`: a newer attempt owns the job; stop, write
  nothing, don't ack;
- anything else: :func:`job_error` says whether to fail the job or requeue it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from genq_core.classifier import Builder, LoadedClassifier, load
from genq_core.generate import load_images
from genq_core.inversion import apply_tokens
from genq_core.manifest import read_manifest
from genq_core.pipeline import (
    ARTIFACTS_KEY,
    MANIFEST_KEY,
    MODEL_PREFIX,
    SYNTHETIC_PREFIX,
    TOKENS_KEY,
    GenQConfig,
    build_report,
    calibration_summary,
    content_type,
    evaluate_quantized,
    filter_summary,
    generated_source,
    generation_specs,
    learn_style,
    load_generator_for,
    make_calibration,
    quantizer_calibration,
    select_calibration,
    source_summary,
    split_holdout,
    write_quantized,
    write_reports,
)
from genq_core.progress import ProgressFn, StopFn, check_stop
from genq_core.quant import quantize_model
from genq_core.quant.export import load_quantized
from genq_core.storage_s3 import StorageError
from services.common.jobs import JobError, JobKind, Stage, is_job_id
from services.common.jobstore import JobNotFound, JobStore
from services.common.keys import CHECKPOINT_PREFIX
from services.common.worker_metrics import record_stage_seconds
from services.workers.checkpoints import (
    checkpoint_key,
    dataset_is_complete,
    read_checkpoint,
    write_checkpoint,
)
from services.workers.resolve import JobInputError, ResolvedJob, resolve_job
from services.workers.settings import WorkerSettings
from services.workers.shards import (
    PLAN_KEY,
    gather_records,
    generate_shard,
    load_or_plan,
    read_shard,
)
from services.workers.storage import JobStorage, Storages, file_sha256

__all__ = [
    "DATASET_ARCHIVE_KEY",
    "FreshModels",
    "ModelProvider",
    "dataset_key",
    "job_error",
    "run_job",
    "stages_for",
]

logger = logging.getLogger(__name__)

DATASET_ARCHIVE_KEY = f"{SYNTHETIC_PREFIX}/dataset.tar"
"""The kept synthetic images and their manifest as one tar (``images/CCCC/NNNNNN.png``)."""

# The stages that make a synthetic set; a reused dataset replaces all three.
_DATASET_STAGES = (Stage.INVERTING, Stage.GENERATING, Stage.FILTERING)
# The order of the report's timings, as run_genq writes them.
_TIMING_ORDER = ("load", "invert", "source", "filter", "quantize", "evaluate")


class ModelProvider(Protocol):
    """Where a job's models come from: loaded fresh (:class:`FreshModels`), or kept warm by a
    long-lived worker (the Ray actors' LRU) and shared between its jobs."""

    def classifier(self, config: GenQConfig, builder: Builder | None) -> LoadedClassifier:
        """The float classifier of ``config`` on ``config.device``; callers never modify it."""
        ...

    def generator(self, config: GenQConfig, *, exclusive: bool) -> Any:
        """The diffusion pipeline of ``config``. ``exclusive``: the caller will change it
        (textual inversion adds tokens), so it must not be a pipeline other jobs share."""
        ...


class FreshModels:
    """Loads every model anew for each call: right for one-off runs and tests."""

    def classifier(self, config: GenQConfig, builder: Builder | None) -> LoadedClassifier:
        return load(config.classifier, builder, device=torch.device(config.device))

    def generator(self, config: GenQConfig, *, exclusive: bool) -> Any:
        return load_generator_for(config)


def run_job(
    job_id: str,
    token: int,
    store: JobStore,
    storages: Storages,
    settings: WorkerSettings,
    *,
    builder: Builder | None = None,
    redis: Redis | None = None,
    models: ModelProvider | None = None,
    on_progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Run one attempt of a job, resuming after the stages an earlier attempt finished.

    Args:
        job_id: the job.
        token: this attempt's fencing token (``store.start_attempt``); every store write
            carries it.
        store: the job store (stage, progress, cancel flag).
        storages: the data, results and uploads buckets.
        settings: the worker's settings (device, model cache, shard size, throttles).
        builder: the classifier's builder callable, for ``builder`` sources without a name.
        redis: the Redis client for dataset reuse and stage metrics; ``None`` connects to
            ``settings.redis_url`` when it is set, and skips both when it is not.
        models: where models come from (default: :class:`FreshModels`).
        on_progress: also told every ``genq_core`` progress event (``stage``, ``done``,
            ``total``), unthrottled; an exception it raises ends the run.

    Returns:
        The job's result for ``store.finish``: ``artifacts`` (``artifacts.json``'s entries and
        that file's own), ``artifacts_key``, ``images_generated``, ``images_kept``,
        ``evaluation``, ``dataset_job_id`` and ``reused_dataset_from``.

    Raises:
        JobInputError: the request cannot run (names the field); retrying will not help.
        Canceled: the user canceled the job.
        StaleAttempt: a newer attempt owns the job.
        JobNotFound: the job does not exist.
    """
    with _redis_client(redis, settings) as client:
        # 1. read the job and resolve its request into a pipeline config
        job = store.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        resolved = resolve_job(job, store, storages, settings)
        storage = JobStorage(job_id, storages)
        run = _JobRun(
            resolved=resolved,
            token=token,
            store=store,
            storage=storage,
            storages=storages,
            settings=settings,
            builder=builder,
            models=models or FreshModels(),
            progress=_Progress(store, job_id, token, settings.progress_interval_s, on_progress),
            should_stop=_CancelPoll(store, job_id, settings.cancel_poll_s),
        )

        # 2. where this attempt starts: the first stage without a checkpoint
        stages = stages_for(resolved)
        remaining = list(stages)
        while remaining and (checkpoint := read_checkpoint(storage, remaining[0])) is not None:
            run.checkpoints[remaining.pop(0)] = checkpoint
        for stage in remaining:  # later checkpoints are stale once an earlier stage reruns
            storage.delete(checkpoint_key(stage))
        if Stage.INVERTING in remaining:  # new tokens make new images: no shard is reusable
            for key in storage.list(f"{CHECKPOINT_PREFIX}/generating/"):
                storage.delete(key)
        if len(remaining) < len(stages):
            logger.info("job %s attempt %d resumes at %s", job_id, token, remaining[:1])

        # 3. a genq/generate job whose dataset exists already copies it instead of generating
        if Stage.FILTERING in remaining and client is not None:
            source_id = _reusable_dataset(client, run)
            if source_id is not None:
                check_stop(run.should_stop, "before copying a dataset")
                store.set_stage(job_id, token, Stage.GENERATING)
                _copy_dataset(run, JobStorage(source_id, storages), source_id)
                _record_dataset(client, run)
                remaining = [stage for stage in remaining if stage not in _DATASET_STAGES]

        # 4. run the remaining stages, each ending with its checkpoint
        for stage in remaining:
            check_stop(run.should_stop, f"before {stage.value}")
            store.set_stage(job_id, token, stage)
            clock = time.perf_counter()
            outputs, data = _STAGES[stage](run)
            seconds = time.perf_counter() - clock
            run.checkpoints[stage] = write_checkpoint(
                storage, stage, outputs, {"attempt": token, "seconds": seconds, **data}
            )
            run.progress.flush()
            if client is not None:
                record_stage_seconds(client, settings.redis_prefix, stage.value, seconds)
                if stage == Stage.FILTERING:
                    _record_dataset(client, run)
            logger.info("job %s: %s done in %.1f s", job_id, stage.value, seconds)

        # 5. the result, from the last checkpoint (the same on a rerun after success)
        result: dict[str, Any] = run.checkpoints[Stage.UPLOADING]["result"]
        return result


def stages_for(resolved: ResolvedJob) -> list[Stage]:
    """The stages a job runs, in order."""
    config = resolved.config
    stages: list[Stage] = []
    if resolved.generates:
        if config.data_scarce is not None:
            stages.append(Stage.INVERTING)
        stages += [Stage.GENERATING, Stage.FILTERING]
    if config.quant is not None:
        stages += [Stage.QUANTIZING, Stage.EVALUATING]
    stages.append(Stage.UPLOADING)
    return stages


def dataset_key(prefix: str, tenant: str, fingerprint: str) -> str:
    """Redis key of the job holding the tenant's finished dataset with this fingerprint."""
    return f"{prefix}:dataset:{tenant}:{fingerprint}"


def job_error(error: BaseException) -> JobError:
    """How a failed attempt is recorded: the structured error, and whether a retry may help.

    Bad requests and inputs (:class:`JobInputError`, ``ValueError``, ``FileNotFoundError`` from
    ``genq_core``) fail the job for good; storage, Redis and unknown errors are retryable (the
    dispatcher bounds the retries). ``Canceled`` and ``StaleAttempt`` are not errors: the
    dispatcher handles them before calling this.
    """
    message = str(error)[:2000] or type(error).__name__
    if isinstance(error, JobInputError):
        return JobError(code="invalid_request", message=message, retryable=False)
    if isinstance(error, StorageError):
        return JobError(code="storage_unavailable", message=message, retryable=True)
    if isinstance(error, RedisConnectionError | RedisTimeoutError):
        return JobError(code="store_unavailable", message=message, retryable=True)
    if isinstance(error, ValueError | FileNotFoundError):
        return JobError(code="invalid_input", message=message, retryable=False)
    return JobError(
        code="worker_error", message=f"{type(error).__name__}: {message}", retryable=True
    )


# ---------------------------------------------------------------------------------------------
# the stages: each returns (the keys it wrote, what its checkpoint keeps)


def _invert(run: _JobRun) -> tuple[list[str], dict[str, Any]]:
    """Textual inversion (data-scarce mode): learn the style token, store it, add it to the pipe."""
    clock = time.perf_counter()
    artifacts: list[dict[str, Any]] = []
    style_token, tokens_by_class = learn_style(
        run.generator(),
        run.classifier(),
        run.config,
        run.storage,
        artifacts,
        run.progress,
        run.should_stop,
    )
    run.tokens_applied = True
    timings = {"invert": time.perf_counter() - clock}
    data = {
        "artifacts": artifacts,
        "style_token": style_token,
        "tokens_by_class": tokens_by_class,
        "timings": timings,
    }
    return [TOKENS_KEY], data


def _generate(run: _JobRun) -> tuple[list[str], dict[str, Any]]:
    """Generate the synthetic set shard by shard, skipping shards that are already done."""
    config = run.config
    classifier = run.classifier()
    inversion = run.checkpoints.get(Stage.INVERTING, {})
    specs = generation_specs(
        config,
        classifier.class_names,
        inversion.get("style_token"),
        inversion.get("tokens_by_class"),
    )
    num_per_class = config.generation.num_per_class
    shards = load_or_plan(
        run.storage, classifier.num_classes, num_per_class, run.settings.shard_images
    )
    total = len(specs)
    done = 0
    results = []
    for shard in shards:
        result = read_shard(run.storage, shard)
        if result is None:
            result = generate_shard(
                run.generator(),
                shard,
                specs,
                config.generation,
                run.storage,
                on_progress=_offset(run.progress, done, total),
                should_stop=run.should_stop,
            )
        done += shard.size
        results.append(result)
        run.progress("generate", done, total)
    data = {
        "images": sum(len(result.records) for result in results),
        "shards": len(shards),
        "timings": {"source": sum(result.seconds for result in results)},
    }
    shard_keys = [key for shard in shards for key in (shard.manifest_key, shard.done_key)]
    return [PLAN_KEY, *shard_keys], data


def _filter(run: _JobRun) -> tuple[list[str], dict[str, Any]]:
    """The filters on the whole gathered set; writes the manifest with every verdict."""
    classifier = run.classifier()
    shards = load_or_plan(
        run.storage,
        classifier.num_classes,
        run.config.generation.num_per_class,
        run.settings.shard_images,
    )
    results = []
    for shard in shards:
        result = read_shard(run.storage, shard)
        if result is None:
            raise RuntimeError(f"shard {shard.index} of a finished generation is missing")
        results.append(result)
    generation_seconds = float(run.checkpoints[Stage.GENERATING]["timings"]["source"])
    source = generated_source(run.storage, gather_records(results), classifier, generation_seconds)
    artifacts: list[dict[str, Any]] = []
    selection = select_calibration(
        run.config, classifier, source, run.storage, artifacts, run.progress, run.should_stop
    )
    kept = int(selection.keep.sum())
    run.kept = (selection.images, selection.labels)
    run.progress.counters(images_generated=source.made, images_kept=kept)
    data = {
        "artifacts": artifacts,
        "made": source.made,
        "kept": kept,
        "filters": filter_summary(selection.filter_report),
        "calibration": calibration_summary(selection.images, None),
        "timings": {"filter": selection.seconds} if selection.filter_report is not None else {},
    }
    return [MANIFEST_KEY], data


def _quantize(run: _JobRun) -> tuple[list[str], dict[str, Any]]:
    """Quantize on the calibration set minus the held-out images; store the quantized model."""
    config = run.config
    assert config.quant is not None
    artifacts: list[dict[str, Any]] = []
    images, labels, source = run.calibration_set(artifacts)
    calibration, holdout = split_holdout(images, labels, config)
    calibration, kshot_images = quantizer_calibration(calibration, run.classifier(), config)
    run.progress.set_reconstruct_iters(config.quant.reconstruction.iters)
    clock = time.perf_counter()
    qmodel = quantize_model(
        run.classifier().model,
        config.quant,
        calibration,
        device=torch.device(config.device),
        on_progress=run.progress,
        should_stop=run.should_stop,
    )
    timings = {"quantize": time.perf_counter() - clock}
    if not run.resolved.generates:
        timings["source"] = source["seconds"]
    write_quantized(run.storage, artifacts, qmodel)
    run.quantized = (qmodel, holdout)
    data = {
        "artifacts": artifacts,
        "source": source,
        "calibration": calibration_summary(calibration, holdout, kshot_images),
        "timings": timings,
    }
    return [artifact["key"] for artifact in artifacts], data


def _evaluate(run: _JobRun) -> tuple[list[str], dict[str, Any]]:
    """Agreement on the held-out images (or accuracy on the evaluation set), model size."""
    classifier = run.classifier()
    if run.quantized is not None:
        qmodel, holdout = run.quantized
    else:  # resumed after quantizing: the model from storage, the holdout split again
        qmodel = _load_quantized(run, classifier)
        images, labels, _ = run.calibration_set(None)
        _, holdout = split_holdout(images, labels, run.config)
    clock = time.perf_counter()
    evaluation = evaluate_quantized(classifier, qmodel, holdout, run.config, run.progress)
    return [], {"evaluation": evaluation, "timings": {"evaluate": time.perf_counter() - clock}}


def _upload(run: _JobRun) -> tuple[list[str], dict[str, Any]]:
    """The dataset archive, the report, the resolved config and ``artifacts.json``."""
    checkpoints = run.checkpoints
    artifacts: list[dict[str, Any]] = []
    for stage in (Stage.INVERTING, Stage.FILTERING, Stage.QUANTIZING):
        artifacts += checkpoints.get(stage, {}).get("artifacts", [])
    filtering = checkpoints.get(Stage.FILTERING)
    if filtering is not None:
        artifacts.append(_write_dataset_archive(run.storage))
        source = source_summary(
            run.config, filtering["made"], checkpoints[Stage.GENERATING]["timings"]["source"]
        )
    else:
        source = checkpoints[Stage.QUANTIZING]["source"]
    quantizing = checkpoints.get(Stage.QUANTIZING)
    calibration = (quantizing or filtering or {})["calibration"]
    evaluation = _public_evaluation(
        run, checkpoints.get(Stage.EVALUATING, {}).get("evaluation", {})
    )
    timings = {"load": run.load_seconds}
    for checkpoint in checkpoints.values():
        timings.update(checkpoint.get("timings", {}))
    timings = {name: timings[name] for name in _TIMING_ORDER if name in timings}
    report = build_report(
        run.config,
        run.classifier().num_classes,
        source,
        filtering["filters"] if filtering is not None else None,
        calibration,
        evaluation,
        timings,
    )
    reused_from = (filtering or {}).get("reused_from")
    report["job"] = {
        "id": run.resolved.job_id,
        "kind": run.resolved.kind.value,
        "attempt": run.token,
        "generation_fingerprint": run.resolved.fingerprint,
        "dataset_job_id": run.resolved.dataset_job_id,
        "reused_dataset_from": reused_from,
    }
    report["seconds"] = run.load_seconds + sum(
        c["seconds"] for c in checkpoints.values() if "reused_from" not in c
    )
    write_reports(run.storage, artifacts, run.config, report)
    result = {
        "artifacts_key": ARTIFACTS_KEY,
        "artifacts": artifacts,
        "images_generated": (filtering or {}).get("made", 0),
        "images_kept": (filtering or {}).get("kept", 0),
        "evaluation": {k: v for k, v in evaluation.items() if k in ("agreement", "on")},
        "dataset_job_id": run.resolved.dataset_job_id,
        "reused_dataset_from": reused_from,
    }
    return [artifact["key"] for artifact in artifacts], {"result": result}


# ---------------------------------------------------------------------------------------------
# what a run holds, progress and cancellation


@dataclasses.dataclass
class _JobRun:
    """One attempt's state: the job, the stores, the models loaded so far, the checkpoints."""

    resolved: ResolvedJob
    token: int
    store: JobStore
    storage: JobStorage
    storages: Storages
    settings: WorkerSettings
    builder: Builder | None
    models: ModelProvider
    progress: _Progress
    should_stop: StopFn
    checkpoints: dict[Stage, dict[str, Any]] = dataclasses.field(default_factory=dict)
    load_seconds: float = 0.0
    tokens_applied: bool = False
    kept: tuple[torch.Tensor, torch.Tensor | None] | None = None
    quantized: tuple[torch.nn.Module, torch.Tensor | None] | None = None
    _classifier: LoadedClassifier | None = None
    _pipe: Any = None

    @property
    def config(self) -> GenQConfig:
        return self.resolved.config

    def classifier(self) -> LoadedClassifier:
        """The float classifier, loaded on first use; a model that won't load is bad input."""
        if self._classifier is None:
            clock = time.perf_counter()
            try:
                self._classifier = self.models.classifier(self.config, self.builder)
            except (ValueError, FileNotFoundError) as err:
                raise JobInputError("model", str(err)) from err
            self.load_seconds += time.perf_counter() - clock
        return self._classifier

    def generator(self) -> Any:
        """The diffusion pipeline, with the job's learned tokens when an earlier attempt made them."""
        if self._pipe is None:
            clock = time.perf_counter()
            exclusive = self.config.data_scarce is not None
            try:
                self._pipe = self.models.generator(self.config, exclusive=exclusive)
            except ValueError as err:
                raise JobInputError("generator", str(err)) from err
            self.load_seconds += time.perf_counter() - clock
        if Stage.INVERTING in self.checkpoints and not self.tokens_applied:
            apply_tokens(self._pipe, self.storage.get_bytes(TOKENS_KEY))
            self.tokens_applied = True
        return self._pipe

    def calibration_set(
        self, artifacts: list[dict[str, Any]] | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """The quantizer's images (before the holdout split), labels and the report's source.

        The job's own kept images, an earlier job's kept images (``dataset_job_id``), or an
        uploaded set; with ``artifacts``, an uploaded set is also stored as
        ``calibration/images.safetensors`` and listed there (as ``run_genq`` does).
        """
        config = self.config
        if self.resolved.generates or self.resolved.dataset_job_id is not None:
            dataset_id = self.resolved.dataset_job_id or self.resolved.job_id
            dataset = JobStorage(dataset_id, self.storages)
            filtering = read_checkpoint(dataset, Stage.FILTERING)
            generating = read_checkpoint(dataset, Stage.GENERATING)
            if filtering is None or generating is None:
                raise JobInputError(
                    "calibration.dataset_job_id", f"the dataset of job {dataset_id} is gone"
                )
            source = source_summary(config, filtering["made"], generating["timings"]["source"])
            if self.kept is not None:
                return *self.kept, source
            images, labels = _kept_images(dataset, self.classifier())
            return images, labels, source
        made = make_calibration(config, self.classifier(), None, self.storage)
        source = source_summary(config, made.made, made.seconds)
        if artifacts is None:
            return made.images, made.labels, source
        selection = select_calibration(config, self.classifier(), made, self.storage, artifacts)
        return selection.images, selection.labels, source


class _Progress:
    """``genq_core``'s ``on_progress`` -> the job store, at most once per ``interval_s``.

    Events are mapped to the job's stages (``filter:energy`` -> filtering, ``reconstruct`` ->
    quantizing with ``blocks_reconstructed``); the latest values wait until the interval has
    passed or the runner flushes them at a stage's end. Every event also goes to ``observer``.
    """

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        token: int,
        interval_s: float,
        observer: ProgressFn | None,
    ) -> None:
        self._store = store
        self._job_id = job_id
        self._token = token
        self._interval_s = interval_s
        self._observer = observer
        self._last = float("-inf")
        self._stage: tuple[Stage, int, int] | None = None
        self._counters: dict[str, int] = {}
        self._reconstruct_iters = 1

    def __call__(self, name: str, done: int, total: int) -> None:
        if self._observer is not None:
            self._observer(name, done, total)
        stage = _PROGRESS_STAGES.get(name.split(":")[0])
        if stage is None:
            return
        self._stage = (stage, max(done, 0), max(total, 0))
        if stage == Stage.GENERATING:
            self._counters["images_generated"] = max(done, 0)
        if name == "reconstruct":
            self._counters["blocks_reconstructed"] = max(done, 0) // self._reconstruct_iters
        if time.monotonic() - self._last >= self._interval_s:
            self.flush()

    def set_reconstruct_iters(self, iters: int) -> None:
        """Reconstruction reports iterations; this many make one block."""
        self._reconstruct_iters = max(iters, 1)

    def counters(self, **counters: int) -> None:
        """Counters to write with the next flush."""
        self._counters.update(counters)

    def flush(self) -> None:
        """Write what is pending now (``StaleAttempt`` if a newer attempt owns the job)."""
        if self._stage is None and not self._counters:
            return
        counters: dict[str, Any] = dict(self._counters)  # names checked by the store
        if self._stage is None:
            self._store.update_progress(self._job_id, self._token, **counters)
        else:
            stage, done, total = self._stage
            self._store.update_progress(
                self._job_id, self._token, stage=stage, done=done, total=total, **counters
            )
        self._stage, self._counters = None, {}
        self._last = time.monotonic()


class _CancelPoll:
    """``should_stop``: the job's cancel flag, read at most once per ``interval_s``."""

    def __init__(self, store: JobStore, job_id: str, interval_s: float) -> None:
        self._store = store
        self._job_id = job_id
        self._interval_s = interval_s
        self._last = float("-inf")
        self._canceled = False

    def __call__(self) -> bool:
        if not self._canceled and time.monotonic() - self._last >= self._interval_s:
            self._canceled = self._store.is_cancel_requested(self._job_id)
            self._last = time.monotonic()
        return self._canceled


# ---------------------------------------------------------------------------------------------
# helpers


def _public_evaluation(run: _JobRun, evaluation: dict[str, Any]) -> dict[str, Any]:
    """The evaluation as users see it: an uploaded evaluation set is named by its upload id, not
    by the folder this worker unpacked it into."""
    request = run.resolved.request
    upload_id = request.evaluation.eval_upload_id if hasattr(request, "evaluation") else None
    eval_dir = run.config.evaluation.eval_dir
    if upload_id is None or eval_dir is None or "on" not in evaluation:
        return evaluation
    return {**evaluation, "on": evaluation["on"].replace(str(eval_dir), f"upload {upload_id}")}


@contextmanager
def _redis_client(redis: Redis | None, settings: WorkerSettings) -> Iterator[Redis | None]:
    """The caller's client, else one on ``settings.redis_url`` for this run, else ``None``."""
    if redis is not None or not settings.redis_url:
        yield redis
        return
    client = Redis.from_url(settings.redis_url)
    try:
        yield client
    finally:
        client.close()


def _offset(progress: ProgressFn, base: int, total: int) -> ProgressFn:
    """A shard's progress (images of the shard) as progress of the whole set."""

    def report(name: str, done: int, _shard_total: int) -> None:
        progress(name, base + done, total)

    return report


def _kept_images(
    storage: JobStorage, classifier: LoadedClassifier
) -> tuple[torch.Tensor, torch.Tensor]:
    """A finished dataset's kept images (manifest order) through the classifier's preprocessing."""
    kept = [record for record in read_manifest(storage, MANIFEST_KEY) if record.kept_final]
    if not kept:
        raise ValueError(f"the dataset of job {storage.job_id} kept no images")
    images = load_images(storage, kept, classifier.preprocessing)
    labels = torch.tensor([record.class_index for record in kept], dtype=torch.long)
    return images, labels


def _load_quantized(run: _JobRun, classifier: LoadedClassifier) -> torch.nn.Module:
    """The quantized model an earlier attempt stored (``model/...``)."""
    with tempfile.TemporaryDirectory() as folder:
        for key in run.storage.list(f"{MODEL_PREFIX}/"):
            path = Path(folder) / key.removeprefix(f"{MODEL_PREFIX}/")
            path.write_bytes(run.storage.get_bytes(key))
        return load_quantized(classifier.model, folder, device=torch.device(run.config.device))


def _write_dataset_archive(storage: JobStorage) -> dict[str, Any]:
    """``synthetic/dataset.tar``: ``manifest.jsonl`` (the kept images' records, keys relative to
    the archive) and ``images/CCCC/NNNNNN.png``. Byte-identical on every rerun (fixed order,
    times and owners), so a retried upload keeps its sha256."""
    kept = [record for record in read_manifest(storage, MANIFEST_KEY) if record.kept_final]
    relocated = [
        dataclasses.replace(record, key=record.key.removeprefix(f"{SYNTHETIC_PREFIX}/"))
        for record in kept
    ]
    manifest = "".join(json.dumps(record.to_dict()) + "\n" for record in relocated)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "dataset.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            _add_to_tar(tar, "manifest.jsonl", manifest.encode())
            for record, moved in zip(kept, relocated, strict=True):
                _add_to_tar(tar, moved.key, storage.get_bytes(record.key))
        storage.put_file(DATASET_ARCHIVE_KEY, path, content_type(DATASET_ARCHIVE_KEY))
        return {
            "name": "synthetic-dataset",
            "key": DATASET_ARCHIVE_KEY,
            "size": path.stat().st_size,
            "sha256": file_sha256(path),
            "content_type": content_type(DATASET_ARCHIVE_KEY),
        }


def _add_to_tar(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _reusable_dataset(redis: Redis, run: _JobRun) -> str | None:
    """The job holding a finished dataset with this job's fingerprint, if one is still there."""
    resolved = run.resolved
    if resolved.fingerprint is None:
        return None
    key = dataset_key(run.settings.redis_prefix, resolved.tenant, resolved.fingerprint)
    raw = redis.get(key)
    if raw is None:
        return None
    source_id = raw.decode() if isinstance(raw, bytes) else str(raw)
    if source_id == resolved.job_id or not is_job_id(source_id):
        return None
    if not dataset_is_complete(JobStorage(source_id, run.storages)):
        logger.info("dataset of job %s is gone; generating anew", source_id)
        return None
    return source_id


def _copy_dataset(run: _JobRun, source: JobStorage, source_id: str) -> None:
    """Copy another job's finished dataset (images, manifest, tokens, shards), checkpoints last."""
    keys = [
        key
        for prefix in (f"{SYNTHETIC_PREFIX}/", "tokens/", f"{CHECKPOINT_PREFIX}/generating/")
        for key in source.list(prefix)
        if key != DATASET_ARCHIVE_KEY
    ]
    for key in keys:
        run.storage.put_bytes(key, source.get_bytes(key), content_type(key))
    for stage in _DATASET_STAGES:
        checkpoint = read_checkpoint(source, stage)
        if checkpoint is None:
            continue
        data = {k: v for k, v in checkpoint.items() if k not in ("version", "stage", "outputs")}
        data["reused_from"] = source_id
        run.checkpoints[stage] = write_checkpoint(run.storage, stage, checkpoint["outputs"], data)
    filtering = run.checkpoints[Stage.FILTERING]
    run.progress.counters(images_generated=filtering["made"], images_kept=filtering["kept"])
    run.progress.flush()
    logger.info("job %s reuses the dataset of job %s", run.resolved.job_id, source_id)


def _record_dataset(redis: Redis, run: _JobRun) -> None:
    """Offer this job's finished dataset to later jobs of the tenant with the same fingerprint."""
    resolved = run.resolved
    if resolved.fingerprint is not None and resolved.kind != JobKind.QUANTIZE:
        key = dataset_key(run.settings.redis_prefix, resolved.tenant, resolved.fingerprint)
        redis.set(key, resolved.job_id)


# ---------------------------------------------------------------------------------------------
# registrations

_PROGRESS_STAGES: dict[str, Stage] = {
    "invert": Stage.INVERTING,
    "generate": Stage.GENERATING,
    "filter": Stage.FILTERING,
    "bn_align": Stage.QUANTIZING,
    "calibrate": Stage.QUANTIZING,
    "reconstruct": Stage.QUANTIZING,
    "evaluate": Stage.EVALUATING,
}
"""``genq_core``'s progress stage names (before any ``:``) -> the job's stages."""

_STAGES: dict[Stage, Callable[[_JobRun], tuple[list[str], dict[str, Any]]]] = {
    Stage.INVERTING: _invert,
    Stage.GENERATING: _generate,
    Stage.FILTERING: _filter,
    Stage.QUANTIZING: _quantize,
    Stage.EVALUATING: _evaluate,
    Stage.UPLOADING: _upload,
}
"""Each stage's function; :func:`stages_for` decides which run."""
