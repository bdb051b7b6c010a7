from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from transformers import CLIPTokenizer

from genq_core.generate.tiny import CLIP_VOCAB_SIZE, build_tiny_pipeline, clip_tokenizer

PROMPTS = [
    "a photo of a T-shirt/top",
    "An ANKLE boot, in the style of <x>!",
    "a  close-up photo of the 123 sneaker's sole... 2x",
    "une photo d'un pull-over élégant",
    "a bright photo of a " + "very " * 40 + "long bag",  # truncated at 77 tokens
]


def _open_clip_ids(texts: list[str]) -> torch.Tensor:
    return open_clip.tokenize(texts)


def _assert_matches_open_clip(tokenizer: CLIPTokenizer) -> None:
    ours = tokenizer(
        PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    reference = _open_clip_ids(PROMPTS)
    eos = tokenizer.eos_token_id
    for row, ref in zip(ours, reference, strict=True):
        length = int((ref == eos).nonzero()[0]) + 1
        assert row[:length].tolist() == ref[:length].tolist()
        assert (row[length:] == eos).all()  # padding: <|endoftext|> here, 0 in open_clip


def test_clip_tokenizer_matches_open_clip() -> None:
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == CLIP_VOCAB_SIZE
    assert tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (49406, 49407)
    _assert_matches_open_clip(tokenizer)


def test_clip_tokenizer_cache_dir_round_trip(tmp_path: Path) -> None:
    written = clip_tokenizer(cache_dir=tmp_path / "tok", model_max_length=16)
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["merges.txt", "vocab.json"]
    assert written.model_max_length == 16
    _assert_matches_open_clip(clip_tokenizer(cache_dir=tmp_path / "tok"))
    # the files are the format transformers reads
    loaded = CLIPTokenizer.from_pretrained(tmp_path / "tok", local_files_only=True)
    assert len(loaded) == CLIP_VOCAB_SIZE
    assert loaded("a photo of a bag").input_ids == written("a photo of a bag").input_ids


def test_clip_tokenizer_rejects_tiny_max_length() -> None:
    with pytest.raises(ValueError, match="model_max_length"):
        clip_tokenizer(model_max_length=1)


def test_tiny_pipeline_components(tiny_pipe: StableDiffusionPipeline) -> None:
    assert isinstance(tiny_pipe, StableDiffusionPipeline)
    assert isinstance(tiny_pipe.scheduler, DDIMScheduler)
    assert tiny_pipe.scheduler.config.steps_offset == 1
    assert tiny_pipe.safety_checker is None and tiny_pipe.feature_extractor is None
    assert len(tiny_pipe.tokenizer) == CLIP_VOCAB_SIZE
    assert tiny_pipe.text_encoder.config.vocab_size == CLIP_VOCAB_SIZE
    assert not tiny_pipe.unet.training and not tiny_pipe.vae.training
    assert tiny_pipe.vae_scale_factor * tiny_pipe.unet.config.sample_size == 16


def test_tiny_pipeline_generates_at_its_sample_size() -> None:
    pipe = build_tiny_pipeline(sample_size=32, seed=3)
    images = pipe(
        ["a photo of a bag", "a sandal"],
        num_inference_steps=2,
        guidance_scale=3.5,
        generator=[torch.Generator().manual_seed(i) for i in range(2)],
    ).images
    assert [image.size for image in images] == [(32, 32), (32, 32)]
    assert images[0].tobytes() != images[1].tobytes()


def test_tiny_pipeline_weights_are_seeded_and_leave_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = build_tiny_pipeline(seed=1)
    assert torch.equal(torch.rand(3), expected)
    again = build_tiny_pipeline(seed=1)
    other = build_tiny_pipeline(seed=2)
    weight = "conv_in.weight"
    assert torch.equal(first.unet.state_dict()[weight], again.unet.state_dict()[weight])
    assert not torch.equal(first.unet.state_dict()[weight], other.unet.state_dict()[weight])


def test_tiny_pipeline_rejects_bad_sample_size() -> None:
    with pytest.raises(ValueError, match="sample_size"):
        build_tiny_pipeline(sample_size=12)
