"""Generating the synthetic calibration set: prompts -> diffusion pipeline -> PNGs + manifest.

Every image has its own seeded ``torch.Generator`` (on the CPU, so the starting noise is the same
on any device), so an image depends only on its prompt, its seed, the generation config and the
pipeline, never on which other images share its batch: :func:`regenerate` makes it again alone.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from PIL import Image, UnidentifiedImageError

from genq_core.data import Preprocessing
from genq_core.generate.pipeline import SCHEDULERS, set_scheduler
from genq_core.generate.prompts import (
    DEFAULT_ADJECTIVES,
    DEFAULT_TEMPLATES,
    ImageSpec,
    check_templates,
)
from genq_core.manifest import ManifestRecord, write_manifest
from genq_core.progress import Canceled, ProgressFn, StopFn, check_stop
from genq_core.storage import Storage, check_key

__all__ = [
    "GenerationCanceled",
    "GenerationConfig",
    "generate_images",
    "image_key",
    "load_images",
    "manifest_key",
    "regenerate",
]

logger = logging.getLogger(__name__)


class GenerationCanceled(Canceled):
    """``should_stop()`` returned True between two generation batches."""


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate the synthetic set.

    Attributes:
        num_per_class: images generated per class (before filtering).
        templates: prompt templates with ``{cls}`` and optionally ``{adjective}``, ``{token}``
            (see :func:`genq_core.generate.prompts.build_specs`).
        adjectives: words drawn for ``{adjective}``.
        seed: base seed; each image's seed is derived from it, its class and its position.
        guidance_scale: classifier-free guidance; ``<= 1`` turns guidance off (SD-Turbo: 0).
        steps: denoising steps per image.
        scheduler: a key of :data:`genq_core.generate.pipeline.SCHEDULERS`.
        resolution: image height and width in pixels (a multiple of 8); ``None`` for the
            pipeline's default.
        negative_prompt: used with guidance; ``None`` for none.
        batch_size: images per pipeline call; only speed and memory depend on it.
    """

    num_per_class: int = 64
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    adjectives: tuple[str, ...] = DEFAULT_ADJECTIVES
    seed: int = 0
    guidance_scale: float = 3.5
    steps: int = 25
    scheduler: str = "ddim"
    resolution: int | None = None
    negative_prompt: str | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        for name in ("num_per_class", "steps", "batch_size"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 1, name, value, "must be an integer >= 1")
        _check(_is_int(self.seed) and self.seed >= 0, "seed", self.seed, "must be an integer >= 0")
        for name in ("templates", "adjectives"):
            value = getattr(self, name)
            _check(isinstance(value, tuple), name, value, "must be a tuple of strings")
        check_templates(self.templates, self.adjectives)
        _check(
            isinstance(self.guidance_scale, int | float)
            and not isinstance(self.guidance_scale, bool)
            and 0.0 <= self.guidance_scale < float("inf"),
            "guidance_scale",
            self.guidance_scale,
            "must be a finite number >= 0",
        )
        _check(
            self.scheduler in SCHEDULERS,
            "scheduler",
            self.scheduler,
            f"must be one of {sorted(SCHEDULERS)}",
        )
        if self.resolution is not None:
            _check(
                _is_int(self.resolution) and self.resolution >= 8 and self.resolution % 8 == 0,
                "resolution",
                self.resolution,
                "must be a positive multiple of 8 or None",
            )
        _check(
            self.negative_prompt is None or isinstance(self.negative_prompt, str),
            "negative_prompt",
            self.negative_prompt,
            "must be a string or None",
        )


def generate_images(
    pipe: DiffusionPipeline,
    specs: Sequence[ImageSpec],
    config: GenerationConfig,
    storage: Storage,
    prefix: str,
    *,
    manifest: str | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> list[ManifestRecord]:
    """Generate one image per spec, store them as PNGs and write the manifest.

    Images go to ``{prefix}/images/{class_index:04d}/{index:06d}.png`` batch by batch (at most
    one batch of images is in memory); the manifest ``{prefix}/manifest.jsonl`` is written last,
    so its presence marks a finished set. The pipeline's scheduler is set to
    ``config.scheduler`` (and stays so).

    Args:
        pipe: a text-to-image pipeline with Stable Diffusion's call signature.
        specs: what to generate (:func:`genq_core.generate.prompts.build_specs`).
        config: sampling settings; its ``num_per_class``, ``templates``, ``adjectives`` and
            ``seed`` are what ``specs`` were built from and are not used here.
        storage: where images and manifest go; existing objects under the same keys are
            replaced.
        prefix: key prefix of this set, e.g. ``"jobs/42/synthetic"``; ``""`` for the root.
        manifest: the manifest's key; ``None`` for ``{prefix}/manifest.jsonl``. Shards of one
            set (subsets of its specs generated apart) each write their own manifest here and
            share ``prefix``, so their images land where the whole set's would.
        on_progress: called as ``on_progress("generate", images_done, images_total)`` after
            each batch.
        should_stop: polled before each batch.

    Returns:
        One record per spec, in order, with empty ``scores``/``kept`` and ``kept_final=None``.

    Raises:
        ValueError: no specs, duplicate indexes, a bad prefix or config.
        GenerationCanceled: ``should_stop()`` returned True (images written so far stay, the
            manifest is not written).
    """
    # 1. check inputs
    if not isinstance(config, GenerationConfig):
        raise ValueError(f"config must be a GenerationConfig, got {type(config).__name__}")
    specs = list(specs)
    if not specs:
        raise ValueError("specs: nothing to generate")
    indexes = [spec.index for spec in specs]
    if len(set(indexes)) != len(indexes):
        raise ValueError("specs: image indexes must be unique")
    manifest = manifest_key(prefix) if manifest is None else manifest
    check_key(manifest)
    set_scheduler(pipe, config.scheduler)

    # 2. generate batch by batch, storing each image at once
    records = []
    total = len(specs)
    for start in range(0, total, config.batch_size):
        check_stop(should_stop, "during generation", GenerationCanceled)
        batch = specs[start : start + config.batch_size]
        images = _generate(pipe, batch, config)
        for spec, image in zip(batch, images, strict=True):
            key = image_key(prefix, spec)
            storage.put_bytes(key, _png_bytes(image), "image/png")
            records.append(
                ManifestRecord(
                    index=spec.index,
                    class_index=spec.class_index,
                    class_name=spec.class_name,
                    prompt=spec.prompt,
                    seed=spec.seed,
                    key=key,
                )
            )
        del images
        if on_progress is not None:
            on_progress("generate", start + len(batch), total)

    # 3. the manifest, last
    write_manifest(storage, manifest, records)
    logger.info("generated %d images under %r", total, prefix)
    return records


def regenerate(pipe: DiffusionPipeline, spec: ImageSpec, config: GenerationConfig) -> Image.Image:
    """The image :func:`generate_images` made for ``spec`` with the same pipeline and config.

    Equal up to floating-point differences between batch sizes (usually bit-identical on CPU).
    """
    set_scheduler(pipe, config.scheduler)
    return _generate(pipe, [spec], config)[0]


def load_images(
    storage: Storage, records: Sequence[ManifestRecord], preprocessing: Preprocessing
) -> torch.Tensor:
    """The records' PNGs through the classifier's preprocessing: ``[N, C, H, W]`` float.

    ``C`` is ``preprocessing.input_size[0]``: RGB images are converted to grayscale for
    one-channel classifiers. An empty ``records`` gives a ``[0, C, H, W]`` tensor.

    Raises:
        KeyError: a record's image is missing from storage.
        ValueError: a stored object that is not a readable image (names its key).
    """
    if not records:
        return torch.empty((0, *preprocessing.input_size))
    transform = preprocessing.transform()
    tensors = []
    for record in records:
        data = storage.get_bytes(record.key)
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                tensors.append(transform(image))
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{record.key} is not a readable image: {err}") from err
    return torch.stack(tensors)


def image_key(prefix: str, spec: ImageSpec | ManifestRecord) -> str:
    """``{prefix}/images/{class_index:04d}/{index:06d}.png``."""
    return _join(prefix, f"images/{spec.class_index:04d}/{spec.index:06d}.png")


def manifest_key(prefix: str) -> str:
    """``{prefix}/manifest.jsonl``."""
    return _join(prefix, "manifest.jsonl")


def _generate(
    pipe: DiffusionPipeline, specs: Sequence[ImageSpec], config: GenerationConfig
) -> list[Image.Image]:
    # CPU generators: diffusers draws each image's starting noise from its own generator on the
    # CPU and moves it to the pipeline's device, so the noise does not depend on the device.
    generators = [torch.Generator(device="cpu").manual_seed(spec.seed) for spec in specs]
    kwargs: dict[str, Any] = {}
    if config.resolution is not None:
        kwargs["height"] = kwargs["width"] = config.resolution
    if config.negative_prompt is not None:
        kwargs["negative_prompt"] = [config.negative_prompt] * len(specs)
    runner: Any = pipe  # DiffusionPipeline declares no __call__; its subclasses do
    output = runner(
        prompt=[spec.prompt for spec in specs],
        num_inference_steps=config.steps,
        guidance_scale=config.guidance_scale,
        generator=generators,
        output_type="pil",
        **kwargs,
    )
    images = list(output.images)
    if len(images) != len(specs):
        raise RuntimeError(f"the pipeline returned {len(images)} images for {len(specs)} prompts")
    return images


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _join(prefix: str, rest: str) -> str:
    if not prefix:
        return rest
    check_key(prefix)
    return f"{prefix}/{rest}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, name: str, value: object, requirement: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {requirement}, got {value!r}")
