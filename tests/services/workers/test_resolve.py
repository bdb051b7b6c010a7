"""Resolving a job's request: built-in models, hub ids, uploads unpacked safely, errors naming fields."""

from __future__ import annotations

import gzip
import io
import tarfile
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from genq_core.storage import Storage
from services.common import spec
from services.common.jobs import JobKind, JobRecord, JobStatus, new_job_id
from services.common.jobstore import JobStore
from services.common.keys import BucketRole, upload_prefix
from services.common.settings import Mode
from services.workers.resolve import JobInputError, parse_request, resolve_job
from services.workers.settings import WorkerSettings
from services.workers.storage import open_storages

REPO_ROOT = Path(__file__).resolve().parents[3]
TENANT = "acme"


@pytest.fixture
def settings(tmp_path: Path) -> WorkerSettings:
    return WorkerSettings(
        mode=Mode.EMBEDDED,
        data_dir=tmp_path / "data",
        assets_dir=REPO_ROOT / "benchmarks" / "assets",
        model_cache_dir=tmp_path / "cache",
        max_unpacked_bytes=10_000,
        max_unpacked_files=20,
    )


@pytest.fixture
def storages(settings: WorkerSettings) -> dict[BucketRole, Storage]:
    return open_storages(settings)


@pytest.fixture
def store() -> JobStore:
    # never reached: only quantize jobs on an earlier dataset read the store
    return JobStore(redis.Redis(host="127.0.0.1", port=1))


def record(body: dict[str, Any]) -> JobRecord:
    now = datetime.now(UTC)
    return JobRecord(
        id=new_job_id(),
        tenant=TENANT,
        kind=JobKind(body["kind"]),
        status=JobStatus.RUNNING,
        created_at=now,
        updated_at=now,
        config=body,
    )


def quantize_body(**calibration: Any) -> dict[str, Any]:
    return {
        "kind": "quantize",
        "model": {"source": "builtin", "name": "fashion-bn-cnn"},
        "calibration": calibration,
        "quant": {"iters": 2},
    }


def test_builtin_models_resolve_with_their_preprocessing_and_overrides(
    settings: WorkerSettings, storages: Any, store: JobStore
) -> None:
    body: dict[str, Any] = {
        "kind": "generate",
        "model": {
            "source": "builtin",
            "name": "fashion-resnet",
            "preprocessing": {"interpolation": "nearest"},
        },
        "generator": {"source": "builtin", "name": "fashion-sd"},
        "generation": {"num_per_class": 2, "templates": ["a photo of a {cls}"]},
        "generation_fingerprint": "f" * 64,
    }
    resolved = resolve_job(record(body), store, storages, settings)
    classifier = resolved.config.classifier
    assert classifier.name == "genq_core.bench.classifiers:small_resnet_fmnist"
    assert classifier.weights == settings.assets_dir / "fmnist_resnet.safetensors"
    assert classifier.preprocessing.input_size == (1, 28, 28)
    assert classifier.preprocessing.interpolation == "nearest"
    assert classifier.class_names is not None and classifier.class_names[0] == "t-shirt"
    assert resolved.config.generator.source == str(settings.assets_dir / "fashion-sd")
    assert resolved.config.generation.templates == ("a photo of a {cls}",)
    assert resolved.config.quant is None and resolved.fingerprint == "f" * 64


def test_hub_models_pass_through_and_the_quantizer_takes_the_request_settings(
    settings: WorkerSettings, storages: Any, store: JobStore
) -> None:
    body: dict[str, Any] = {
        "kind": "genq",
        "model": {"source": "timm", "name": "resnet18.a1_in1k"},
        "generator": {"source": "hub", "name": "stabilityai/sd-turbo"},
        "calibration": {"num_images": 256},
        "quant": {"weight_bits": 2, "iters": 7, "bn_align_iters": 50},
    }
    resolved = resolve_job(record(body), store, storages, settings)
    assert resolved.config.classifier.source == "timm"
    assert resolved.config.generator.source == "stabilityai/sd-turbo"
    assert resolved.config.quant is not None
    assert resolved.config.quant.max_calibration_images == 256
    assert resolved.config.quant.reconstruction.iters == 7
    assert resolved.config.quant.bn_align_iters == 50
    assert resolved.fingerprint == spec.generation_fingerprint(
        spec.GenqJobRequest.model_validate(body)
    )


def test_the_data_scarce_section_takes_the_request_settings(
    settings: WorkerSettings, storages: Any, store: JobStore
) -> None:
    upload(storages, "ks1", "images.zip", zip_bytes({"bag/1.png": b"x", "coat/2.png": b"y"}))
    body: dict[str, Any] = {
        "kind": "genq",
        "model": {"source": "builtin", "name": "fashion-bn-cnn"},
        "generator": {"source": "hub", "name": "stabilityai/sd-turbo"},
        "data_scarce": {"kshot_upload_id": "ks1", "steps": 3, "kshot_share": 0.25},
    }
    scarce = resolve_job(record(body), store, storages, settings).config.data_scarce
    assert scarce is not None and scarce.kshot_share == 0.25 and scarce.calibrate_with_kshot
    assert scarce.inversion.steps == 3
    assert sorted(p.name for p in Path(scarce.kshot_dir).rglob("*.png")) == ["1.png", "2.png"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model": {"source": "builtin", "name": "imagenet-vit"}}, "model.name"),
        (
            {"model": {"source": "builtin", "name": "fashion-bn-cnn", "num_classes": 5}},
            "model.num_classes",
        ),
        ({"generator": {"source": "builtin", "name": "sdxl"}}, "generator.name"),
        ({"generator": {"source": "hub", "name": "../../etc/passwd"}}, "generator.name"),
        ({"generator": {"source": "hub", "name": "benchmarks/assets"}}, "generator.name"),
        ({"model": {"source": "timm", "name": "os:system"}}, "model.name"),
        ({"quant": {"weight_bits": 9}}, "quant.weight_bits"),
        ({"filters": {"order": ["energy", "energy"]}}, "filters.order"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_bad_requests_name_the_field(
    settings: WorkerSettings, storages: Any, store: JobStore, change: dict[str, Any], field: str
) -> None:
    body: dict[str, Any] = {
        "kind": "genq",
        "model": {"source": "builtin", "name": "fashion-bn-cnn"},
        "generator": {"source": "builtin", "name": "fashion-sd"},
    }
    body.update(change)
    with pytest.raises(JobInputError) as caught:
        resolve_job(record(body), store, storages, settings)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


def test_parse_request_drops_only_the_api_extras() -> None:
    body = quantize_body(upload_id="u1")
    assert parse_request({**body, "generation_fingerprint": "x"}).kind == "quantize"
    with pytest.raises(JobInputError, match="^limits: "):
        parse_request({**body, "limits": {}})


def zip_bytes(files: dict[str, bytes], link: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zipped:
        for name, data in files.items():
            zipped.writestr(name, data)
        if link is not None:
            info = zipfile.ZipInfo(link)
            info.external_attr = 0o120777 << 16  # a symlink
            zipped.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def tar_bytes(files: dict[str, bytes], link: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link is not None:
            info = tarfile.TarInfo(link)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return buffer.getvalue()


def upload(storages: Any, upload_id: str, name: str, data: bytes) -> None:
    storages[BucketRole.UPLOADS].put_bytes(f"{upload_prefix(TENANT, upload_id)}/{name}", data)


@pytest.mark.parametrize("archive", ["images.zip", "images.tar", "images.tar.gz"])
def test_an_uploaded_image_set_is_unpacked_once_into_the_cache(
    settings: WorkerSettings, storages: Any, store: JobStore, archive: str
) -> None:
    pack = zip_bytes if archive.endswith(".zip") else tar_bytes
    data = pack({"bag/1.png": b"x", "coat/2.png": b"y"})
    upload(storages, "set1", archive, gzip.compress(data) if archive.endswith(".gz") else data)
    resolved = resolve_job(record(quantize_body(upload_id="set1")), store, storages, settings)
    folder = Path(resolved.config.calibration.real_dir or "")
    assert folder == settings.model_cache_dir / "uploads" / TENANT / "set1" / "images"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png")) == [
        "bag/1.png",
        "coat/2.png",
    ]
    # a second job finds it in the cache (the upload may be gone by then)
    storages[BucketRole.UPLOADS].delete(f"{upload_prefix(TENANT, 'set1')}/{archive}")
    again = resolve_job(record(quantize_body(upload_id="set1")), store, storages, settings)
    assert again.config.calibration.real_dir == str(folder)


@pytest.mark.parametrize(
    ("archive", "message"),
    [
        (zip_bytes({"../escape.png": b"x"}), "not a plain relative path"),
        (zip_bytes({"/abs.png": b"x"}), "not a plain relative path"),
        (zip_bytes({"a.png": b"x"}, link="bag/link.png"), "links are not allowed"),
        (tar_bytes({"bag/a.png": b"x"}, link="bag/link.png"), "only files and folders"),
        (tar_bytes({"bag/../../a.png": b"x"}), "not a plain relative path"),
        (zip_bytes({"big.png": b"0" * 20_000}), "more than 10000 bytes"),
        (zip_bytes({f"{i}.png": b"x" for i in range(21)}), "more than 20 files"),
        (b"not an archive", "not a readable archive"),
    ],
)
def test_unsafe_archives_are_refused(
    settings: WorkerSettings, storages: Any, store: JobStore, archive: bytes, message: str
) -> None:
    name = "images.tar" if archive[257:262] == b"ustar" else "images.zip"
    upload(storages, "bad", name, archive)
    with pytest.raises(JobInputError, match=message) as caught:
        resolve_job(record(quantize_body(upload_id="bad")), store, storages, settings)
    assert caught.value.field == "calibration.upload_id"
    assert not (settings.model_cache_dir / "uploads" / TENANT / "bad" / "images").exists()
    assert not (settings.model_cache_dir.parent / "escape.png").exists()


def test_uploaded_models(settings: WorkerSettings, storages: Any, store: JobStore) -> None:
    upload(storages, "m1", "model.safetensors", b"weights")
    body = quantize_body(upload_id="set")
    body["model"] = {"source": "upload", "upload_id": "m1", "name": "resnet18", "num_classes": 10}
    upload(storages, "set", "images.zip", zip_bytes({"a.png": b"x"}))
    resolved = resolve_job(record(body), store, storages, settings)
    assert resolved.config.classifier.source == "weights"
    assert resolved.config.classifier.weights == (
        settings.model_cache_dir / "uploads" / TENANT / "m1" / "model.safetensors"
    )
    del body["model"]["name"]
    with pytest.raises(JobInputError, match="^model.name: a safetensors upload needs"):
        resolve_job(record(body), store, storages, settings)
    body["model"]["upload_id"] = "set"
    with pytest.raises(JobInputError, match="^model.upload_id: upload 'set' holds none of"):
        resolve_job(record(body), store, storages, settings)
