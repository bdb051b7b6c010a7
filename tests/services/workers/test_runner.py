"""The job runner against a real Redis and a real S3 server: stages, checkpoints, resume, reuse,
cancel, fencing, and the same outputs as ``run_genq``."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydantic import TypeAdapter

from genq_core.configio import from_dict
from genq_core.manifest import read_manifest
from genq_core.pipeline import GenQConfig, run_genq
from genq_core.progress import Canceled
from genq_core.storage import LocalStorage
from services.common import spec
from services.common.jobs import JobRecord, Stage
from services.common.jobstore import StaleAttempt
from services.common.keys import BucketRole, upload_prefix
from services.common.worker_metrics import stage_seconds_key
from services.workers.checkpoints import checkpoint_key
from services.workers.resolve import JobInputError
from services.workers.runner import DATASET_ARCHIVE_KEY, dataset_key, run_job
from services.workers.storage import JobStorage
from tests.services.workers.conftest import Services

Events = list[tuple[str, int, int]]


def genq_body(kind: str = "genq", seed: int = 0, **sections: Any) -> dict[str, Any]:
    """A tiny job: the built-in Fashion BN CNN, the built-in tiny generator, 4 images per class,
    2 denoising steps, 2 reconstruction steps per block."""
    body: dict[str, Any] = {"kind": kind, "model": {"source": "builtin", "name": "fashion-bn-cnn"}}
    if kind in ("genq", "generate"):
        body["generator"] = {"source": "builtin", "name": "tiny"}
        body["generation"] = {"num_per_class": 4, "steps": 2, "batch_size": 8, "seed": seed}
        body["filters"] = {"energy_keep": 0.75, "distribution_keep": 0.6}
    if kind in ("genq", "quantize"):
        body["quant"] = {"preset": "qdrop", "iters": 2}
    body.update(sections)
    return body


def start(services: Services, tenant: str, body: dict[str, Any]) -> tuple[JobRecord, int]:
    """Create a job as the API does (with its generation fingerprint) and start an attempt."""
    config = dict(body)
    request = TypeAdapter(spec.JobRequest).validate_python(body)
    if not isinstance(request, spec.QuantizeJobRequest):
        config["generation_fingerprint"] = spec.generation_fingerprint(request)
    job, _ = services.store.create(tenant, body["kind"], config)
    return job, services.store.start_attempt(job.id)


def run(services: Services, job: JobRecord, token: int, events: Events | None = None) -> dict:
    def observe(stage: str, done: int, total: int) -> None:
        if events is not None:
            events.append((stage, done, total))

    return run_job(
        job.id,
        token,
        services.store,
        services.storages,
        services.settings,
        redis=services.redis,
        on_progress=observe,
    )


def stages_seen(events: Events) -> set[str]:
    return {stage.split(":")[0] for stage, _, _ in events}


@pytest.fixture(scope="module")
def first_job(services: Services) -> tuple[JobRecord, dict[str, Any], Events]:
    """One whole genq job, shared by the tests that look at its outputs or reuse its dataset."""
    job, token = start(services, "acme", genq_body())
    events: Events = []
    result = run(services, job, token, events)
    return job, result, events


def test_genq_job_writes_every_artifact_to_s3(services: Services, first_job: Any) -> None:
    job, result, events = first_job
    storage = JobStorage(job.id, services.storages)
    # every artifact is in its bucket with the sha256 and size artifacts.json lists
    listed = json.loads(storage.get_bytes("artifacts.json"))["artifacts"]
    keys = {artifact["key"] for artifact in listed}
    assert keys >= {
        "synthetic/manifest.jsonl",
        DATASET_ARCHIVE_KEY,
        "model/model.safetensors",
        "model/encodings.json",
        "config.json",
        "report.json",
        "report.md",
    }
    for artifact in listed:
        data = storage.get_bytes(artifact["key"])
        assert hashlib.sha256(data).hexdigest() == artifact["sha256"]
        assert len(data) == artifact["size"]
    assert [a["key"] for a in result["artifacts"]][:-1] == [a["key"] for a in listed]
    # outputs are split over the buckets by kind, under jobs/{id}/
    results_bucket = services.storages[BucketRole.RESULTS]
    data_bucket = services.storages[BucketRole.DATA]
    assert results_bucket.exists(f"jobs/{job.id}/model/model.safetensors")
    assert data_bucket.exists(f"jobs/{job.id}/synthetic/manifest.jsonl")
    assert not results_bucket.exists(f"jobs/{job.id}/synthetic/manifest.jsonl")
    # the archive holds the kept images and their manifest
    records = read_manifest(storage, "synthetic/manifest.jsonl")
    kept = [r for r in records if r.kept_final]
    assert len(records) == 40 and 0 < len(kept) < 40
    with tarfile.open(fileobj=io.BytesIO(storage.get_bytes(DATASET_ARCHIVE_KEY))) as tar:
        names = tar.getnames()
        manifest = tar.extractfile("manifest.jsonl")
        assert manifest is not None
        inside = [json.loads(line) for line in manifest.read().splitlines()]
    assert names[0] == "manifest.jsonl" and len(names) == len(kept) + 1
    assert [r["key"] for r in inside] == [r.key.removeprefix("synthetic/") for r in kept]
    # checkpoints of every stage, progress and counters in the job record
    for stage in (Stage.GENERATING, Stage.FILTERING, Stage.QUANTIZING, Stage.EVALUATING):
        assert storage.exists(checkpoint_key(stage))
    record = services.store.get(job.id)
    assert record is not None and record.stage == Stage.UPLOADING
    assert record.progress.images_generated == 40
    assert record.progress.images_kept == len(kept) == result["images_kept"]
    assert record.progress.blocks_reconstructed > 0
    assert record.progress.stages[Stage.GENERATING].done == 40
    assert {"generate", "filter", "reconstruct", "evaluate"} <= stages_seen(events)
    # the report echoes the job; Redis has the dataset and the stage durations
    report = json.loads(storage.get_bytes("report.json"))
    assert report["source"] == {**report["source"], "name": "genq", "made": 40}
    assert report["job"]["id"] == job.id and report["job"]["reused_dataset_from"] is None
    assert 0.0 <= report["evaluation"]["agreement"] <= 100.0
    assert services.redis.get(dataset_key("genq", "acme", report["job"]["generation_fingerprint"]))
    metrics = services.redis.hgetall(stage_seconds_key("genq"))
    assert float(metrics[b"generating:count"]) >= 1 and float(metrics[b"generating:sum"]) > 0


def test_outputs_match_a_direct_run_genq(
    services: Services, first_job: Any, tmp_path: Path
) -> None:
    job, _, _ = first_job
    storage = JobStorage(job.id, services.storages)
    config = from_dict(GenQConfig, json.loads(storage.get_bytes("config.json"))["config"])
    run_genq(config, tmp_path)
    local = LocalStorage(tmp_path)
    for key in ("synthetic/manifest.jsonl", "model/model.safetensors", "model/encodings.json"):
        assert storage.get_bytes(key) == local.get_bytes(key), key
    ours = json.loads(storage.get_bytes("report.json"))
    theirs = json.loads(local.get_bytes("report.json"))
    for field in ("calibration_images", "holdout_images", "calibration_stats", "evaluation"):
        assert ours[field] == theirs[field], field
    assert ours["filters"]["filters"] == theirs["filters"]["filters"]


def test_generate_job_with_the_same_fingerprint_reuses_the_dataset(
    services: Services, first_job: Any
) -> None:
    first, _, _ = first_job
    job, token = start(services, "acme", genq_body(kind="generate"))
    events: Events = []
    result = run(services, job, token, events)
    assert "generate" not in stages_seen(events) and "filter" not in stages_seen(events)
    assert result["reused_dataset_from"] == first.id
    ours, theirs = JobStorage(job.id, services.storages), JobStorage(first.id, services.storages)
    assert ours.get_bytes("synthetic/manifest.jsonl") == theirs.get_bytes(
        "synthetic/manifest.jsonl"
    )
    listed = {a["key"] for a in json.loads(ours.get_bytes("artifacts.json"))["artifacts"]}
    assert DATASET_ARCHIVE_KEY in listed and not any(k.startswith("model/") for k in listed)
    assert ours.get_bytes(DATASET_ARCHIVE_KEY) == theirs.get_bytes(DATASET_ARCHIVE_KEY)
    # another tenant never sees it
    other, other_token = start(services, "globex", genq_body(kind="generate", seed=5))
    assert run(services, other, other_token)["reused_dataset_from"] is None


def test_quantize_job_on_the_first_jobs_dataset(services: Services, first_job: Any) -> None:
    first, first_result, _ = first_job
    body = genq_body(kind="quantize", calibration={"dataset_job_id": first.id})
    job, token = start(services, "acme", body)
    events: Events = []
    result = run(services, job, token, events)
    assert "generate" not in stages_seen(events) and "reconstruct" in stages_seen(events)
    storage = JobStorage(job.id, services.storages)
    report = json.loads(storage.get_bytes("report.json"))
    assert report["job"]["dataset_job_id"] == first.id
    assert report["source"]["name"] == "genq" and report["source"]["made"] == 40
    assert report["calibration_images"] + report["holdout_images"] == first_result["images_kept"]
    assert {a["key"] for a in result["artifacts"]} >= {"model/model.safetensors", "report.json"}
    # the same calibration set and quantizer settings give the same model as the first job
    theirs = JobStorage(first.id, services.storages)
    assert storage.get_bytes("model/model.safetensors") == theirs.get_bytes(
        "model/model.safetensors"
    )


def test_quantize_job_on_an_uploaded_image_set(services: Services, tmp_path: Path) -> None:
    archive = io.BytesIO()
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(archive, "w") as zipped:
        for name in ("bag", "sandal"):
            for i in range(3):
                image = Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8))
                png = io.BytesIO()
                image.save(png, format="PNG")
                zipped.writestr(f"{name}/{i}.png", png.getvalue())
        zipped.writestr("__MACOSX/bag/._0.png", b"resource fork")
    uploads = services.storages[BucketRole.UPLOADS]
    uploads.put_bytes(f"{upload_prefix('acme', 'calib1')}/images.zip", archive.getvalue())
    body = genq_body(
        kind="quantize",
        calibration={"upload_id": "calib1"},
        evaluation={"eval_upload_id": "calib1"},  # the same labelled folders, as evaluation set
    )
    job, token = start(services, "acme", body)
    result = run(services, job, token)
    storage = JobStorage(job.id, services.storages)
    report = json.loads(storage.get_bytes("report.json"))
    assert report["source"]["name"] == "real" and report["source"]["made"] == 6
    assert storage.exists("calibration/images.safetensors")
    # the evaluation set is named by its upload, not by the worker's cache folder
    assert report["evaluation"]["on"] == "6 labelled images from upload calib1"
    assert result["evaluation"]["on"] == report["evaluation"]["on"]
    assert 0.0 <= report["evaluation"]["quantized"]["top1"] <= 100.0


def test_resume_after_failures_skips_finished_stages(services: Services) -> None:
    job, token = start(services, "resume", genq_body(seed=1))
    storage = JobStorage(job.id, services.storages)

    def fail_at(prefix: str) -> Any:
        def observe(stage: str, done: int, total: int) -> None:
            if stage.startswith(prefix):
                raise RuntimeError(f"worker died at {stage}")

        return observe

    # attempt 1 dies once generation is done, attempt 2 once the model is quantized
    for prefix in ("filter", "evaluate"):
        with pytest.raises(RuntimeError, match="worker died"):
            run_job(
                job.id,
                token,
                services.store,
                services.storages,
                services.settings,
                redis=services.redis,
                on_progress=fail_at(prefix),
            )
        token = services.store.start_attempt(job.id)
    assert storage.exists(checkpoint_key(Stage.QUANTIZING))
    assert not storage.exists(checkpoint_key(Stage.EVALUATING))
    # attempt 3 only evaluates (with the stored model) and uploads
    events: Events = []
    result = run(services, job, token, events)
    assert stages_seen(events) == {"evaluate"}
    report = json.loads(storage.get_bytes("report.json"))
    assert report["job"]["attempt"] == 3 and "agreement" in result["evaluation"]
    assert json.loads(storage.get_bytes(checkpoint_key(Stage.GENERATING)))["attempt"] == 1
    # a rerun after success changes nothing and returns the same result
    token = services.store.start_attempt(job.id)
    events = []
    assert run(services, job, token, events) == result and events == []


def test_data_scarce_job_resumes_with_the_tokens_it_learned(services: Services) -> None:
    archive = io.BytesIO()
    rng = np.random.default_rng(1)
    with zipfile.ZipFile(archive, "w") as zipped:
        for name in ("coat", "shirt"):
            for i in range(2):
                png = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(png, "PNG")
                zipped.writestr(f"{name}/{i}.png", png.getvalue())
    uploads = services.storages[BucketRole.UPLOADS]
    uploads.put_bytes(f"{upload_prefix('scarce', 'kshot1')}/images.zip", archive.getvalue())
    body = genq_body(data_scarce={"kshot_upload_id": "kshot1", "steps": 2})
    job, token = start(services, "scarce", body)

    def die_generating(stage: str, done: int, total: int) -> None:
        if stage == "generate":
            raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        run_job(
            job.id,
            token,
            services.store,
            services.storages,
            services.settings,
            redis=services.redis,
            on_progress=die_generating,
        )
    events: Events = []
    result = run(services, job, services.store.start_attempt(job.id), events)
    assert "invert" not in stages_seen(events) and "generate" in stages_seen(events)
    storage = JobStorage(job.id, services.storages)
    assert "tokens/tokens.safetensors" in {a["key"] for a in result["artifacts"]}
    records = read_manifest(storage, "synthetic/manifest.jsonl")
    assert len(records) == 40 and all("<genq-style>" in r.prompt for r in records)
    # the quantizer also calibrated on the 4 k-shot images, repeated to fill half of its set
    report = json.loads(storage.get_bytes("report.json"))
    assert 4 < report["kshot_images"] == round(report["calibration_images"] / 2)
    assert (
        report["calibration_images"] == 4 + report["filters"]["num_kept"] - report["holdout_images"]
    )


def test_cancel_mid_generation_stops_before_the_next_stage(services: Services) -> None:
    job, token = start(services, "cancel", genq_body(seed=2))

    def cancel_once_generating(stage: str, done: int, total: int) -> None:
        if stage == "generate":
            services.store.request_cancel(job.id, "cancel")

    with pytest.raises(Canceled):
        run_job(
            job.id,
            token,
            services.store,
            services.storages,
            services.settings,
            redis=services.redis,
            on_progress=cancel_once_generating,
        )
    storage = JobStorage(job.id, services.storages)
    assert not storage.exists(checkpoint_key(Stage.GENERATING))
    assert not storage.exists("synthetic/manifest.jsonl")
    record = services.store.get(job.id)
    assert record is not None and record.stage == Stage.GENERATING
    assert record.progress.images_generated < 40


def test_a_stale_attempt_stops_at_its_next_write(services: Services) -> None:
    job, token = start(services, "stale", genq_body(seed=3))

    def lose_the_lease(stage: str, done: int, total: int) -> None:
        if stage == "generate" and done == 8:
            services.store.start_attempt(job.id)  # another worker takes the job over

    with pytest.raises(StaleAttempt):
        run_job(
            job.id,
            token,
            services.store,
            services.storages,
            services.settings,
            redis=services.redis,
            on_progress=lose_the_lease,
        )
    assert not JobStorage(job.id, services.storages).exists(checkpoint_key(Stage.GENERATING))


def test_a_bad_request_names_the_field(services: Services) -> None:
    body = genq_body()
    body["model"] = {"source": "builtin", "name": "imagenet-resnet"}
    job, token = start(services, "bad", body)
    with pytest.raises(JobInputError, match=r"^model\.name: unknown built-in model") as caught:
        run(services, job, token)
    assert caught.value.field == "model.name"
    missing, token = start(
        services, "bad", genq_body(kind="quantize", calibration={"upload_id": "nothing"})
    )
    with pytest.raises(JobInputError, match=r"^calibration\.upload_id: no upload"):
        run(services, missing, token)
