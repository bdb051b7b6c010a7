"""Experiment: do captions that describe the look give textual inversion something to learn?

``ti_in_support.py`` found that the shipped generator ignores every word but the class: its
training captions drew adjectives at random, independently of the image. This script fine-tunes
the shipped generator's UNet and text encoder for ``--minutes`` on the generator part of the split
with captions that describe the look: "a photo of a dark {cls}" for the third of each class with
the lowest garment intensity, "a photo of a bright {cls}" for the brightest third, "a photo of a
{cls}" for the rest (10% empty captions, as in training). It then repeats ``ti_in_support.py``'s
measurements on the fine-tuned generator: garment intensity of plain, "dark" and "bright"
prompts, and of a token learned on the darkened k-shot images (x -> x ** 2). The fine-tuned
generator is not saved. (The product of this experiment is ``GeneratorTrainConfig.look_words``:
``benchmarks/fashion/train_generator.py --init-from ... --look-words dark,,bright`` does the same
fine-tune in the generator's training code and saves it.) Run from the repository root:

    python benchmarks/fashion/experiments/descriptive_captions.py --minutes 20

Results: benchmarks/results/experiments/descriptive_captions.log and descriptive_captions.png
(rows: the darkened k images, plain prompts, "dark", "bright", the learned token; one column per
class).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from ti_in_support import (  # the sibling script (run as a script)
    OUT,
    SEED,
    K,
    generate,
    grid,
    kshot_images,
    measures,
)

from genq_core.bench.fashion_bench import (
    DATA_SCARCE_TEMPLATES,
    STYLE_TOKEN,
    BenchConfig,
    _FashionData,
    _load_classifier,
)
from genq_core.bench.fashion_mnist import CLASS_NAMES, garment_intensity, to_float_images
from genq_core.bench.generator import load_generator_data, prepare_images
from genq_core.generate.pipeline import load_generator
from genq_core.inversion import TextualInversionConfig, apply_tokens, learn_tokens

LOOKS = ("dark", "", "bright")  # by garment-intensity third within each class, darkest first
BATCH, LR, CAPTION_DROPOUT = 64, 1e-4, 0.1


def look_of_each_image(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Index into LOOKS per image: the image's garment-intensity third within its class."""
    intensity = garment_intensity(to_float_images(images))
    looks = torch.empty_like(labels)
    for cls in range(len(CLASS_NAMES)):
        members = (labels == cls).nonzero().squeeze(1)
        rank = intensity[members].argsort().argsort()
        looks[members] = (rank * len(LOOKS)) // members.numel()
    return looks


def fine_tune(pipe: Any, minutes: float) -> int:
    """Fine-tune ``pipe``'s UNet and text encoder with look captions; returns the steps taken."""
    data = load_generator_data()
    looks = look_of_each_image(data.images, data.labels)
    captions = [
        " ".join(f"a photo of a {look} {cls}".split()) for cls in CLASS_NAMES for look in LOOKS
    ] + [""]

    def ids(texts: list[str]) -> torch.Tensor:
        tokens = pipe.tokenizer(
            texts,
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return torch.as_tensor(tokens.input_ids)

    caption_ids = ids(captions)
    empty = len(captions) - 1
    caption_of = data.labels * len(LOOKS) + looks
    with torch.no_grad():
        moments = [
            pipe.vae.encode(prepare_images(chunk)).latent_dist for chunk in data.images.split(512)
        ]
    mean = torch.cat([m.mean for m in moments])
    std = torch.cat([m.std for m in moments])
    scaling = float(pipe.vae.config.scaling_factor)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    parameters = [*pipe.unet.parameters(), *pipe.text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=LR, weight_decay=0.0)
    pipe.unet.train()
    pipe.text_encoder.train()
    generator = torch.Generator().manual_seed(0)
    started, steps = time.perf_counter(), 0
    while time.perf_counter() - started < minutes * 60:
        batch = torch.randint(len(data.labels), (BATCH,), generator=generator)
        latents = mean[batch] + std[batch] * torch.randn(mean[batch].shape, generator=generator)
        latents = latents * scaling
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(
            scheduler.config.num_train_timesteps, (BATCH,), generator=generator
        )
        dropped = torch.rand(BATCH, generator=generator) < CAPTION_DROPOUT
        chosen = torch.where(dropped, torch.full_like(batch, empty), caption_of[batch])
        hidden = pipe.text_encoder(caption_ids[chosen])[0]
        noisy = scheduler.add_noise(latents, noise, timesteps)
        loss = F.mse_loss(pipe.unet(noisy, timesteps, encoder_hidden_states=hidden).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        steps += 1
        if steps % 200 == 0:
            print(f"step {steps}: loss {loss.item():.4f}", flush=True)
    pipe.unet.eval()
    pipe.text_encoder.eval()
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = BenchConfig(models=("resnet",))
    classifier = _load_classifier("resnet", config, []).model
    pipe: Any = load_generator(config.generator_path, torch.device("cpu"), scheduler="ddim")
    pipe.set_progress_bar_config(disable=True)
    steps = fine_tune(pipe, args.minutes)
    print(f"fine-tuned {steps} steps of {BATCH} in {args.minutes:g} min", flush=True)
    plain_templates = tuple(t.replace("{token} ", "") for t in DATA_SCARCE_TEMPLATES)
    rows = [generate(pipe, plain_templates, None)]
    print(f"plain prompts      : {measures(rows[0], classifier, pipe)}", flush=True)
    for word in ("dark", "bright"):
        rows.append(generate(pipe, (f"a photo of a {word} {{cls}}",), None))
        print(f"{word!r:18s} : {measures(rows[-1], classifier, pipe)}", flush=True)
    shots = kshot_images(_FashionData.load(config), "dark")
    print(f"dark    k images : {measures(shots, classifier, pipe)}", flush=True)
    inversion = TextualInversionConfig(
        style_token=STYLE_TOKEN, captions=DATA_SCARCE_TEMPLATES, seed=SEED
    )
    labels = [c for c in range(len(CLASS_NAMES)) for _ in range(K)]
    apply_tokens(pipe, learn_tokens(pipe, shots, labels, list(CLASS_NAMES), inversion))
    rows.append(generate(pipe, DATA_SCARCE_TEMPLATES, STYLE_TOKEN))
    print(f"dark    token    : {measures(rows[-1], classifier, pipe)}", flush=True)
    grid([shots, *rows], OUT / "descriptive_captions.png")


if __name__ == "__main__":
    main()
