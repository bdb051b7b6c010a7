"""Synthetic calibration images: prompts, the diffusion pipeline, generation to storage.

Entry point: :func:`generate_images`. Layers: ``prompts`` (what to generate, pure Python),
``pipeline`` (loading a diffusers pipeline, schedulers), ``generate`` (batches -> PNGs +
manifest), ``tiny`` (offline tokenizer and a tiny random pipeline for tests).
"""

from genq_core.generate.generate import (
    GenerationCanceled,
    GenerationConfig,
    generate_images,
    image_key,
    load_images,
    manifest_key,
    regenerate,
)
from genq_core.generate.pipeline import SCHEDULERS, load_generator, set_scheduler
from genq_core.generate.prompts import (
    DEFAULT_ADJECTIVES,
    DEFAULT_TEMPLATES,
    ImageSpec,
    build_specs,
)

__all__ = [
    "DEFAULT_ADJECTIVES",
    "DEFAULT_TEMPLATES",
    "SCHEDULERS",
    "GenerationCanceled",
    "GenerationConfig",
    "ImageSpec",
    "build_specs",
    "generate_images",
    "image_key",
    "load_generator",
    "load_images",
    "manifest_key",
    "regenerate",
    "set_scheduler",
]
