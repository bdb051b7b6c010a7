"""Data-scarce mode: textual inversion of a style token from a few real images per class.

With ``k`` real images per class (``k`` from 1 to a few tens), a new word ``S*`` is added to the
diffusion model's vocabulary and its input embedding is learned with the model's own denoising
loss on captions such as ``"a photo of a {class} in the style of S*"``; the UNet, the VAE and the
text encoder stay frozen. Prompts that mention ``S*`` then steer generation towards the real
images' style. Optionally every class gets its own token too (``per_class_tokens``), learned
alongside the shared one; it takes the style token's place in that class's prompts, the way
:func:`genq_core.generate.prompts.build_specs` uses ``class_tokens``.

How only the new rows are trained: the text encoder is not resized while learning. Two hooks on
its token-embedding layer map the new token ids to learned rows (a small ``[T, D]`` parameter,
the only thing the optimiser sees), so every other row provably stays as it was and the caller's
pipeline is left untouched, also when training fails or is canceled. The learned rows are
returned as ``{token: tensor}``; :func:`apply_tokens` adds them to a pipeline through diffusers'
own ``load_textual_inversion`` (tokenizer grows by the new tokens, embedding matrix resized), and
:func:`save_tokens` writes the diffusers/safetensors format that call reads back exactly.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiffusionPipeline
from PIL import Image, ImageOps, UnidentifiedImageError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from genq_core.data import IMAGE_SUFFIXES
from genq_core.progress import Canceled, ProgressFn, StopFn, check_stop

__all__ = [
    "DEFAULT_CAPTIONS",
    "TextualInversionCanceled",
    "TextualInversionConfig",
    "apply_tokens",
    "class_tokens",
    "learn_tokens",
    "load_kshot_folder",
    "load_tokens",
    "save_tokens",
]

logger = logging.getLogger(__name__)

_LOG_EVERY = 50
_ORDER_KEY = "genq_token_order"

DEFAULT_CAPTIONS: tuple[str, ...] = (
    "a photo of a {cls} in the style of {token}",
    "a rendering of a {cls} in the style of {token}",
    "a cropped photo of a {cls} in the style of {token}",
    "a close-up photo of a {cls} in the style of {token}",
    "a bright photo of a {cls} in the style of {token}",
    "a good photo of a {cls} in the style of {token}",
)


class TextualInversionCanceled(Canceled):
    """``should_stop()`` returned True; nothing was learned and the pipeline is unchanged."""


@dataclass(frozen=True)
class TextualInversionConfig:
    """How to learn the style token (and optional class tokens).

    Attributes:
        steps: optimisation steps (one batch each).
        lr: AdamW learning rate of the new embedding rows (no weight decay).
        batch_size: real images per step, drawn with replacement.
        style_token: the new word shared by all classes; lowercase, no spaces or braces (CLIP's
            tokenizer lowercases prompts, so an uppercase token would never match).
        init_word: every new token starts at the mean input embedding of this word's tokens.
        per_class_tokens: also learn one token per class, named by ``class_token``. Each
            training caption then puts, with equal odds, the style token or its class's token
            in ``{token}``, so the shared token still learns from every image and each class
            token from its own class (for ``build_specs(class_tokens=class_tokens(...))``).
        class_token: format string of the class tokens, with ``{index}`` the class index.
        resolution: side of the square training crops in pixels; ``None`` uses the pipeline's
            default (UNet sample size x VAE scale factor). Must be a multiple of the VAE's
            scale factor.
        seed: seeds batch sampling, flips, caption choice, latent sampling, noise and timesteps.
        captions: caption templates with ``{cls}`` and ``{token}``; one is drawn per image.
        flip_p: probability of a horizontal flip of each training image.
    """

    steps: int = 500
    lr: float = 5e-3
    batch_size: int = 4
    style_token: str = "<genq-style>"
    init_word: str = "photo"
    per_class_tokens: bool = False
    class_token: str = "<genq-class-{index}>"
    resolution: int | None = None
    seed: int = 0
    captions: tuple[str, ...] = DEFAULT_CAPTIONS
    flip_p: float = 0.5

    def __post_init__(self) -> None:
        _check(_is_int(self.steps) and self.steps >= 1, "steps", self.steps, "must be >= 1")
        _check(self.lr > 0, "lr", self.lr, "must be > 0")
        _check(
            _is_int(self.batch_size) and self.batch_size >= 1,
            "batch_size",
            self.batch_size,
            "must be >= 1",
        )
        _check_token("style_token", self.style_token)
        _check(
            "{index}" in self.class_token, "class_token", self.class_token, "must contain {index}"
        )
        try:
            first_class_token = self.class_token.format(index=0)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"class_token must be a format string with only {{index}}, got "
                f"{self.class_token!r}: {err}"
            ) from err
        _check_token("class_token", first_class_token)
        _check(
            self.init_word.strip() != "", "init_word", self.init_word, "must be a non-empty word"
        )
        if self.resolution is not None:
            _check(
                _is_int(self.resolution) and self.resolution >= 8,
                "resolution",
                self.resolution,
                "must be >= 8 or None",
            )
        _check(_is_int(self.seed), "seed", self.seed, "must be an integer")
        _check(len(self.captions) >= 1, "captions", self.captions, "must not be empty")
        for caption in self.captions:
            ok = "{cls}" in caption and "{token}" in caption
            _check(ok, "captions", caption, "each caption must contain {cls} and {token}")
            try:
                caption.format(cls="x", token="y")
            except (KeyError, IndexError, ValueError) as err:
                raise ValueError(
                    f"captions must only use {{cls}} and {{token}}, got {caption!r}: {err}"
                ) from err
        _check(0.0 <= self.flip_p <= 1.0, "flip_p", self.flip_p, "must be in [0, 1]")


def class_tokens(class_names: Sequence[str], config: TextualInversionConfig) -> dict[str, str]:
    """``{class name: class token}`` in class order; empty unless ``config.per_class_tokens``."""
    if not config.per_class_tokens:
        return {}
    return {name: config.class_token.format(index=i) for i, name in enumerate(class_names)}


def load_kshot_folder(
    root: str | Path, min_size: int = 8
) -> tuple[list[Image.Image], list[int], list[str]]:
    """The few real images of the data-scarce mode: one sub-folder per class.

    Classes are the sorted sub-folder names; every file below a class folder (recursively) must be
    a readable image at least ``min_size`` pixels on its shorter side. Hidden files and folders
    (names starting with ``.``) are skipped.

    Returns:
        ``(images, labels, class_names)``: RGB PIL images (fully loaded, files closed), their
        class indices, and the class names.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: no class folders, a file directly in ``root``, an empty class folder, or a
            non-image, unreadable or too small file (each named).
    """
    if not _is_int(min_size) or min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size!r}")
    folder = Path(root)
    if not folder.is_dir():
        raise FileNotFoundError(f"k-shot folder {folder} does not exist")
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    for entry in entries:
        if not entry.is_dir():
            raise ValueError(
                f"{entry}: a k-shot folder holds one sub-folder per class, not loose files"
            )
    if not entries:
        raise ValueError(f"{folder} has no class sub-folders")

    images: list[Image.Image] = []
    labels: list[int] = []
    for label, class_dir in enumerate(entries):
        files = sorted(
            p
            for p in class_dir.rglob("*")
            if p.is_file() and not any(s.startswith(".") for s in p.relative_to(class_dir).parts)
        )
        if not files:
            raise ValueError(f"class folder {class_dir} has no images")
        for file in files:
            images.append(_read_image(file, min_size))
            labels.append(label)
    logger.info("loaded %d real images of %d classes from %s", len(images), len(entries), folder)
    return images, labels, [p.name for p in entries]


def learn_tokens(
    pipe: DiffusionPipeline,
    images: Sequence[Image.Image],
    labels: Sequence[int] | torch.Tensor,
    class_names: Sequence[str],
    config: TextualInversionConfig,
    *,
    device: str | torch.device = "cpu",
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> dict[str, torch.Tensor]:
    """Learn the style token (and class tokens) on a few real images by textual inversion.

    Args:
        pipe: a Stable-Diffusion-like pipeline with one ``tokenizer`` / ``text_encoder`` pair, a
            ``unet``, a ``vae`` and a ``scheduler`` (SD 1.x / 2.x; epsilon or v prediction).
            It is moved to ``device`` and otherwise left unchanged: use :func:`apply_tokens`
            to add the result.
        images: the real images (any size and mode; converted to RGB, resized on the shorter
            side and centre-cropped to the training resolution).
        labels: class index of each image, ``[N]``.
        class_names: names used in the captions, indexed by ``labels``.
        config: steps, learning rate, token names, captions, seed.
        device: where training runs. The pipeline's own dtype is used (fp16 pipelines train
            fp32 rows through fp16 networks; the loss is computed in fp32).
        on_progress: called as ``on_progress("invert", step, config.steps)`` after each step.
        should_stop: polled before each step; True raises :class:`TextualInversionCanceled`.

    Returns:
        ``{token: [D] float32 CPU tensor}``: the style token first, then the class tokens in
        class order (see :func:`class_tokens`).

    Raises:
        ValueError: a pipeline without the needed components, tokens already in its vocabulary,
            mismatched images/labels/class names, a resolution the VAE cannot encode, or captions
            so long that the tokenizer truncates the new tokens away.
        TextualInversionCanceled: ``should_stop()`` returned True.
    """
    # 1. check inputs
    if not isinstance(config, TextualInversionConfig):
        raise ValueError(f"config must be a TextualInversionConfig, got {type(config).__name__}")
    tokenizer, text_encoder, unet, vae = _components(pipe)
    label_tensor = _check_examples(images, labels, class_names)
    per_class = class_tokens(class_names, config)
    new_tokens = [config.style_token, *per_class.values()]
    if len(set(new_tokens)) != len(new_tokens):
        raise ValueError(f"class_token and style_token give duplicate tokens: {new_tokens}")
    vocab = tokenizer.get_vocab()
    taken = [token for token in new_tokens if token in vocab]
    if taken:
        raise ValueError(
            f"tokens {taken} are already in the pipeline's tokenizer (applied before?); "
            "choose other style_token/class_token names or use a fresh pipeline"
        )
    resolution = _resolution(pipe, config)
    target = torch.device(device)
    sd: Any = pipe  # DiffusionPipeline declares no components; _components checked them
    sd.to(target)

    # 2. a private tokenizer that knows the new tokens; their initial embeddings
    private_tokenizer = copy.deepcopy(tokenizer)
    private_tokenizer.add_tokens(new_tokens)
    token_ids = [int(private_tokenizer.convert_tokens_to_ids(t)) for t in new_tokens]
    for token, token_id in zip(new_tokens, token_ids, strict=True):
        if private_tokenizer(token, add_special_tokens=False).input_ids != [token_id]:
            raise ValueError(f"token {token!r} is not kept as one token by the tokenizer")
    embedding = text_encoder.get_input_embeddings()
    init_row = _mean_embedding(tokenizer, embedding, config.init_word)
    init_rows = init_row.repeat(len(new_tokens), 1)

    # 3. every (class, caption, token) triple tokenized once: [classes, captions, variants, L]
    caption_ids = _caption_ids(private_tokenizer, class_names, per_class, config)
    for variant in range(caption_ids.shape[2]):
        for c in range(len(class_names)):
            token_id = token_ids[0] if variant == 0 else token_ids[1 + c]
            if not bool((caption_ids[c, :, variant] == token_id).any(-1).all()):
                raise ValueError(
                    f"captions are longer than the tokenizer's "
                    f"{private_tokenizer.model_max_length} tokens and lose "
                    f"{private_tokenizer.convert_ids_to_tokens(token_id)!r} for class "
                    f"{class_names[c]!r}; use shorter captions or class names"
                )

    # 4. the training noise schedule, from the pipeline's own scheduler settings
    noise_scheduler = DDPMScheduler.from_config(sd.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"scheduler prediction_type {prediction_type!r} is not supported")
    num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)
    scaling = float(vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None) or 0.0

    # 5. optimise the new rows only
    generator = torch.Generator().manual_seed(config.seed)
    rows = nn.Parameter(init_rows.detach().float().to(target))
    optimizer = torch.optim.AdamW([rows], lr=config.lr, weight_decay=0.0)
    ids_tensor = torch.tensor(token_ids, device=target)
    running_loss = 0.0
    with (
        _frozen(text_encoder, unet, vae),
        _substitute_rows(embedding, ids_tensor, rows),
    ):
        for step in range(config.steps):
            check_stop(
                should_stop,
                f"textual inversion at step {step}/{config.steps}",
                TextualInversionCanceled,
            )
            pick = torch.randint(len(images), (config.batch_size,), generator=generator)
            flips = torch.rand(config.batch_size, generator=generator) < config.flip_p
            pixels = torch.stack(
                [
                    _to_pixels(images[int(i)], resolution, bool(f))
                    for i, f in zip(pick, flips, strict=True)
                ]
            )
            with torch.no_grad():
                dist = vae.encode(pixels.to(target, vae.dtype)).latent_dist
                eps = torch.randn(dist.mean.shape, generator=generator).to(target, dist.mean.dtype)
                latents = (dist.mean + dist.std * eps - shift) * scaling
            noise = torch.randn(latents.shape, generator=generator).to(target, latents.dtype)
            timesteps = torch.randint(
                num_train_timesteps, (config.batch_size,), generator=generator
            ).to(target)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            captions = torch.randint(
                len(config.captions), (config.batch_size,), generator=generator
            )
            variants = torch.randint(
                caption_ids.shape[2], (config.batch_size,), generator=generator
            )
            input_ids = caption_ids[label_tensor[pick], captions, variants].to(target)

            hidden = text_encoder(input_ids)[0]
            prediction = unet(noisy, timesteps, encoder_hidden_states=hidden.to(unet.dtype)).sample
            wanted = (
                noise
                if prediction_type == "epsilon"
                else noise_scheduler.get_velocity(latents, noise, timesteps)
            )
            loss = F.mse_loss(prediction.float(), wanted.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            running_loss += float(loss.detach())
            if (step + 1) % _LOG_EVERY == 0 or step + 1 == config.steps:
                count = (step % _LOG_EVERY) + 1
                logger.info(
                    "textual inversion step %d/%d: loss %.4f",
                    step + 1,
                    config.steps,
                    running_loss / count,
                )
                running_loss = 0.0
            if on_progress is not None:
                on_progress("invert", step + 1, config.steps)

    # 6. the learned rows, by token
    learned = rows.detach().float().cpu()
    return {token: learned[k].clone() for k, token in enumerate(new_tokens)}


def save_tokens(tokens: Mapping[str, torch.Tensor], path: str | Path | None = None) -> bytes:
    """Serialise ``{token: [D] tensor}`` as safetensors; also write it to ``path`` if given.

    A one-token file is exactly what ``pipe.load_textual_inversion(path, token=...)`` reads;
    files with several tokens are read by :func:`apply_tokens`. The file is written atomically.

    Returns:
        The file's bytes (for object storage).

    Raises:
        ValueError: no tokens, or tensors that are not ``[D]`` vectors of one size.
    """
    checked = _check_tokens(tokens, where="tokens")
    data = save_safetensors_bytes(
        {name: tensor.detach().cpu().contiguous() for name, tensor in checked.items()},
        # safetensors sorts its keys; the metadata keeps the caller's order (style token first)
        metadata={_ORDER_KEY: json.dumps(list(checked))},
    )
    if path is not None:
        file = Path(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.replace(temp, file)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
    return data


def load_tokens(source: str | Path | bytes) -> dict[str, torch.Tensor]:
    """Read a token file written by :func:`save_tokens` (a path or its bytes).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: not a safetensors file, or not ``{token: [D] tensor}`` (the file is named).
    """
    where = "token bytes" if isinstance(source, bytes) else str(source)
    if isinstance(source, bytes):
        data = source
    else:
        file = Path(source)
        if not file.is_file():
            raise FileNotFoundError(f"token file {file} does not exist")
        data = file.read_bytes()
    try:
        tokens = load_safetensors_bytes(data)
    except Exception as err:
        raise ValueError(f"{where} is not a safetensors token file: {err}") from err
    order = _saved_order(data)
    if order is not None and sorted(order) == sorted(tokens):
        tokens = {name: tokens[name] for name in order}
    return _check_tokens(tokens, where=where)


def apply_tokens(
    pipe: DiffusionPipeline, source: str | Path | bytes | Mapping[str, torch.Tensor]
) -> list[str]:
    """Add learned tokens to ``pipe`` (in place) with diffusers' ``load_textual_inversion``.

    Args:
        pipe: a pipeline with ``tokenizer`` and ``text_encoder`` (and the textual-inversion
            loader mixin, as ``StableDiffusionPipeline`` has).
        source: a token file, its bytes, or the mapping :func:`learn_tokens` returned.

    Returns:
        The added tokens, in file order: prompts can use them from now on.

    Raises:
        ValueError: a token already in the tokenizer, or vectors of the wrong size.
    """
    tokens = load_tokens(source) if isinstance(source, str | Path | bytes) else dict(source)
    tokens = _check_tokens(tokens, where="tokens")
    tokenizer = getattr(pipe, "tokenizer", None)
    text_encoder = getattr(pipe, "text_encoder", None)
    if tokenizer is None or text_encoder is None or not hasattr(pipe, "load_textual_inversion"):
        raise ValueError(
            f"{type(pipe).__name__} cannot take textual-inversion tokens (needs tokenizer, "
            "text_encoder and load_textual_inversion)"
        )
    width = text_encoder.get_input_embeddings().weight.shape[-1]
    vocab = tokenizer.get_vocab()
    for name, tensor in tokens.items():
        if name in vocab:
            raise ValueError(f"token {name!r} is already in the pipeline's tokenizer")
        if tensor.shape[-1] != width:
            raise ValueError(
                f"token {name!r} has {tensor.shape[-1]} dimensions, the text encoder needs {width}"
            )
    names = list(tokens)
    # diffusers reads one token per state dict, so a multi-token file goes in as a list of them
    pipe.load_textual_inversion([{name: tokens[name]} for name in names], token=names)
    return names


# ---------------------------------------------------------------------------------------------
# helpers


def _check(ok: bool, name: str, value: object, requirement: str) -> None:
    if not ok:
        raise ValueError(f"{name} {requirement}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_token(name: str, token: str) -> None:
    ok = (
        isinstance(token, str)
        and token != ""
        and not any(c.isspace() for c in token)
        and token == token.lower()
        and "{" not in token
        and "}" not in token
    )
    _check(ok, name, token, "must be a non-empty lowercase word without spaces or braces")


def _read_image(file: Path, min_size: int) -> Image.Image:
    if file.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(
            f"{file} is not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})"
        )
    try:
        with Image.open(file) as opened:
            opened.load()
            image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"{file} is not a readable image: {err}") from err
    if min(image.size) < min_size:
        raise ValueError(
            f"{file} is {image.size[0]}x{image.size[1]} pixels; images need at least "
            f"{min_size} pixels on each side"
        )
    return image


def _components(pipe: DiffusionPipeline) -> tuple[Any, Any, Any, Any]:
    missing = [
        name
        for name in ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
        if getattr(pipe, name, None) is None
    ]
    if missing:
        raise ValueError(
            f"textual inversion needs a Stable-Diffusion-like pipeline; {type(pipe).__name__} "
            f"lacks {missing}"
        )
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise ValueError(
            f"{type(pipe).__name__} has two text encoders; textual inversion here supports "
            "pipelines with one (Stable Diffusion 1.x / 2.x)"
        )
    sd: Any = pipe
    return sd.tokenizer, sd.text_encoder, sd.unet, sd.vae


def _check_examples(
    images: Sequence[Image.Image], labels: Sequence[int] | torch.Tensor, class_names: Sequence[str]
) -> torch.Tensor:
    if len(images) == 0:
        raise ValueError("images is empty: textual inversion needs at least one real image")
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ValueError(f"images[{i}] is a {type(image).__name__}, not a PIL image")
    label_tensor = torch.as_tensor(labels)
    if label_tensor.shape != (len(images),) or label_tensor.is_floating_point():
        raise ValueError(
            f"labels must be {len(images)} integer class indices, got shape "
            f"{tuple(label_tensor.shape)} of {label_tensor.dtype}"
        )
    if len(class_names) == 0 or len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names must be non-empty and unique, got {list(class_names)}")
    bad = [int(x) for x in label_tensor if not 0 <= int(x) < len(class_names)]
    if bad:
        raise ValueError(
            f"labels {sorted(set(bad))} are not indices into {len(class_names)} class names"
        )
    return label_tensor.long()


def _resolution(pipe: DiffusionPipeline, config: TextualInversionConfig) -> int:
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    if config.resolution is not None:
        resolution = config.resolution
    else:
        sample_size = _components(pipe)[2].config.sample_size
        if not _is_int(sample_size):
            raise ValueError(
                f"the UNet's sample_size is {sample_size!r}; set resolution in the config"
            )
        resolution = int(sample_size) * factor
    if resolution % factor:
        raise ValueError(
            f"resolution {resolution} is not a multiple of the VAE's scale factor {factor}"
        )
    return resolution


@torch.no_grad()
def _mean_embedding(tokenizer: Any, embedding: nn.Module, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"{text!r} gives no tokens to initialise a new token from")
    weight = embedding.weight
    assert isinstance(weight, torch.Tensor)
    return weight[torch.tensor(ids, device=weight.device)].float().mean(0)


def _caption_ids(
    tokenizer: Any,
    class_names: Sequence[str],
    per_class: Mapping[str, str],
    config: TextualInversionConfig,
) -> torch.Tensor:
    """Token ids ``[classes, captions, variants, max_length]``; variant 0 has the style token,
    variant 1 (with per-class tokens) the class's own token."""
    texts = []
    for name in class_names:
        tokens = [config.style_token, per_class[name]] if per_class else [config.style_token]
        for caption in config.captions:
            texts += [caption.format(cls=name, token=token) for token in tokens]
    ids = tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.view(len(class_names), len(config.captions), 2 if per_class else 1, -1)


def _to_pixels(image: Image.Image, resolution: int, flip: bool) -> torch.Tensor:
    """PIL image -> ``[3, resolution, resolution]`` in ``[-1, 1]`` (shorter side, centre crop)."""
    fitted = ImageOps.fit(image.convert("RGB"), (resolution, resolution), Image.Resampling.BICUBIC)
    if flip:
        fitted = ImageOps.mirror(fitted)
    array = np.asarray(fitted, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


@contextlib.contextmanager
def _frozen(*modules: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients while active; both restored afterwards."""
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    modes = [(m, m.training) for m in modules]
    try:
        for module in modules:
            module.requires_grad_(False)
            module.eval()
        yield
    finally:
        for param, flag in saved:
            param.requires_grad_(flag)
        for module, training in modes:
            module.train(training)


@contextlib.contextmanager
def _substitute_rows(
    embedding: nn.Module, token_ids: torch.Tensor, rows: torch.Tensor
) -> Iterator[None]:
    """While active, ``embedding(ids)`` gives ``rows[k]`` wherever ``ids == token_ids[k]``.

    The new ids may lie beyond the embedding matrix: the pre-hook replaces them by id 0 before
    the lookup, and the forward hook puts the learned rows in their place.
    """
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def before(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        ids = args[0]
        match = ids.unsqueeze(-1) == token_ids
        is_new = match.any(-1)
        pending.append((is_new, match.int().argmax(-1)))
        return (ids.masked_fill(is_new, 0), *args[1:])

    def after(_: nn.Module, __: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        is_new, slot = pending.pop()
        return torch.where(is_new.unsqueeze(-1), rows[slot].to(output.dtype), output)

    handles = [
        embedding.register_forward_pre_hook(before),
        embedding.register_forward_hook(after),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _check_tokens(tokens: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    if len(tokens) == 0:
        raise ValueError(f"{where}: no tokens")
    result: dict[str, torch.Tensor] = {}
    width = None
    for name, tensor in tokens.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{where}: tokens must map names to tensors, got {name!r}")
        vector = tensor[0] if tensor.dim() == 2 and tensor.shape[0] == 1 else tensor
        if vector.dim() != 1 or not vector.is_floating_point():
            raise ValueError(
                f"{where}: token {name!r} must be a float [D] vector, got {tensor.dtype} "
                f"{tuple(tensor.shape)}"
            )
        if width is not None and vector.shape[0] != width:
            raise ValueError(f"{where}: token {name!r} has {vector.shape[0]} dims, others {width}")
        width = vector.shape[0]
        result[name] = vector
    return result


def _saved_order(data: bytes) -> list[str] | None:
    """The token order :func:`save_tokens` put in the safetensors header, if any.

    The format starts with an 8-byte little-endian header length and a JSON header whose
    ``__metadata__`` holds string metadata.
    """
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
        order = json.loads(header["__metadata__"][_ORDER_KEY])
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(order, list) or not all(isinstance(name, str) for name in order):
        return None
    return order
