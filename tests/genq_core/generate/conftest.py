"""A tiny random Stable Diffusion pipeline shared by the generation tests (built once)."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

from genq_core.generate.tiny import build_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_pipe() -> StableDiffusionPipeline:
    """16x16 images; tests may change its scheduler (generate_images sets it on every call)."""
    return build_tiny_pipeline(sample_size=16, seed=0)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same pipeline written by ``save_pretrained``."""
    folder = tmp_path_factory.mktemp("tiny_sd")
    build_tiny_pipeline(sample_size=16, seed=0).save_pretrained(folder)
    return folder
