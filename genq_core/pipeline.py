"""The GenQ pipeline: generate calibration images, filter them, quantize, evaluate, write it all.

``run_genq(config, output)`` runs the steps below in order, each reporting progress and polling
for cancellation. The calibration source decides steps 3-5:

* ``genq``: images from the diffusion model, then the filters (energy, then distribution);
* ``generated``: images from the diffusion model, unfiltered;
* ``real``: a labelled folder (one sub-folder per class) or an unlabelled folder of images;
* ``noise``: Gaussian noise in the classifier's normalised input space;
* ``inversion``: model inversion of the BatchNorm statistics (ZeroQ / Genie style).

With ``data_scarce`` set, a style token is first learned from a few real images per class
(textual inversion) and every prompt uses it. Outputs, all under the output storage:

* ``synthetic/images/CCCC/NNNNNN.png`` and ``synthetic/manifest.jsonl`` (prompt, seed, filter
  scores, kept or dropped per image) for generated sources;
* ``calibration/images.safetensors`` (the preprocessed calibration tensor) for the other sources;
* ``tokens/tokens.safetensors`` (learned token embeddings) in the data-scarce mode;
* ``model/model.safetensors`` and ``model/encodings.json`` (the quantized model);
* ``report.json``, ``report.md`` and ``config.json`` (the resolved config and versions);
* ``artifacts.json``: every artifact above with its size and sha256.

Each step is also a public function (:func:`load_models`, :func:`learn_style`,
:func:`make_calibration`, :func:`select_calibration`, :func:`split_holdout`,
:func:`evaluate_quantized`, :func:`write_quantized`, :func:`build_report`, :func:`write_reports`),
so that the job service runs the same steps one at a time, with a checkpoint after each, and
writes the same outputs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from safetensors.torch import save as save_tensors

import genq_core
from genq_core.baselines import ModelInversionConfig, gaussian_noise, model_inversion
from genq_core.classifier import Builder, ClassifierConfig, LoadedClassifier, load
from genq_core.configio import load_config, to_dict
from genq_core.data import load_image_folder, load_labelled_image_folder, repeat_in_turn
from genq_core.evaluate import accuracy, agreement, model_size
from genq_core.filters import FilterConfig, FilterReport, apply_filters
from genq_core.generate import (
    GenerationConfig,
    ImageSpec,
    build_specs,
    generate_images,
    load_generator,
    load_images,
)
from genq_core.inversion import (
    TextualInversionConfig,
    apply_tokens,
    class_tokens,
    learn_tokens,
    load_kshot_folder,
    save_tokens,
)
from genq_core.manifest import ManifestRecord, write_manifest
from genq_core.progress import ProgressFn, StopFn, check_stop
from genq_core.quant import QuantConfig, quantize_model
from genq_core.quant.export import save_quantized
from genq_core.storage import LocalStorage, Storage

__all__ = [
    "ARTIFACTS_KEY",
    "CALIBRATION_KEY",
    "GENERATED_SOURCES",
    "MANIFEST_KEY",
    "MODEL_PREFIX",
    "SYNTHETIC_PREFIX",
    "TOKENS_KEY",
    "CalibrationConfig",
    "DataScarceConfig",
    "EvaluationConfig",
    "GenQConfig",
    "GenQResult",
    "GeneratorConfig",
    "Selection",
    "SourceImages",
    "build_report",
    "calibration_summary",
    "content_type",
    "describe_artifact",
    "evaluate_quantized",
    "filter_summary",
    "generated_source",
    "generation_specs",
    "json_bytes",
    "learn_style",
    "load_generator_for",
    "load_genq_config",
    "load_models",
    "make_calibration",
    "markdown_report",
    "put_artifact",
    "quantizer_calibration",
    "run_genq",
    "select_calibration",
    "source_summary",
    "split_holdout",
    "versions",
    "write_quantized",
    "write_reports",
]

logger = logging.getLogger(__name__)

CalibrationSource = Literal["genq", "generated", "real", "noise", "inversion"]
GENERATED_SOURCES = ("genq", "generated")
SYNTHETIC_PREFIX = "synthetic"
MANIFEST_KEY = f"{SYNTHETIC_PREFIX}/manifest.jsonl"
TOKENS_KEY = "tokens/tokens.safetensors"
CALIBRATION_KEY = "calibration/images.safetensors"
MODEL_PREFIX = "model"
ARTIFACTS_KEY = "artifacts.json"


@dataclass(frozen=True)
class GeneratorConfig:
    """The text-to-image model.

    Attributes:
        source: a hub id (``stabilityai/sd-turbo``) or a local ``save_pretrained`` folder.
        dtype: ``auto`` is float16 on CUDA and float32 on the CPU.
    """

    source: str | None = None
    dtype: Literal["auto", "float16", "float32"] = "auto"


@dataclass(frozen=True)
class DataScarceConfig:
    """The data-scarce mode: a few real images per class steer generation.

    Attributes:
        kshot_dir: a folder with one sub-folder of real images per class (sub-folder names are
            class names of the classifier).
        inversion: textual inversion settings.
        calibrate_with_kshot: also put the k-shot images in the quantizer's calibration set
            (first, ahead of the generated ones). See BENCHMARKS.md, data-scarce sections, for
            what it was worth on the reference benchmark.
        kshot_share: with ``calibrate_with_kshot``, the share of the quantizer's calibration set
            the k-shot images fill at least, repeated class by class in turn as often as that
            takes (more k-shot images than that share are each used once); ``None``: each k-shot
            image once. On the reference benchmark's full-size data-scarce block (k = 5, 50 of
            1024 images), 0.5 beat ``None`` at W2A4 and W2A3, and 0.25 and 0.75 did as well
            within seed noise (BENCHMARKS.md, "the k images filling a share of the set").
    """

    kshot_dir: str
    inversion: TextualInversionConfig = field(default_factory=TextualInversionConfig)
    calibrate_with_kshot: bool = True
    kshot_share: float | None = 0.5

    def __post_init__(self) -> None:
        if not self.kshot_dir.strip():
            raise ValueError("kshot_dir: must not be empty")
        share = self.kshot_share
        if share is not None and not (isinstance(share, int | float) and 0 < share < 1):
            raise ValueError(f"kshot_share: must be in (0, 1) or null, got {share!r}")


@dataclass(frozen=True)
class CalibrationConfig:
    """Where the calibration images come from (see the module docstring).

    Attributes:
        source: ``genq``, ``generated``, ``real``, ``noise`` or ``inversion``.
        real_dir: the image folder of the ``real`` source.
        num_images: images made by the ``noise`` and ``inversion`` sources (generated sources
            make ``generation.num_per_class`` per class; the quantizer uses at most
            ``quant.max_calibration_images``).
        noise_std: standard deviation of the ``noise`` source in normalised input space.
        model_inversion: settings of the ``inversion`` source.
    """

    source: CalibrationSource = "genq"
    real_dir: str | None = None
    num_images: int = 1024
    noise_std: float = 1.0
    model_inversion: ModelInversionConfig = field(default_factory=ModelInversionConfig)

    def __post_init__(self) -> None:
        if self.source not in ("genq", "generated", "real", "noise", "inversion"):
            raise ValueError(
                f"source: must be genq, generated, real, noise or inversion, got {self.source!r}"
            )
        if self.source == "real" and not self.real_dir:
            raise ValueError("real_dir: the 'real' source needs a folder of images")
        if self.num_images < 1:
            raise ValueError(f"num_images: must be >= 1, got {self.num_images}")
        if self.noise_std <= 0:
            raise ValueError(f"noise_std: must be > 0, got {self.noise_std}")


@dataclass(frozen=True)
class EvaluationConfig:
    """How the quantized model is judged.

    Attributes:
        eval_dir: a labelled folder (one sub-folder per class, named like the classifier's
            classes): top-1/top-5 of the float and quantized models on it.
        holdout_fraction: without ``eval_dir``, this fraction of the calibration images (per
            class where labels exist) is held out of calibration and the quantized model's
            agreement with the float model is measured on it.
        batch_size: images per forward pass.
    """

    eval_dir: str | None = None
    holdout_fraction: float = 0.1
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction: must be in [0, 1), got {self.holdout_fraction}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class GenQConfig:
    """Everything one GenQ run needs; loads from YAML/JSON with :func:`load_genq_config`.

    Attributes:
        classifier: the float classifier.
        generator: the diffusion model (generated sources and the data-scarce mode).
        generation: prompts, seeds, guidance, steps, resolution, batch size.
        filters: the filters of the ``genq`` source.
        calibration: where the calibration images come from.
        data_scarce: the data-scarce mode, off when ``None``.
        quant: bit widths and method; ``None`` stops after the calibration set (a dataset job).
        evaluation: how the quantized model is judged.
        device: ``cpu``, ``cuda``, ``cuda:1``.
    """

    classifier: ClassifierConfig
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    data_scarce: DataScarceConfig | None = None
    quant: QuantConfig | None = field(default_factory=QuantConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    device: str = "cpu"

    def __post_init__(self) -> None:
        needs_generator = (
            self.calibration.source in GENERATED_SOURCES or self.data_scarce is not None
        )
        if needs_generator and not self.generator.source:
            raise ValueError(
                f"generator.source: calibration source {self.calibration.source!r}"
                + (" with data_scarce" if self.data_scarce is not None else "")
                + " needs a diffusion model (a hub id or a local folder)"
            )
        if self.data_scarce is not None and self.calibration.source not in GENERATED_SOURCES:
            raise ValueError(
                "data_scarce: only applies to generated sources (calibration.source genq or "
                f"generated), not {self.calibration.source!r}"
            )
        try:
            torch.device(self.device)
        except RuntimeError as err:
            raise ValueError(f"device: {err}") from err


@dataclass
class GenQResult:
    """What :func:`run_genq` made.

    Attributes:
        report: the JSON report (also written as ``report.json``).
        artifacts: ``{name, key, size, sha256, content_type}`` of every artifact written.
        quantized: the quantized model (``None`` when ``quant`` is ``None``).
        calibration: the calibration images the quantizer used (``[N, C, H, W]``, CPU).
    """

    report: dict[str, Any]
    artifacts: list[dict[str, Any]]
    quantized: torch.nn.Module | None
    calibration: torch.Tensor


@dataclass
class SourceImages:
    """Calibration images of one source (step 4), with labels and manifest records when it has them.

    Attributes:
        images: ``[N, C, H, W]`` in the classifier's normalised input space, CPU.
        labels: ``[N]`` class indexes, ``None`` for unlabelled sources (noise, a flat folder).
        records: one manifest record per image for generated sources, else empty.
        seconds: how long making them took.
        made: how many images the source made.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    records: list[ManifestRecord]
    seconds: float
    made: int


@dataclass
class Selection:
    """The calibration set that step 5 kept of a source.

    Attributes:
        images: the kept images, ``[K, C, H, W]``.
        labels: their labels (``None`` for unlabelled sources).
        keep: bool ``[N]`` over the source's images.
        filter_report: what the filters did (``genq`` source only).
        seconds: how long the filters took (0 without filters).
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    keep: torch.Tensor
    filter_report: FilterReport | None
    seconds: float


def run_genq(
    config: GenQConfig,
    output: Storage | str | Path,
    *,
    builder: Builder | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> GenQResult:
    """Make a calibration set for ``config.classifier``, quantize it, and write every artifact.

    Each numbered step below is a public function of this module, so a job runner can run the
    same steps one at a time with checkpoints in between (``services.workers.runner``).

    Args:
        config: the resolved run configuration.
        output: a :class:`~genq_core.storage.Storage` or a local folder.
        builder: the classifier's builder callable when ``config.classifier.source`` is
            ``"builder"`` without a name.
        on_progress: ``on_progress(stage, done, total)`` with stages ``invert``, ``generate``,
            ``filter:*``, ``calibrate``, ``reconstruct``, ``evaluate``.
        should_stop: polled between batches, steps and blocks; True raises a
            :class:`~genq_core.progress.Canceled` subclass.

    Raises:
        ValueError: a bad config or input (the message names it).
        FileNotFoundError: a model file or folder that does not exist.
        Canceled: ``should_stop()`` returned True.
    """
    # 1. check config
    if not isinstance(config, GenQConfig):
        raise ValueError(f"config must be a GenQConfig, got {type(config).__name__}")
    storage = LocalStorage(output) if isinstance(output, str | Path) else output
    device = torch.device(config.device)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    artifacts: list[dict[str, Any]] = []

    # 2. load models
    clock = time.perf_counter()
    classifier, pipe = load_models(config, builder)
    timings["load"] = time.perf_counter() - clock

    # 3. data-scarce mode: learn the style token from the k-shot images
    style_token: str | None = None
    tokens_by_class: dict[str, str] | None = None
    if config.data_scarce is not None:
        assert pipe is not None
        clock = time.perf_counter()
        style_token, tokens_by_class = learn_style(
            pipe, classifier, config, storage, artifacts, on_progress, should_stop
        )
        timings["invert"] = time.perf_counter() - clock

    # 4. calibration images from the source
    check_stop(should_stop, "before making calibration images")
    source = make_calibration(
        config, classifier, pipe, storage, style_token, tokens_by_class, on_progress, should_stop
    )
    timings["source"] = source.seconds

    # 5. filters (the genq source), the manifest or the calibration set
    selection = select_calibration(
        config, classifier, source, storage, artifacts, on_progress, should_stop
    )
    if selection.filter_report is not None:
        timings["filter"] = selection.seconds

    # 6. quantize on all kept images but the held-out ones (and the k-shot images)
    qmodel = None
    calibration, holdout = split_holdout(selection.images, selection.labels, config)
    calibration, kshot_images = quantizer_calibration(calibration, classifier, config)
    evaluation: dict[str, Any] = {}
    if config.quant is not None:
        clock = time.perf_counter()
        qmodel = quantize_model(
            classifier.model,
            config.quant,
            calibration,
            device=device,
            on_progress=on_progress,
            should_stop=should_stop,
        )
        timings["quantize"] = time.perf_counter() - clock

        # 7. evaluate
        clock = time.perf_counter()
        evaluation = evaluate_quantized(classifier, qmodel, holdout, config, on_progress)
        timings["evaluate"] = time.perf_counter() - clock

    # 8. write artifacts
    if qmodel is not None:
        write_quantized(storage, artifacts, qmodel)
    report = build_report(
        config,
        classifier.num_classes,
        source_summary(config, source.made, source.seconds),
        filter_summary(selection.filter_report),
        calibration_summary(calibration, holdout, kshot_images),
        evaluation,
        timings,
    )
    report["seconds"] = time.perf_counter() - started
    write_reports(storage, artifacts, config, report)
    return GenQResult(report, artifacts, qmodel, calibration.cpu())


def markdown_report(report: dict[str, Any]) -> str:
    """The human-readable form of a :func:`run_genq` report."""
    lines = [
        "# GenQ report",
        "",
        f"- classifier: `{report['classifier']}` ({report['num_classes']} classes)",
        f"- calibration source: **{report['source']['name']}**, "
        f"{report['source']['made']} images made in {report['source']['seconds']:.1f} s "
        f"({report['source']['seconds_per_1000']:.1f} s per 1000), "
        f"{report['calibration_images']} used for calibration"
        + (
            f" ({report['kshot_images']} of them the real k-shot images)"
            if report.get("kshot_images")
            else ""
        ),
    ]
    if report.get("quant"):
        quant = report["quant"]
        lines.append(
            f"- quantization: W{quant['weight_bits']}A{quant['act_bits']} `{quant['preset']}`"
        )
    evaluation = report.get("evaluation") or {}
    if evaluation:
        lines += ["", "## Evaluation", "", "| measure | float | quantized |", "|---|---|---|"]
        for key in ("top1", "top5"):
            if key in evaluation.get("float", {}):
                lines.append(
                    f"| {key} (%) | {evaluation['float'][key]:.2f} | "
                    f"{evaluation['quantized'][key]:.2f} |"
                )
        if "agreement" in evaluation:
            lines.append(f"| agreement with float (%) | 100.00 | {evaluation['agreement']:.2f} |")
        if "size" in evaluation:
            size = evaluation["size"]
            lines.append(
                f"| weights (bytes) | {size['float_bytes']} | {size['quantized_bytes']} "
                f"({size['compression']:.1f}x smaller) |"
            )
        lines += ["", f"Evaluated on: {evaluation['on']}."]
    filters = report.get("filters")
    if filters:
        lines += ["", filters["markdown"].strip()]
    lines += ["", "## Time (s)", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {step} | {seconds:.1f} |" for step, seconds in report["timings"].items()]
    return "\n".join(lines) + "\n"


def load_genq_config(path: str | Path) -> GenQConfig:
    """A :class:`GenQConfig` from a YAML or JSON file (unknown keys and bad values name the key)."""
    return load_config(GenQConfig, path)


# ---------------------------------------------------------------------------------------------
# steps: public, so that a job runner can run them one at a time with checkpoints in between


def load_models(config: GenQConfig, builder: Builder | None = None) -> tuple[LoadedClassifier, Any]:
    """Step 2: the float classifier and, for generated sources, the diffusion pipeline.

    Returns:
        ``(classifier, pipe)``, both on ``config.device``; ``pipe`` is ``None`` unless the
        calibration source generates images.
    """
    classifier = load(config.classifier, builder, device=torch.device(config.device))
    pipe = None
    if config.calibration.source in GENERATED_SOURCES:
        pipe = load_generator_for(config)
    return classifier, pipe


def load_generator_for(config: GenQConfig) -> Any:
    """The diffusion pipeline of ``config`` on its device, with its dtype and scheduler."""
    if config.generator.source is None:
        raise ValueError("generator.source: no diffusion model configured")
    device = torch.device(config.device)
    return load_generator(
        config.generator.source,
        device,
        dtype=_generator_dtype(config.generator.dtype, device),
        scheduler=config.generation.scheduler,
    )


def learn_style(
    pipe: Any,
    classifier: LoadedClassifier,
    config: GenQConfig,
    storage: Storage,
    artifacts: list[dict[str, Any]],
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> tuple[str, dict[str, str] | None]:
    """Step 3: textual inversion on the k-shot folder; the tokens are stored and added to ``pipe``.

    ``pipe`` is changed in place (it learns new words), so never pass a pipeline that other
    runs share.

    Returns:
        ``(style_token, tokens_by_class)`` for :func:`generation_specs`.
    """
    assert config.data_scarce is not None
    inversion = config.data_scarce.inversion
    images, labels, folder_names = load_kshot_folder(config.data_scarce.kshot_dir)
    unknown = sorted(set(folder_names) - set(classifier.class_names))
    if unknown:
        raise ValueError(
            f"data_scarce.kshot_dir: class folders {unknown} are not classes of the classifier"
        )
    tokens = learn_tokens(
        pipe,
        images,
        labels,
        folder_names,
        inversion,
        device=config.device,
        on_progress=on_progress,
        should_stop=should_stop,
    )
    data = save_tokens(tokens)
    put_artifact(storage, artifacts, "tokens", TOKENS_KEY, data)
    apply_tokens(pipe, data)
    per_class = class_tokens(folder_names, inversion) or None
    return inversion.style_token, per_class


def generation_specs(
    config: GenQConfig,
    class_names: list[str],
    style_token: str | None = None,
    tokens_by_class: dict[str, str] | None = None,
) -> list[ImageSpec]:
    """What step 4 generates: one spec per image, class by class, each with its own seed.

    An image's prompt and seed depend only on ``(generation.seed, class, j)``, so any subset of
    the specs (a shard) makes exactly the images that the whole set makes.
    """
    generation = config.generation
    return build_specs(
        class_names,
        generation.num_per_class,
        generation.templates,
        generation.adjectives,
        generation.seed,
        style_token=style_token,
        class_tokens=tokens_by_class,
    )


def make_calibration(
    config: GenQConfig,
    classifier: LoadedClassifier,
    pipe: Any,
    storage: Storage,
    style_token: str | None = None,
    tokens_by_class: dict[str, str] | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> SourceImages:
    """Step 4: the images of ``config.calibration.source``, timed.

    Generated sources need ``pipe`` and store their PNGs under ``synthetic/images/``.
    """
    calibration = config.calibration
    preprocessing = classifier.preprocessing
    clock = time.perf_counter()
    if calibration.source in GENERATED_SOURCES:
        specs = generation_specs(config, classifier.class_names, style_token, tokens_by_class)
        records = generate_images(
            pipe,
            specs,
            config.generation,
            storage,
            SYNTHETIC_PREFIX,
            on_progress=on_progress,
            should_stop=should_stop,
        )
        return generated_source(storage, records, classifier, time.perf_counter() - clock)
    if calibration.source == "real":
        assert calibration.real_dir is not None
        real, real_labels = _real_images(Path(calibration.real_dir), classifier)
        return SourceImages(real, real_labels, [], time.perf_counter() - clock, real.shape[0])
    if calibration.source == "noise":
        # noise with the data's first two moments in the normalised space (mean 0)
        images = gaussian_noise(
            calibration.num_images,
            preprocessing.input_size,
            seed=config.generation.seed,
            std=calibration.noise_std,
        )
        return SourceImages(images, None, [], time.perf_counter() - clock, images.shape[0])
    images, labels = model_inversion(
        classifier.model,
        calibration.num_images,
        preprocessing.input_size,
        classifier.num_classes,
        calibration.model_inversion,
        device=config.device,
        on_progress=on_progress,
        should_stop=should_stop,
    )
    return SourceImages(
        images.cpu(), labels.cpu(), [], time.perf_counter() - clock, images.shape[0]
    )


def generated_source(
    storage: Storage,
    records: list[ManifestRecord],
    classifier: LoadedClassifier,
    seconds: float,
) -> SourceImages:
    """Generated images already in ``storage`` (``records`` in index order) as a source.

    ``seconds`` is how long generating them took (the report's speed of the source).
    """
    images = load_images(storage, records, classifier.preprocessing)
    labels = torch.tensor([record.class_index for record in records], dtype=torch.long)
    return SourceImages(images, labels, records, seconds, len(records))


def select_calibration(
    config: GenQConfig,
    classifier: LoadedClassifier,
    source: SourceImages,
    storage: Storage,
    artifacts: list[dict[str, Any]],
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> Selection:
    """Step 5: the filters (``genq`` source), then what was kept is written down.

    Generated sources get their manifest (``synthetic/manifest.jsonl``) with every image's filter
    scores and verdicts (the records are updated in place); the other sources store the kept
    tensor as ``calibration/images.safetensors``.

    Raises:
        ValueError: nothing is left after filtering.
    """
    filter_report: FilterReport | None = None
    keep = torch.ones(source.images.shape[0], dtype=torch.bool)
    clock = time.perf_counter()
    if config.calibration.source == "genq":
        assert source.labels is not None
        filter_report = apply_filters(
            classifier.model,
            source.images,
            source.labels,
            config.filters,
            clip_images=_clip_images(storage, source.records) if config.filters.clip else None,
            prompts=[record.prompt for record in source.records],
            class_names=classifier.class_names,
            device=torch.device(config.device),
            on_progress=on_progress,
            should_stop=should_stop,
        )
        keep = filter_report.final.clone()
    seconds = time.perf_counter() - clock if filter_report is not None else 0.0
    if source.records:
        for i, record in enumerate(source.records):
            if filter_report is not None:
                scores, kept = filter_report.per_image(i)
                record.scores.update(scores)
                record.kept.update(kept)
            record.kept_final = bool(keep[i])
        write_manifest(storage, MANIFEST_KEY, source.records)
        artifacts.append(
            describe_artifact("synthetic-manifest", MANIFEST_KEY, storage.get_bytes(MANIFEST_KEY))
        )
    kept_images = source.images[keep]
    kept_labels = source.labels[keep] if source.labels is not None else None
    if kept_images.shape[0] == 0:
        raise ValueError("no calibration images left after filtering")
    if not source.records:
        put_artifact(
            storage,
            artifacts,
            "calibration-set",
            CALIBRATION_KEY,
            save_tensors(_calibration_tensors(kept_images, kept_labels)),
        )
    return Selection(kept_images, kept_labels, keep, filter_report, seconds)


def split_holdout(
    images: torch.Tensor, labels: torch.Tensor | None, config: GenQConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step 6's input: the calibration images and, without an eval folder, the held-out last
    ``evaluation.holdout_fraction`` of each class (at least one image of a class stays).

    With labels, the calibration images come class by class in turn (the first image of each
    class, then the second, ...): the quantizer takes the first ``quant.max_calibration_images``,
    and that way they cover every class however many images were kept.
    """
    fraction = config.evaluation.holdout_fraction
    hold = config.quant is not None and config.evaluation.eval_dir is None and fraction > 0.0
    kept: list[torch.Tensor] = []
    held: list[torch.Tensor] = []
    for rows in _class_rows(images.shape[0], labels):
        count = min(math.ceil(fraction * rows.numel()), rows.numel() - 1) if hold else 0
        kept.append(rows[: rows.numel() - count])
        if count > 0:
            held.append(rows[rows.numel() - count :])
    calibration = images[_interleave(kept)]
    return calibration, images[torch.cat(held)] if held else None


def quantizer_calibration(
    calibration: torch.Tensor, classifier: LoadedClassifier, config: GenQConfig
) -> tuple[torch.Tensor, int]:
    """Step 6's calibration set as the quantizer takes it: in the data-scarce mode the k-shot
    images first (class by class in turn; with ``kshot_share``, repeated in that order until they
    fill that share of the set), then ``calibration``; at most ``quant.max_calibration_images`` of
    them.

    Returns:
        ``(images, how many of them are k-shot images)``.
    """
    scarce = config.data_scarce
    kshot_count = 0
    limit = config.quant.max_calibration_images if config.quant is not None else None
    if scarce is not None and scarce.calibrate_with_kshot:
        kshot, labels, _ = _labelled_folder(
            Path(scarce.kshot_dir), classifier, "data_scarce.kshot_dir"
        )
        if kshot.shape[1:] != calibration.shape[1:]:
            raise ValueError(
                f"data_scarce.kshot_dir: images preprocess to {tuple(kshot.shape[1:])}, the "
                f"generated ones to {tuple(calibration.shape[1:])}"
            )
        kshot = kshot[_interleave(_class_rows(kshot.shape[0], labels))]
        total = kshot.shape[0] + calibration.shape[0]
        if limit is not None:
            total = min(total, limit)
        if scarce.kshot_share is not None:
            # the set keeps the size it has with each k-shot image once
            kshot = repeat_in_turn(kshot, round(scarce.kshot_share * total))
        calibration = torch.cat([kshot, calibration])[:total]
        kshot_count = kshot.shape[0]
    if limit is not None:
        calibration = calibration[:limit]
        kshot_count = min(kshot_count, limit)
    return calibration, kshot_count


def evaluate_quantized(
    classifier: LoadedClassifier,
    qmodel: torch.nn.Module,
    holdout: torch.Tensor | None,
    config: GenQConfig,
    on_progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Step 7: accuracy on the eval folder, or agreement on the held-out images; model size."""
    device = torch.device(config.device)
    result: dict[str, Any] = {}
    batch = config.evaluation.batch_size
    if config.evaluation.eval_dir is not None:
        images, labels, _ = _labelled_folder(
            Path(config.evaluation.eval_dir), classifier, "evaluation.eval_dir"
        )
        result["on"] = f"{images.shape[0]} labelled images from {config.evaluation.eval_dir}"
        result["float"] = accuracy(
            classifier.model, (images, labels), device=device, batch_size=batch
        )
        result["quantized"] = accuracy(qmodel, (images, labels), device=device, batch_size=batch)
        result["agreement"] = agreement(classifier.model, qmodel, images, device, batch)
    elif holdout is not None:
        result["on"] = f"{holdout.shape[0]} held-out calibration-source images"
        result["agreement"] = agreement(classifier.model, qmodel, holdout, device, batch)
    else:
        result["on"] = "nothing (no eval_dir and no held-out images)"
    result["size"] = _size_dict(model_size(qmodel))  # type: ignore[arg-type]
    if on_progress is not None:
        on_progress("evaluate", 1, 1)
    return result


def write_quantized(
    storage: Storage, artifacts: list[dict[str, Any]], qmodel: torch.nn.Module
) -> None:
    """Step 8, the model: ``model/encodings.json`` and ``model/model.safetensors``."""
    with tempfile.TemporaryDirectory() as folder:
        save_quantized(qmodel, folder)  # type: ignore[arg-type]
        for path in sorted(Path(folder).iterdir()):
            key = f"{MODEL_PREFIX}/{path.name}"
            put_artifact(storage, artifacts, f"model-{path.stem}", key, path.read_bytes())


def source_summary(config: GenQConfig, made: int, seconds: float) -> dict[str, Any]:
    """The report's ``source`` entry: which source, how many images, how fast."""
    return {
        "name": config.calibration.source,
        "made": made,
        "seconds": seconds,
        "seconds_per_1000": 1000.0 * seconds / max(made, 1),
    }


def filter_summary(filter_report: FilterReport | None) -> dict[str, Any] | None:
    """The report's ``filters`` entry, JSON-ready (so a runner can checkpoint it), or ``None``."""
    if filter_report is None:
        return None
    return {**filter_report.to_dict(), "markdown": filter_report.markdown()}


def calibration_summary(
    calibration: torch.Tensor, holdout: torch.Tensor | None, kshot_images: int = 0
) -> dict[str, Any]:
    """The report's counts and statistics of the images the quantizer used and held out;
    ``kshot_images`` of the calibration images are real k-shot images (data-scarce mode)."""
    return {
        "calibration_images": int(calibration.shape[0]),
        "kshot_images": kshot_images,
        "holdout_images": 0 if holdout is None else int(holdout.shape[0]),
        "calibration_stats": {
            "mean": float(calibration.mean()),
            "std": float(calibration.std()) if calibration.numel() > 1 else 0.0,
        },
    }


def build_report(
    config: GenQConfig,
    num_classes: int,
    source: dict[str, Any],
    filters: dict[str, Any] | None,
    calibration: dict[str, Any],
    evaluation: dict[str, Any],
    timings: dict[str, float],
) -> dict[str, Any]:
    """The JSON report from the steps' summaries (:func:`source_summary`,
    :func:`filter_summary`, :func:`calibration_summary`); the caller adds ``seconds``."""
    name = config.classifier.name or str(config.classifier.weights)
    report: dict[str, Any] = {
        "classifier": name,
        "num_classes": num_classes,
        "source": source,
        **calibration,
        "quant": None
        if config.quant is None
        else {
            "weight_bits": config.quant.weight_bits,
            "act_bits": config.quant.act_bits,
            "preset": config.quant.preset,
        },
        "evaluation": evaluation,
        "timings": timings,
        "versions": versions(),
    }
    if filters is not None:
        report["filters"] = filters
    return report


def write_reports(
    storage: Storage, artifacts: list[dict[str, Any]], config: GenQConfig, report: dict[str, Any]
) -> None:
    """Step 8, the end: ``config.json``, ``report.json``, ``report.md`` and, last,
    ``artifacts.json`` listing everything in ``artifacts`` (its presence marks a finished run)."""
    resolved = {"config": to_dict(config), "versions": versions()}
    put_artifact(storage, artifacts, "config", "config.json", json_bytes(resolved))
    put_artifact(storage, artifacts, "report", "report.json", json_bytes(report))
    put_artifact(
        storage, artifacts, "report-markdown", "report.md", markdown_report(report).encode()
    )
    put_artifact(
        storage, artifacts, "artifacts", ARTIFACTS_KEY, json_bytes({"artifacts": artifacts})
    )


def put_artifact(
    storage: Storage, artifacts: list[dict[str, Any]], name: str, key: str, data: bytes
) -> None:
    """Store ``data`` under ``key`` and append its :func:`describe_artifact` to ``artifacts``."""
    storage.put_bytes(key, data, content_type(key))
    artifacts.append(describe_artifact(name, key, data))


def describe_artifact(name: str, key: str, data: bytes) -> dict[str, Any]:
    """An ``artifacts.json`` entry: ``{name, key, size, sha256, content_type}``."""
    return {
        "name": name,
        "key": key,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "content_type": content_type(key),
    }


def content_type(key: str) -> str:
    """The content type an artifact is stored with, by its key's suffix."""
    return _CONTENT_TYPES.get(Path(key).suffix, "application/octet-stream")


def json_bytes(data: Any) -> bytes:
    """Indented JSON with a final newline: how every JSON artifact is written."""
    return (json.dumps(data, indent=2, allow_nan=False, default=str) + "\n").encode()


def versions() -> dict[str, str]:
    """Versions of the software that made a result (echoed in ``config.json`` and the report)."""
    import diffusers
    import timm

    return {
        "genq": genq_core.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "diffusers": diffusers.__version__,
    }


# ---------------------------------------------------------------------------------------------
# step helpers


def _real_images(
    folder: Path, classifier: LoadedClassifier
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A labelled folder (sub-folders named like classes) or a flat folder of images."""
    if not folder.is_dir():
        raise FileNotFoundError(f"calibration.real_dir: folder {folder} does not exist")
    sub_folders = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not sub_folders:
        return load_image_folder(folder, classifier.preprocessing), None
    images, labels, _ = _labelled_folder(folder, classifier, "calibration.real_dir")
    return images, labels


def _labelled_folder(
    folder: Path, classifier: LoadedClassifier, field_name: str
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images of a folder whose sub-folders are class names, labelled by the classifier's index."""
    names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    unknown = sorted(set(names) - set(classifier.class_names))
    if unknown:
        raise ValueError(f"{field_name}: class folders {unknown} are not classes of the classifier")
    images, local, _ = load_labelled_image_folder(folder, classifier.preprocessing, names)
    index = torch.tensor([classifier.class_names.index(name) for name in names])
    return images, index[local], names


def _class_rows(count: int, labels: torch.Tensor | None) -> list[torch.Tensor]:
    """Row indices of each class in order (all rows as one group without labels)."""
    if labels is None:
        return [torch.arange(count)]
    return [torch.nonzero(labels == c).flatten() for c in labels.unique()]


def _interleave(groups: list[torch.Tensor]) -> torch.Tensor:
    """The groups' entries taken in turn: the first of each group, then the second, ..."""
    if not groups:
        return torch.zeros(0, dtype=torch.long)
    rows = torch.cat(groups)
    rank = torch.cat([torch.arange(g.numel()) for g in groups])
    group = torch.cat([torch.full((g.numel(),), i) for i, g in enumerate(groups)])
    return rows[torch.argsort(rank * len(groups) + group)]


def _clip_images(storage: Storage, records: list[ManifestRecord]) -> list[Image.Image]:
    """The generated images as PIL images (CLIP has its own preprocessing)."""
    return [Image.open(io.BytesIO(storage.get_bytes(r.key))).convert("RGB") for r in records]


# ---------------------------------------------------------------------------------------------
# helpers


def _generator_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "float16" or (name == "auto" and device.type == "cuda"):
        return torch.float16
    return torch.float32


def _calibration_tensors(
    images: torch.Tensor, labels: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    tensors = {"images": images.contiguous()}
    if labels is not None:
        tensors["labels"] = labels.contiguous()
    return tensors


_CONTENT_TYPES = {
    ".json": "application/json",
    ".jsonl": "application/x-ndjson",
    ".md": "text/markdown",
    ".safetensors": "application/octet-stream",
    ".png": "image/png",
    ".tar": "application/x-tar",
}


def _size_dict(size: Any) -> dict[str, Any]:
    return {
        "float_bytes": size.float_bytes,
        "quantized_bytes": size.quantized_bytes,
        "compression": size.compression,
    }
