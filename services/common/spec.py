"""What a user may ask a job to do: the typed request bodies of ``POST /v1/jobs``.

Three kinds share one set of parts:

- ``genq``: generate -> filter -> quantize -> evaluate (the product's main job);
- ``generate``: the filtered synthetic dataset only;
- ``quantize``: quantize on a given calibration set (an earlier job's dataset or an upload).

The parts mirror ``genq_core.pipeline.GenQConfig`` section by section, with one difference:
a request never names a file on the server. Models, k-shot images and calibration or
evaluation sets come in as *uploads* (ids returned by the upload endpoints) or as an earlier
job's dataset; models may also be named from a hub (``timm``, resolved on the worker nodes,
which have hub access) or from the deployment's built-in registry. The worker turns a request
into a ``GenQConfig`` (``services.workers``); this module imports no torch, so the API can
validate bodies without it.

Every model forbids unknown fields, so a typo is a 422 naming the field. Bounds that belong to
the product (bits 2..8, keep ratios in (0, 1]) are checked here; bounds that belong to a
deployment (images per job, steps, resolution, bits) come from its settings through
:func:`check_limits`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "CalibrationSpec",
    "DataScarceSpec",
    "EvaluationSpec",
    "FilterSpec",
    "GenerateJobRequest",
    "GenerationSpec",
    "GeneratorSpec",
    "GenqJobRequest",
    "JobRequest",
    "LimitExceeded",
    "Limits",
    "ModelSpec",
    "PreprocessingSpec",
    "QuantSpec",
    "QuantizeJobRequest",
    "check_limits",
    "generation_fingerprint",
    "request_hash",
]

# Mirrors of genq_core's registries (this module may not import genq_core's torch code);
# tests/services/common/test_spec.py checks that they match.
SCHEDULERS = ("default", "ddim", "dpm", "euler", "pndm")
PRESETS = ("minmax", "percentile", "mse", "adaround", "brecq", "qdrop")
FILTERS = ("energy", "distribution")

_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_NAME_PATTERN = r"^[A-Za-z0-9_./:@+-]{1,200}$"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PreprocessingSpec(_Spec):
    """Overrides of the classifier's own preprocessing (timm data config otherwise)."""

    input_size: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None
    crop_pct: float | None = Field(default=None, gt=0.0, le=1.0)

    @field_validator("input_size")
    @classmethod
    def _positive_size(cls, value: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if value is not None and (value[0] not in (1, 3) or min(value[1:]) < 8):
            raise ValueError("input_size must be [channels (1 or 3), height >= 8, width >= 8]")
        return value

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is not None and any(v <= 0 for v in value):
            raise ValueError("std values must be > 0")
        return value


class ModelSpec(_Spec):
    """The full-precision classifier.

    Attributes:
        source: ``timm``: a timm model ``name`` with its pretrained weights (downloaded on the
            worker node); ``upload``: an uploaded model, either safetensors weights for the timm
            architecture ``name`` or a ``torch.export`` archive (``name`` unset) - never a
            pickle; ``builtin``: a model of the deployment's registry (``name``).
        name: see ``source``.
        upload_id: the upload holding the model (``source="upload"`` only).
        num_classes, in_chans: passed to timm architectures.
        class_names: one per output; the prompts use them. ``None``: ImageNet's for a
            1000-class model, or the built-in model's own.
        preprocessing: overrides of the model's preprocessing.
    """

    source: Literal["timm", "upload", "builtin"]
    name: str | None = Field(default=None, pattern=_NAME_PATTERN)
    upload_id: str | None = Field(default=None, pattern=_ID_PATTERN)
    num_classes: int | None = Field(default=None, ge=2, le=100_000)
    in_chans: Literal[1, 3] | None = None
    class_names: tuple[Annotated[str, Field(min_length=1, max_length=100)], ...] | None = None
    preprocessing: PreprocessingSpec = Field(default_factory=PreprocessingSpec)

    @model_validator(mode="after")
    def _source_fields(self) -> ModelSpec:
        if self.source in ("timm", "builtin") and not self.name:
            raise ValueError(f"name is required with source={self.source!r}")
        if self.source == "upload" and not self.upload_id:
            raise ValueError("upload_id is required with source='upload'")
        if self.source != "upload" and self.upload_id:
            raise ValueError("upload_id is only allowed with source='upload'")
        if self.class_names is not None:
            if len(set(self.class_names)) != len(self.class_names):
                raise ValueError("class_names has duplicates")
            if self.num_classes is not None and self.num_classes != len(self.class_names):
                raise ValueError(
                    f"num_classes={self.num_classes} but {len(self.class_names)} class_names"
                )
        return self


class GeneratorSpec(_Spec):
    """The text-to-image pipeline: a diffusers hub id or a built-in one (``fashion-sd``)."""

    source: Literal["hub", "builtin"] = "hub"
    name: str = Field(default="stabilityai/stable-diffusion-2-1-base", pattern=_NAME_PATTERN)
    dtype: Literal["auto", "float16", "float32"] = "auto"


class GenerationSpec(_Spec):
    """Prompts and sampling (``genq_core.generate.GenerationConfig``)."""

    num_per_class: int = Field(default=64, ge=1)
    templates: tuple[Annotated[str, Field(min_length=1, max_length=200)], ...] | None = None
    adjectives: tuple[Annotated[str, Field(min_length=1, max_length=50)], ...] | None = None
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    guidance_scale: float = Field(default=3.5, ge=0.0, le=30.0)
    steps: int = Field(default=25, ge=1)
    scheduler: Literal["default", "ddim", "dpm", "euler", "pndm"] = "ddim"
    resolution: int | None = Field(default=None, ge=8)
    negative_prompt: str | None = Field(default=None, max_length=500)
    batch_size: int = Field(default=8, ge=1, le=256)

    @field_validator("templates")
    @classmethod
    def _templates_name_the_class(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None:
            if not value:
                raise ValueError("templates must not be empty")
            missing = [t for t in value if "{cls}" not in t]
            if missing:
                raise ValueError(f"every template needs {{cls}}; these do not: {missing}")
        return value

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError("resolution must be a multiple of 8")
        return value


class FilterSpec(_Spec):
    """The filters (``genq_core.filters.FilterConfig``): order and per-class keep ratios."""

    order: tuple[Literal["energy", "distribution"], ...] = ("energy", "distribution")
    energy_keep: float = Field(default=0.5, gt=0.0, le=1.0)
    distribution_keep: float = Field(default=0.8, gt=0.0, le=1.0)
    temperature: float = Field(default=1.0, gt=0.0, le=100.0)
    label_agreement: bool = False

    @field_validator("order")
    @classmethod
    def _no_repeats(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("order has duplicates")
        return value


class DataScarceSpec(_Spec):
    """Textual inversion on k real images per class (an upload of a folder per class).

    ``calibrate_with_kshot``: the k real images also go into the quantizer's calibration set,
    ahead of the generated ones; ``kshot_share``: the share of that set they fill at least,
    repeated (``None``: each once; ``genq_core.pipeline.DataScarceConfig``).
    """

    kshot_upload_id: str = Field(pattern=_ID_PATTERN)
    steps: int = Field(default=500, ge=1)
    lr: float = Field(default=5e-3, gt=0.0, le=1.0)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    calibrate_with_kshot: bool = True
    kshot_share: float | None = Field(default=0.5, gt=0.0, lt=1.0)


class CalibrationSpec(_Spec):
    """Where the calibration images come from and how many are used.

    Attributes:
        num_images: images given to the quantizer.
        dataset_job_id: the synthetic dataset of an earlier ``genq`` or ``generate`` job of the
            same tenant (``quantize`` jobs).
        upload_id: an uploaded calibration set (``quantize`` jobs).
    """

    num_images: int = Field(default=1024, ge=1)
    dataset_job_id: str | None = Field(default=None, pattern=_ID_PATTERN)
    upload_id: str | None = Field(default=None, pattern=_ID_PATTERN)

    @model_validator(mode="after")
    def _one_dataset(self) -> CalibrationSpec:
        if self.dataset_job_id and self.upload_id:
            raise ValueError("give dataset_job_id or upload_id, not both")
        return self


class QuantSpec(_Spec):
    """Bits and method (``genq_core.quant.QuantConfig``)."""

    weight_bits: int = Field(default=4, ge=2, le=8)
    act_bits: int = Field(default=4, ge=2, le=8)
    first_last_bits: int = Field(default=8, ge=2, le=8)
    preset: Literal["minmax", "percentile", "mse", "adaround", "brecq", "qdrop"] = "qdrop"
    iters: int = Field(default=2000, ge=1)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    bn_align_iters: int = Field(
        default=0,
        ge=0,
        le=10_000,
        description="steps that pull the calibration images towards the model's BatchNorm "
        "statistics before quantizing (0: off; BatchNorm models only)",
    )


class EvaluationSpec(_Spec):
    """A labelled evaluation set (an upload) or agreement on held-out synthetic images."""

    eval_upload_id: str | None = Field(default=None, pattern=_ID_PATTERN)
    holdout_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)


class GenqJobRequest(_Spec):
    kind: Literal["genq"]
    model: ModelSpec
    generator: GeneratorSpec = Field(default_factory=GeneratorSpec)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    filters: FilterSpec = Field(default_factory=FilterSpec)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    data_scarce: DataScarceSpec | None = None
    quant: QuantSpec = Field(default_factory=QuantSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)

    @model_validator(mode="after")
    def _generated_calibration(self) -> GenqJobRequest:
        if self.calibration.dataset_job_id or self.calibration.upload_id:
            raise ValueError(
                "a genq job generates its calibration set; use kind='quantize' to quantize on "
                "an existing dataset"
            )
        return self


class GenerateJobRequest(_Spec):
    kind: Literal["generate"]
    model: ModelSpec
    generator: GeneratorSpec = Field(default_factory=GeneratorSpec)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    filters: FilterSpec = Field(default_factory=FilterSpec)
    data_scarce: DataScarceSpec | None = None


class QuantizeJobRequest(_Spec):
    kind: Literal["quantize"]
    model: ModelSpec
    calibration: CalibrationSpec
    quant: QuantSpec = Field(default_factory=QuantSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)

    @model_validator(mode="after")
    def _given_dataset(self) -> QuantizeJobRequest:
        if not (self.calibration.dataset_job_id or self.calibration.upload_id):
            raise ValueError("a quantize job needs calibration.dataset_job_id or .upload_id")
        return self


JobRequest = Annotated[
    GenqJobRequest | GenerateJobRequest | QuantizeJobRequest, Field(discriminator="kind")
]
"""The body of ``POST /v1/jobs``; ``kind`` picks the model."""


@dataclass(frozen=True)
class Limits:
    """A deployment's bounds on one job (from the API's settings)."""

    max_images_per_job: int = 100_000
    max_calibration_images: int = 8192
    max_generation_steps: int = 100
    max_resolution: int = 1024
    max_iters: int = 20_000
    max_inversion_steps: int = 5000
    min_bits: int = 2
    max_bits: int = 8


class LimitExceeded(ValueError):
    """A request is valid but beyond this deployment's limits; ``field`` is its dotted path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def check_limits(
    request: GenqJobRequest | GenerateJobRequest | QuantizeJobRequest, limits: Limits
) -> None:
    """Raise :class:`LimitExceeded` for the first value beyond ``limits``.

    The number of generated images is ``num_per_class`` times the number of classes; when the
    class count is not known here (a hub model without ``class_names``), ``num_per_class`` alone
    is checked against the limit and the worker checks the product.
    """
    generation = getattr(request, "generation", None)
    if generation is not None:
        classes = len(request.model.class_names or ()) or request.model.num_classes or 1
        total = generation.num_per_class * classes
        if total > limits.max_images_per_job:
            raise LimitExceeded(
                "generation.num_per_class",
                f"{generation.num_per_class} per class x {classes} classes = {total} images, "
                f"more than this service's limit of {limits.max_images_per_job} per job",
            )
        _at_most("generation.steps", generation.steps, limits.max_generation_steps)
        if generation.resolution is not None:
            _at_most("generation.resolution", generation.resolution, limits.max_resolution)
    calibration = getattr(request, "calibration", None)
    if calibration is not None:
        _at_most("calibration.num_images", calibration.num_images, limits.max_calibration_images)
    data_scarce = getattr(request, "data_scarce", None)
    if data_scarce is not None:
        _at_most("data_scarce.steps", data_scarce.steps, limits.max_inversion_steps)
    quant = getattr(request, "quant", None)
    if quant is not None:
        _at_most("quant.iters", quant.iters, limits.max_iters)
        for name in ("weight_bits", "act_bits", "first_last_bits"):
            bits = getattr(quant, name)
            if not limits.min_bits <= bits <= limits.max_bits:
                raise LimitExceeded(
                    f"quant.{name}",
                    f"{bits} bits is outside this service's range "
                    f"{limits.min_bits}..{limits.max_bits}",
                )


def request_hash(request: BaseModel) -> str:
    """sha256 of the request with every default filled in: same hash = same job (idempotency)."""
    return _digest(request.model_dump(mode="json"))


def generation_fingerprint(request: GenqJobRequest | GenerateJobRequest) -> str:
    """sha256 of everything that decides the filtered synthetic dataset.

    Two jobs with the same fingerprint make the same images and keep the same ones, so the later
    one reuses the earlier dataset instead of generating. The classifier is part of it (the
    filters score with it, and its class names and preprocessing shape the images).
    """
    parts: dict[str, Any] = {
        "model": request.model.model_dump(mode="json"),
        "generator": request.generator.model_dump(mode="json"),
        "generation": request.generation.model_dump(mode="json"),
        "filters": request.filters.model_dump(mode="json"),
        "data_scarce": (
            # these change the quantizer's set, not the synthetic dataset
            request.data_scarce.model_dump(
                mode="json", exclude={"calibrate_with_kshot", "kshot_share"}
            )
            if request.data_scarce
            else None
        ),
    }
    return _digest(parts)


def _at_most(field: str, value: int, limit: int) -> None:
    if value > limit:
        raise LimitExceeded(field, f"{value} is more than this service's limit of {limit}")


def _digest(data: Any) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()
