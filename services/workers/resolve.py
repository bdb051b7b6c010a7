"""From a job's request to a ``GenQConfig``: built-in models, hub ids, uploads, earlier datasets.

A job record's ``config`` is a dumped :data:`services.common.spec.JobRequest` (plus a few keys the
API adds, :data:`API_EXTRAS`). A request never names a file on the worker, so resolving it means:

- **built-in models** come from the small registries at the end of this module (the Fashion
  benchmark's classifiers and generator, shipped in ``WorkerSettings.assets_dir``, and ``tiny``,
  a random tiny Stable Diffusion built once in ``WorkerSettings.model_cache_dir``);
- **hub ids** (``timm`` classifiers, ``hub`` generators) pass through; the worker nodes fetch them;
- **uploads** are downloaded from the uploads bucket, ``uploads/{tenant}/{upload_id}/``, into
  the model cache (once per upload; uploads never change). What an upload holds is this
  module's assumption about the upload endpoints, checked here:

  * a model: ``model.safetensors`` (weights for the timm architecture ``model.name``) or
    ``model.pt2`` (a ``torch.export`` archive, ``model.name`` unset). Never a pickle.
  * an image set (calibration set, evaluation set, k-shot images): ``images.zip``,
    ``images.tar`` or ``images.tar.gz`` whose root holds one sub-folder of images per class, named like the
    classifier's classes (a calibration set may also be a flat set of images). Archives are
    unpacked safely: no absolute paths, ``..``, links or devices, bounded size and file count;
    macOS metadata (``__MACOSX/``, ``._*``) is skipped.
- a ``quantize`` job's ``calibration.dataset_job_id`` names an earlier ``genq`` or ``generate``
  job of the same tenant whose filtered synthetic set is finished; the job reads its kept
  images, and its resolved config echoes the generation settings that made them.

Anything a user can get wrong raises :class:`JobInputError` naming the request field; the
dispatcher fails such a job without retrying it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import TypeAdapter, ValidationError

from genq_core.classifier import ClassifierConfig, PreprocessingOverrides
from genq_core.filters import FilterConfig
from genq_core.generate import DEFAULT_ADJECTIVES, DEFAULT_TEMPLATES, GenerationConfig
from genq_core.inversion import TextualInversionConfig
from genq_core.pipeline import (
    CalibrationConfig,
    DataScarceConfig,
    EvaluationConfig,
    GeneratorConfig,
    GenQConfig,
)
from genq_core.quant import QuantConfig, ReconstructionConfig
from services.common import keys, spec
from services.common.jobs import JobKind, JobRecord
from services.common.jobstore import JobStore
from services.common.keys import BucketRole
from services.workers.checkpoints import dataset_is_complete
from services.workers.settings import WorkerSettings
from services.workers.storage import FileStorage, JobStorage, Storages

__all__ = [
    "API_EXTRAS",
    "BUILTIN_CLASSIFIERS",
    "BUILTIN_GENERATORS",
    "FASHION_CLASS_NAMES",
    "JobInputError",
    "Request",
    "ResolvedJob",
    "generation_fingerprint",
    "parse_request",
    "resolve_job",
]

logger = logging.getLogger(__name__)

Request = spec.GenqJobRequest | spec.GenerateJobRequest | spec.QuantizeJobRequest

API_EXTRAS: tuple[str, ...] = ("generation_fingerprint",)
"""Keys the API adds to a job's ``config`` next to the request; not part of the request."""

FASHION_CLASS_NAMES: tuple[str, ...] = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
"""Fashion-MNIST's classes as prompts and folder names use them (``examples/fashion_tiny.yaml``)."""

MODEL_FILES = ("model.safetensors", "model.pt2")
IMAGE_ARCHIVES = ("images.zip", "images.tar", "images.tar.gz")
_TINY_SAMPLE_SIZE = 32
# A hub id is owner/name, nothing that could read as a path on the worker.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TIMM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class JobInputError(ValueError):
    """The job's request cannot run as given: a bad field, an unknown model, a missing upload.

    Attributes:
        field: the dotted request field at fault (``model.name``).
        message: what is wrong with it.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class ResolvedJob:
    """A job ready to run.

    Attributes:
        job_id: the job.
        tenant: its tenant (uploads, datasets and dataset reuse are per tenant).
        kind: ``genq``, ``generate`` or ``quantize``.
        request: the validated request.
        config: the resolved pipeline configuration (echoed as ``config.json``).
        fingerprint: the generation fingerprint of ``genq`` and ``generate`` jobs (what decides
            their filtered synthetic set); ``None`` for ``quantize`` jobs.
        dataset_job_id: a ``quantize`` job's source of calibration images, an earlier job.
    """

    job_id: str
    tenant: str
    kind: JobKind
    request: Request
    config: GenQConfig
    fingerprint: str | None = None
    dataset_job_id: str | None = None

    @property
    def generates(self) -> bool:
        """Whether the job makes its own synthetic set (``genq``, ``generate``)."""
        return self.kind in (JobKind.GENQ, JobKind.GENERATE)


def parse_request(config: Mapping[str, Any]) -> Request:
    """The request in a job's ``config``, without the keys the API adds.

    Raises:
        JobInputError: the request is not valid (names the first bad field).
    """
    body = {key: value for key, value in config.items() if key not in API_EXTRAS}
    try:
        return TypeAdapter(spec.JobRequest).validate_python(body)
    except ValidationError as err:
        first = err.errors()[0]
        location = [str(part) for part in first["loc"]]
        if location and location[0] == str(body.get("kind")):
            location = location[1:]  # the union's tag, not a field
        raise JobInputError(".".join(location) or "config", first["msg"]) from None


def generation_fingerprint(request: Request, config: Mapping[str, Any]) -> str | None:
    """The fingerprint the API stored with the job, else computed the API's way.

    ``None`` for ``quantize`` jobs, which make no synthetic set.
    """
    if isinstance(request, spec.QuantizeJobRequest):
        return None
    stored = config.get("generation_fingerprint")
    if isinstance(stored, str) and stored:
        return stored
    return spec.generation_fingerprint(request)


def resolve_job(
    job: JobRecord, store: JobStore, storages: Storages, settings: WorkerSettings
) -> ResolvedJob:
    """Turn ``job.config`` into a :class:`ResolvedJob`, downloading the uploads it uses.

    Args:
        job: the job record (its ``config`` is the request).
        store: reads the job a ``quantize`` job takes its dataset from.
        storages: the buckets; uploads are read from ``UPLOADS``.
        settings: the device, the built-in assets and the model cache.

    Raises:
        JobInputError: an invalid request, an unknown built-in model, a missing or malformed
            upload, a dataset job that does not exist for this tenant or has no finished set.
    """
    # 1. the request
    request = parse_request(job.config)
    if request.kind != job.kind.value:
        raise JobInputError("kind", f"the request is a {request.kind!r} job, the job a {job.kind}")
    resolver = _Resolver(job.tenant, storages, settings)

    # 2. the classifier, and what the quantizer and evaluation do
    classifier = resolver.classifier(request.model)
    quant = None
    evaluation = EvaluationConfig()
    if isinstance(request, spec.GenqJobRequest | spec.QuantizeJobRequest):
        quant = _quant_config(request.quant, request.calibration)
        evaluation = resolver.evaluation(request.evaluation)

    # 3. where the calibration images come from
    dataset_job_id = None
    if isinstance(request, spec.QuantizeJobRequest):
        if request.calibration.dataset_job_id:
            dataset_job_id = request.calibration.dataset_job_id
            sections = _dataset_sections(dataset_job_id, job, store, storages, resolver)
        else:
            assert request.calibration.upload_id is not None  # checked by the request model
            folder = resolver.image_set(request.calibration.upload_id, "calibration.upload_id")
            sections = {"calibration": CalibrationConfig(source="real", real_dir=str(folder))}
    else:
        sections = resolver.generation_sections(request, build=True)

    # 4. the whole config, checked by genq_core
    config = _build(
        "config",
        lambda: GenQConfig(
            classifier=classifier,
            quant=quant,
            evaluation=evaluation,
            device=settings.device,
            **sections,
        ),
    )
    return ResolvedJob(
        job_id=job.id,
        tenant=job.tenant,
        kind=job.kind,
        request=request,
        config=config,
        fingerprint=generation_fingerprint(request, job.config),
        dataset_job_id=dataset_job_id,
    )


# ---------------------------------------------------------------------------------------------
# the parts of a request


class _Resolver:
    """Resolves the parts of one tenant's request against the registries, cache and uploads."""

    def __init__(self, tenant: str, storages: Storages, settings: WorkerSettings) -> None:
        self.tenant = tenant
        self.uploads = storages[BucketRole.UPLOADS]
        self.settings = settings

    def classifier(self, model: spec.ModelSpec) -> ClassifierConfig:
        preprocessing = _build(
            "model.preprocessing",
            lambda: PreprocessingOverrides(**model.preprocessing.model_dump()),
        )
        class_names = model.class_names
        if model.source == "builtin":
            assert model.name is not None
            return self._builtin_classifier(model, preprocessing)
        if model.source == "timm":
            assert model.name is not None
            if not _TIMM_NAME.match(model.name):
                raise JobInputError("model.name", f"{model.name!r} is not a timm model name")
            fields: dict[str, Any] = {"source": "timm", "name": model.name}
        else:
            assert model.upload_id is not None
            path = self.upload_file(model.upload_id, MODEL_FILES, "model.upload_id")
            if path.name == "model.pt2":
                if model.name is not None:
                    raise JobInputError(
                        "model.name",
                        "not used with a torch.export upload (the archive is the model)",
                    )
                fields = {"source": "export", "weights": path}
            else:
                if model.name is None or not _TIMM_NAME.match(model.name):
                    raise JobInputError(
                        "model.name",
                        "a safetensors upload needs the timm architecture it fits, e.g. resnet18",
                    )
                fields = {"source": "weights", "name": model.name, "weights": path}
        return _build(
            "model",
            lambda: ClassifierConfig(
                **fields,
                num_classes=model.num_classes,
                in_chans=model.in_chans,
                class_names=class_names,
                preprocessing=preprocessing,
            ),
        )

    def _builtin_classifier(
        self, model: spec.ModelSpec, preprocessing: PreprocessingOverrides
    ) -> ClassifierConfig:
        assert model.name is not None
        make = BUILTIN_CLASSIFIERS.get(model.name)
        if make is None:
            raise JobInputError(
                "model.name",
                f"unknown built-in model {model.name!r}; built-in models: "
                + ", ".join(sorted(BUILTIN_CLASSIFIERS)),
            )
        builtin = make(self.settings.assets_dir)
        if not Path(builtin.weights or "").is_file():
            raise JobInputError(
                "model.name", f"built-in model {model.name!r} is not installed on this worker"
            )
        expected = len(builtin.class_names or ())
        if model.num_classes is not None and model.num_classes != expected:
            raise JobInputError(
                "model.num_classes", f"built-in model {model.name!r} has {expected} classes"
            )
        channels = (builtin.preprocessing.input_size or (3, 0, 0))[0]
        if model.in_chans is not None and model.in_chans != channels:
            raise JobInputError(
                "model.in_chans", f"built-in model {model.name!r} takes {channels} channels"
            )
        # the request's preprocessing overrides the built-in's, field by field
        overrides = {
            name: value
            for name, value in dataclasses.asdict(preprocessing).items()
            if value is not None
        }
        return _build(
            "model",
            lambda: dataclasses.replace(
                builtin,
                class_names=model.class_names or builtin.class_names,
                preprocessing=dataclasses.replace(builtin.preprocessing, **overrides),
            ),
        )

    def generation_sections(
        self, request: spec.GenqJobRequest | spec.GenerateJobRequest, *, build: bool
    ) -> dict[str, Any]:
        """``generator``, ``generation``, ``filters``, ``calibration`` and ``data_scarce``.

        ``build=False`` names built-in generators without building them and leaves the k-shot
        upload alone (for echoing an earlier job's settings).
        """
        generation = request.generation
        sections: dict[str, Any] = {
            "generator": GeneratorConfig(
                source=self.generator(request.generator, build=build),
                dtype=request.generator.dtype,
            ),
            "generation": _build(
                "generation",
                lambda: GenerationConfig(
                    num_per_class=generation.num_per_class,
                    templates=generation.templates or DEFAULT_TEMPLATES,
                    adjectives=generation.adjectives or DEFAULT_ADJECTIVES,
                    seed=generation.seed,
                    guidance_scale=generation.guidance_scale,
                    steps=generation.steps,
                    scheduler=generation.scheduler,
                    resolution=generation.resolution,
                    negative_prompt=generation.negative_prompt,
                    batch_size=generation.batch_size,
                ),
            ),
            "filters": _build(
                "filters",
                lambda: FilterConfig(
                    order=request.filters.order,
                    energy_keep=request.filters.energy_keep,
                    distribution_keep=request.filters.distribution_keep,
                    temperature=request.filters.temperature,
                    label_agreement=request.filters.label_agreement,
                ),
            ),
            "calibration": CalibrationConfig(source="genq"),
        }
        scarce = request.data_scarce
        if scarce is not None and build:
            folder = self.image_set(scarce.kshot_upload_id, "data_scarce.kshot_upload_id")
            sections["data_scarce"] = _build(
                "data_scarce",
                lambda: DataScarceConfig(
                    kshot_dir=str(folder),
                    inversion=TextualInversionConfig(
                        steps=scarce.steps, lr=scarce.lr, seed=scarce.seed
                    ),
                    calibrate_with_kshot=scarce.calibrate_with_kshot,
                    kshot_share=scarce.kshot_share,
                ),
            )
        return sections

    def generator(self, generator: spec.GeneratorSpec, *, build: bool) -> str:
        if generator.source == "hub":
            name = generator.name
            if not _HUB_ID.match(name) or ".." in name or Path(name).exists():
                raise JobInputError(
                    "generator.name", f"{name!r} is not a hub id of the form owner/name"
                )
            return name
        make = BUILTIN_GENERATORS.get(generator.name)
        if make is None:
            raise JobInputError(
                "generator.name",
                f"unknown built-in generator {generator.name!r}; built-in generators: "
                + ", ".join(sorted(BUILTIN_GENERATORS)),
            )
        folder = make(self.settings, build)
        if build and not (folder / "model_index.json").is_file():
            raise JobInputError(
                "generator.name",
                f"built-in generator {generator.name!r} is not installed on this worker",
            )
        return str(folder)

    def evaluation(self, evaluation: spec.EvaluationSpec) -> EvaluationConfig:
        eval_dir = None
        if evaluation.eval_upload_id is not None:
            eval_dir = str(self.image_set(evaluation.eval_upload_id, "evaluation.eval_upload_id"))
        return _build(
            "evaluation",
            lambda: EvaluationConfig(
                eval_dir=eval_dir, holdout_fraction=evaluation.holdout_fraction
            ),
        )

    # -- uploads ------------------------------------------------------------------------------

    def upload_file(self, upload_id: str, names: tuple[str, ...], field: str) -> Path:
        """The first of ``names`` the upload holds, downloaded into the cache."""
        prefix = keys.upload_prefix(self.tenant, upload_id)
        folder = self._cache_folder(upload_id)
        for name in names:
            cached = folder / name
            if cached.is_file():
                return cached
        present = set(self.uploads.list(f"{prefix}/"))
        for name in names:
            if f"{prefix}/{name}" in present:
                with _staged(folder) as staging:
                    _download(self.uploads, f"{prefix}/{name}", staging / name)
                return folder / name
        if not present:
            raise JobInputError(field, f"no upload {upload_id!r}")
        raise JobInputError(
            field, f"upload {upload_id!r} holds none of {', '.join(names)} (what this field takes)"
        )

    def image_set(self, upload_id: str, field: str) -> Path:
        """The upload's image archive, unpacked into the cache; returns the unpacked folder."""
        folder = self._cache_folder(upload_id) / "images"
        if folder.is_dir():
            return folder
        archive = self.upload_file(upload_id, IMAGE_ARCHIVES, field)
        with _staged(folder) as staging:
            _unpack(archive, staging, self.settings, field)
        return folder

    def _cache_folder(self, upload_id: str) -> Path:
        # upload_prefix checks both names (no '/', '.', '..'), so this stays inside the cache
        return self.settings.model_cache_dir / keys.upload_prefix(self.tenant, upload_id)


def _quant_config(quant: spec.QuantSpec, calibration: spec.CalibrationSpec) -> QuantConfig:
    return _build(
        "quant",
        lambda: QuantConfig(
            weight_bits=quant.weight_bits,
            act_bits=quant.act_bits,
            first_last_bits=quant.first_last_bits,
            preset=quant.preset,
            seed=quant.seed,
            max_calibration_images=calibration.num_images,
            reconstruction=ReconstructionConfig(iters=quant.iters),
            bn_align_iters=quant.bn_align_iters,
        ),
    )


def _dataset_sections(
    dataset_job_id: str, job: JobRecord, store: JobStore, storages: Storages, resolver: _Resolver
) -> dict[str, Any]:
    """The generation settings of the earlier job whose synthetic set a quantize job uses."""
    field = "calibration.dataset_job_id"
    source = store.get(dataset_job_id, tenant=job.tenant)
    if source is None:
        raise JobInputError(field, f"no job {dataset_job_id!r}")
    if source.kind not in (JobKind.GENQ, JobKind.GENERATE):
        raise JobInputError(
            field, f"job {dataset_job_id} is a {source.kind} job, without a dataset"
        )
    if not dataset_is_complete(JobStorage(dataset_job_id, storages)):
        raise JobInputError(
            field, f"job {dataset_job_id} ({source.status}) has no finished synthetic dataset"
        )
    request = parse_request(source.config)
    assert isinstance(request, spec.GenqJobRequest | spec.GenerateJobRequest)
    return resolver.generation_sections(request, build=False)


def _build(field: str, make: Callable[[], Any]) -> Any:
    """``make()``, its ``ValueError`` turned into a :class:`JobInputError` about ``field``."""
    try:
        return make()
    except JobInputError:
        raise
    except (ValueError, TypeError) as err:
        raise JobInputError(field, str(err)) from err


# ---------------------------------------------------------------------------------------------
# downloads and archives


@contextmanager
def _staged(target: Path) -> Iterator[Path]:
    """A fresh folder next to ``target`` that becomes ``target`` (merged into it) on success.

    Several workers of one node may fetch the same upload at once: each fills its own staging
    folder and moves its files in with ``os.replace``, so readers never see a partial file.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        if not target.exists():
            try:
                os.rename(staging, target)
                return
            except OSError:
                pass  # another worker got there first
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                destination = target / path.relative_to(staging)
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _download(uploads: Any, key: str, path: Path) -> None:
    if isinstance(uploads, FileStorage):
        uploads.get_file(key, path)
    else:
        path.write_bytes(uploads.get_bytes(key))


def _unpack(archive: Path, folder: Path, settings: WorkerSettings, field: str) -> None:
    """Unpack a zip or tar of images into ``folder``, refusing anything unsafe (names ``field``)."""
    limit_bytes, limit_files = settings.max_unpacked_bytes, settings.max_unpacked_files
    written = files = 0
    try:
        if archive.suffix == ".zip":
            with zipfile.ZipFile(archive) as zipped:
                for info in zipped.infolist():
                    if info.is_dir():
                        continue
                    mode = info.external_attr >> 16
                    if stat.S_ISLNK(mode):
                        raise JobInputError(field, f"{info.filename!r}: links are not allowed")
                    name = _member_path(info.filename, field)
                    if name is None:
                        continue
                    files += 1
                    if files > limit_files:
                        raise JobInputError(field, f"more than {limit_files} files")
                    with zipped.open(info) as source:
                        written = _copy_bounded(source, folder / name, written, limit_bytes, field)
        else:
            with tarfile.open(archive) as tarred:
                for member in tarred:
                    if member.isdir():
                        continue
                    if not member.isfile():
                        raise JobInputError(
                            field, f"{member.name!r}: only files and folders are allowed"
                        )
                    name = _member_path(member.name, field)
                    if name is None:
                        continue
                    files += 1
                    if files > limit_files:
                        raise JobInputError(field, f"more than {limit_files} files")
                    member_file = tarred.extractfile(member)
                    assert member_file is not None  # a regular file
                    with member_file:
                        written = _copy_bounded(
                            member_file, folder / name, written, limit_bytes, field
                        )
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as err:
        raise JobInputError(field, f"{archive.name} is not a readable archive: {err}") from err
    if files == 0:
        raise JobInputError(field, f"{archive.name} holds no files")


def _member_path(name: str, field: str) -> PurePosixPath | None:
    """A safe relative path for an archive member, or ``None`` for macOS metadata."""
    path = PurePosixPath(name)
    if "\\" in name or path.is_absolute() or any(part in ("", "..") for part in path.parts):
        raise JobInputError(field, f"archive member {name!r} is not a plain relative path")
    parts = [part for part in path.parts if part != "."]
    if not parts:
        raise JobInputError(field, f"archive member {name!r} is not a plain relative path")
    if parts[0] == "__MACOSX" or parts[-1].startswith("._"):
        return None  # resource forks macOS adds to zips: never user data
    return PurePosixPath(*parts)


def _copy_bounded(source: Any, path: Path, written: int, limit: int, field: str) -> int:
    """Copy ``source`` to ``path``, counting real bytes (declared sizes can lie)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        while chunk := source.read(1024 * 1024):
            written += len(chunk)
            if written > limit:
                raise JobInputError(field, f"the archive unpacks to more than {limit} bytes")
            out.write(chunk)
    return written


# ---------------------------------------------------------------------------------------------
# registries: built-in models of this deployment (name -> builder), registrations last


def _fashion_bn_cnn(assets: Path) -> ClassifierConfig:
    """The benchmark's 4-conv BatchNorm CNN (the one ``examples/fashion_tiny.yaml`` uses)."""
    return ClassifierConfig(
        source="builder",
        name="genq_core.bench.classifiers:BNConvNet",
        weights=assets / "bn_cnn_fmnist.safetensors",
        class_names=FASHION_CLASS_NAMES,
        preprocessing=PreprocessingOverrides(input_size=(1, 28, 28), mean=(0.286,), std=(0.353,)),
    )


def _from_classifiers_json(entry: str) -> Callable[[Path], ClassifierConfig]:
    """A benchmark classifier described in ``{assets}/classifiers.json`` (builder, weights)."""

    def make(assets: Path) -> ClassifierConfig:
        listing = assets / "classifiers.json"
        if not listing.is_file():
            return _missing(assets)
        model = json.loads(listing.read_text())["models"][entry]
        prep = model["preprocessing"]
        return ClassifierConfig(
            source="builder",
            name=model["builder"],
            weights=assets / model["weights"],
            class_names=FASHION_CLASS_NAMES,
            preprocessing=PreprocessingOverrides(
                input_size=tuple(prep["input_size"]),
                mean=tuple(prep["mean"]),
                std=tuple(prep["std"]),
            ),
        )

    return make


def _missing(assets: Path) -> ClassifierConfig:
    # A config whose weights file does not exist: the caller reports "not installed".
    return ClassifierConfig(
        source="builder",
        name="genq_core.bench.classifiers:BNConvNet",
        weights=assets / "missing.safetensors",
        class_names=FASHION_CLASS_NAMES,
    )


def _fashion_sd(settings: WorkerSettings, build: bool) -> Path:
    """The benchmark's small Stable Diffusion trained on Fashion-MNIST (shipped in the assets)."""
    return settings.assets_dir / "fashion-sd"


def _tiny_sd(settings: WorkerSettings, build: bool) -> Path:
    """A random tiny Stable Diffusion (32 px textures): every code path, in seconds, for tests and
    smoke runs. Built once per cache folder with a fixed seed, so every worker builds the same."""
    folder = settings.model_cache_dir / "builtin" / "tiny-sd"
    if build and not (folder / "model_index.json").is_file():
        from genq_core.generate.tiny import build_tiny_pipeline

        logger.info("building the tiny generator in %s", folder)
        with _staged(folder) as staging:
            build_tiny_pipeline(sample_size=_TINY_SAMPLE_SIZE, seed=0).save_pretrained(staging)
    return folder


BUILTIN_CLASSIFIERS: dict[str, Callable[[Path], ClassifierConfig]] = {
    "fashion-bn-cnn": _fashion_bn_cnn,
    "fashion-resnet": _from_classifiers_json("resnet"),
    "fashion-resnet-shifted": _from_classifiers_json("resnet_shifted"),
    "fashion-vit": _from_classifiers_json("vit"),
}
"""Built-in classifiers: name -> its config given the assets folder."""

BUILTIN_GENERATORS: dict[str, Callable[[WorkerSettings, bool], Path]] = {
    "fashion-sd": _fashion_sd,
    "tiny": _tiny_sd,
}
"""Built-in generators: name -> its ``save_pretrained`` folder (built on demand when asked)."""
