"""Small diffusion components built offline: the real CLIP tokenizer and a tiny random pipeline.

Model hubs are unreachable on development machines, so nothing here downloads anything.
:func:`clip_tokenizer` rebuilds the 49,408-token CLIP BPE tokenizer from the merges file that
``open_clip`` ships; :func:`build_tiny_pipeline` assembles a randomly initialised
``StableDiffusionPipeline`` small enough for unit tests (16x16 images in milliseconds). Its images
are noise-like textures, but every code path (tokenizer, text encoder, UNet, VAE, scheduler,
``save_pretrained`` / ``from_pretrained``, textual inversion) is the real one.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

# Imported from their modules: mypy reads diffusers' top-level names as dummy classes.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

__all__ = [
    "BOS_TOKEN",
    "CLIP_VOCAB_SIZE",
    "EOS_TOKEN",
    "assemble_pipeline",
    "build_tiny_pipeline",
    "clip_tokenizer",
]

CLIP_VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# open_clip's SimpleTokenizer uses the first 49152 - 256 - 2 merges of its BPE file: 256 byte
# tokens, their 256 end-of-word variants, the merges and 2 special tokens make 49,408.
_NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2
_MERGES_HEADER = "#version: 0.2"


def clip_tokenizer(cache_dir: Path | None = None, model_max_length: int = 77) -> CLIPTokenizer:
    """CLIP's real BPE tokenizer (49,408 tokens), built from ``open_clip``'s bundled merges.

    Token ids equal ``open_clip.tokenize``'s up to the end-of-text token; padding differs
    (``<|endoftext|>`` here, as in Stable Diffusion 1.x; ``0`` in open_clip).

    Args:
        cache_dir: if given, ``vocab.json`` and ``merges.txt`` are written there (or read from
            there when both exist), in the format ``CLIPTokenizer.from_pretrained`` reads.
        model_max_length: the length prompts are padded and truncated to; a text encoder needs
            at least this many position embeddings.
    """
    if model_max_length < 2:
        raise ValueError(f"model_max_length must be >= 2, got {model_max_length}")
    if cache_dir is not None:
        vocab_file, merges_file = Path(cache_dir) / "vocab.json", Path(cache_dir) / "merges.txt"
        if not (vocab_file.is_file() and merges_file.is_file()):
            vocab, merges = _clip_vocab()
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
            merges_file.write_text(
                "\n".join([_MERGES_HEADER, *(" ".join(m) for m in merges)]) + "\n",
                encoding="utf-8",
            )
        return CLIPTokenizer(
            vocab=str(vocab_file), merges=str(merges_file), model_max_length=model_max_length
        )
    vocab, merges = _clip_vocab()
    # The tokenizers backend wants (first, second) tuples; transformers' hint says strings.
    merge_pairs: Any = list(merges)
    return CLIPTokenizer(vocab=dict(vocab), merges=merge_pairs, model_max_length=model_max_length)


def build_tiny_pipeline(sample_size: int = 16, seed: int = 0) -> StableDiffusionPipeline:
    """A randomly initialised, tiny ``StableDiffusionPipeline`` for tests and smoke runs.

    Components: an ``AutoencoderKL`` with two blocks (16, 32 channels; latents are 4 x
    ``sample_size / 2`` x ``sample_size / 2``), a ``UNet2DConditionModel`` with one plain and one
    cross-attention block (16, 32 channels), a 2-layer ``CLIPTextModel`` of width 32 over the real
    CLIP vocabulary (:func:`clip_tokenizer`, 77 tokens), and DDIM with Stable Diffusion's noise
    schedule and ``steps_offset=1``. No safety checker or feature extractor. Save it with
    ``pipe.save_pretrained(folder)`` and load it back with
    :func:`genq_core.generate.pipeline.load_generator`.

    Args:
        sample_size: default image height and width in pixels; a multiple of 8.
        seed: seeds the random weights (the global RNG is left as it was).
    """
    if sample_size < 8 or sample_size % 8:
        raise ValueError(f"sample_size must be a positive multiple of 8, got {sample_size}")
    channels = (16, 32)
    vae_scale_factor = 2 ** (len(channels) - 1)
    tokenizer = clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(channels),
            up_block_types=("UpDecoderBlock2D",) * len(channels),
            block_out_channels=channels,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=sample_size,
        )
        unet = UNet2DConditionModel(
            sample_size=sample_size // vae_scale_factor,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=channels,
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=32,
            attention_head_dim=8,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=CLIP_VOCAB_SIZE,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler)


def assemble_pipeline(
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    scheduler: Any,
) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` of the components in eval mode, no safety checker."""
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,  # type: ignore[arg-type]
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@lru_cache(maxsize=1)
def _clip_vocab() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's vocabulary and merges, built the way open_clip's ``SimpleTokenizer`` builds them."""
    with gzip.open(default_bpe()) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges: list[tuple[str, str]] = []
    for line in lines[1 : _NUM_MERGES + 1]:
        first, second = line.split()
        merges.append((first, second))
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += [first + second for first, second in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    if len(tokens) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"open_clip's BPE file gave {len(tokens)} tokens, not {CLIP_VOCAB_SIZE}")
    return {token: i for i, token in enumerate(tokens)}, tuple(merges)


def main(argv: list[str] | None = None) -> None:
    """``python -m genq_core.generate.tiny FOLDER [--size N]``: save a tiny random pipeline."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build_tiny_pipeline(args.size, args.seed).save_pretrained(args.folder)
    print(f"saved a tiny random StableDiffusionPipeline ({args.size}px) to {args.folder}")


if __name__ == "__main__":
    main()
