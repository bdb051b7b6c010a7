"""A tiny real Stable Diffusion pipeline and a few seeded real-looking images."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from PIL import Image

from genq_core.generate.tiny import build_tiny_pipeline


@pytest.fixture
def tiny_pipe() -> Any:
    """16x16 images, 4x8x8 latents, width-32 text encoder over the real CLIP vocabulary.

    Typed ``Any``: mypy sees diffusers' top-level classes as unrelated dummy objects.
    """
    return build_tiny_pipeline(sample_size=16, seed=0)


def make_image(seed: int, size: tuple[int, int] = (20, 24)) -> Image.Image:
    """A seeded RGB image: a colour gradient plus noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    colour = rng.uniform(0, 1, size=(1, 1, 3)).astype(np.float32)
    pixels = ramp * colour + rng.normal(0, 20, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture
def kshot() -> tuple[list[Image.Image], list[int], list[str]]:
    """Three images of each of two classes."""
    images = [make_image(seed) for seed in range(6)]
    return images, [0, 0, 0, 1, 1, 1], ["cat", "dog"]
