from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from genq_core.filters import ClipModel, FilterCanceled, clip_scores, load_clip

from .conftest import TINY_CLIP_CONFIG


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    """``[n, 3, 24, 20]`` pixels on the 8-bit grid, so tensors and PIL images agree exactly."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 24, 20), generator=generator).float() / 255


def test_random_local_model_scores_every_image(tiny_clip: ClipModel) -> None:
    assert not tiny_clip.has_weights
    scores = clip_scores(pixels(5), ["a photo of a cat"] * 3 + ["a dog"] * 2, clip=tiny_clip)
    assert scores.shape == (5,) and scores.dtype == torch.float32
    assert bool(((scores >= -1) & (scores <= 1)).all())


def test_pil_and_tensor_inputs_agree(tiny_clip: ClipModel) -> None:
    images = pixels(3, seed=1)
    pil = [
        Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy()) for image in images
    ]
    prompts = ["a", "b", "a"]
    torch.testing.assert_close(
        clip_scores(pil, prompts, clip=tiny_clip), clip_scores(images, prompts, clip=tiny_clip)
    )
    gray = images[:, :1]
    gray_pil = [Image.fromarray((g[0] * 255).round().byte().numpy()) for g in gray]
    torch.testing.assert_close(
        clip_scores(gray_pil, prompts, clip=tiny_clip), clip_scores(gray, prompts, clip=tiny_clip)
    )


def test_score_is_the_cosine_of_image_and_prompt(tiny_clip: ClipModel) -> None:
    images = pixels(4, seed=2)
    prompts = ["a photo of a cat", "a photo of a dog", "a photo of a cat", "a shoe"]
    scores = clip_scores(images, prompts, clip=tiny_clip, batch_size=3)
    pil = [Image.fromarray((i * 255).round().byte().permute(1, 2, 0).numpy()) for i in images]
    expected = (tiny_clip.encode_images(pil) * tiny_clip.encode_text(prompts)).sum(dim=1)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    rows = torch.tensor([3, 1])
    torch.testing.assert_close(
        clip_scores(images, prompts, clip=tiny_clip, indices=rows), scores[rows]
    )


def test_weights_in_the_folder_are_loaded(tiny_clip: ClipModel, tmp_path: Path) -> None:
    (tmp_path / "open_clip_config.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    state = {k: v.contiguous().clone() for k, v in tiny_clip.model.state_dict().items()}
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    reloaded = load_clip(f"local-dir:{tmp_path}")
    assert reloaded.has_weights
    images, prompts = pixels(2, seed=3), ["x", "y"]
    torch.testing.assert_close(
        clip_scores(images, prompts, clip=reloaded), clip_scores(images, prompts, clip=tiny_clip)
    )


def test_cancel(tiny_clip: ClipModel) -> None:
    with pytest.raises(FilterCanceled):
        clip_scores(pixels(2), ["a", "b"], clip=tiny_clip, should_stop=lambda: True)


def test_errors(tiny_clip: ClipModel, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one string per image"):
        clip_scores(pixels(2), ["a"], clip=tiny_clip)
    with pytest.raises(ValueError, match=r"pixels in \[0, 1\]"):
        clip_scores(pixels(2) * 2 - 1, ["a", "b"], clip=tiny_clip)
    with pytest.raises(ValueError, match="PIL image"):
        clip_scores([np.zeros((4, 4))], ["a"], clip=tiny_clip)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        load_clip("no-such-model")
    with pytest.raises(ValueError, match="neither a weights file nor a tag"):
        load_clip("ViT-S-32", pretrained="no-such-tag")
    with pytest.raises(ValueError, match="open_clip_config.json"):
        load_clip(f"local-dir:{tmp_path}")
