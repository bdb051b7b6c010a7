"""Optional filter: CLIP image-text agreement (open_clip).

The score of an image is the cosine similarity between its CLIP image embedding and the CLIP
text embedding of its prompt (usually the prompt it was generated from, or "a photo of a
{class}"): higher means the image shows what the prompt asks for. Scores lie in ``[-1, 1]``;
trained CLIP models give matching pairs roughly 0.25-0.35.

CLIP sees the generated pixels, not the classifier's preprocessed tensors: pass PIL images or
``[N, 3 or 1, H, W]`` tensors with values in ``[0, 1]``; CLIP's own resize, crop and
normalisation are applied here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from genq_core.filters._common import FilterCanceled, check_batch_size, resolve_indices
from genq_core.progress import ProgressFn, StopFn, check_stop

__all__ = ["ClipModel", "ClipImages", "clip_scores", "load_clip"]

logger = logging.getLogger(__name__)

ClipImages = Sequence[Image.Image] | torch.Tensor
"""PIL images, or a float ``[N, C, H, W]`` tensor (``C`` 1 or 3) of pixels in ``[0, 1]``."""

_LOCAL_DIR = "local-dir:"
_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth")


@dataclass(frozen=True)
class ClipModel:
    """An open_clip model ready for scoring; load it once with :func:`load_clip` and reuse it.

    Attributes:
        model: the CLIP model in eval mode on ``device``.
        preprocess: PIL image -> ``[3, S, S]`` tensor with CLIP's resize, crop, normalisation.
        tokenizer: list of strings -> ``[N, context_length]`` token ids.
        name, pretrained: what it was built from.
        has_weights: False when the weights are random (``pretrained=None`` and no weights file in
            a ``local-dir:`` folder); its scores then mean nothing, which reports should say.
        device: where it runs.
    """

    model: nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    name: str
    pretrained: str | None
    has_weights: bool
    device: torch.device

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm float32 text embeddings ``[len(prompts), D]`` on ``device``."""
        encode: Callable[..., torch.Tensor] = getattr(self.model, "encode_text")  # noqa: B009
        return encode(self.tokenizer(prompts).to(self.device), normalize=True).float()

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        """Unit-norm float32 image embeddings ``[len(images), D]`` on ``device``."""
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        encode: Callable[..., torch.Tensor] = getattr(self.model, "encode_image")  # noqa: B009
        return encode(pixels, normalize=True).float()


def load_clip(
    model_name: str, pretrained: str | None = None, device: str | torch.device = "cpu"
) -> ClipModel:
    """Build an open_clip model and its preprocessing and tokenizer.

    Args:
        model_name: an open_clip architecture (``open_clip.list_models()``, e.g. ``"ViT-B-32"``),
            ``"local-dir:/path"`` (a folder with ``open_clip_config.json`` and optionally its
            weights) or ``"hf-hub:org/repo"``.
        pretrained: for an architecture name, a pretrained tag (``"openai"``, downloaded on first
            use) or a local weights file; ``None`` gives random weights (tests only).
        device: where the model runs.

    Raises:
        ValueError: an unknown architecture, a missing folder, or an unknown tag / missing file.
    """
    import open_clip  # heavy (pulls in transformers): only when CLIP is really used

    # 1. check inputs before open_clip turns them into downloads or generic errors
    target = torch.device(device)
    if model_name.startswith(_LOCAL_DIR):
        folder = Path(model_name[len(_LOCAL_DIR) :])
        if not (folder / "open_clip_config.json").is_file():
            raise ValueError(f"clip model folder {folder} has no open_clip_config.json")
        has_weights = any(p.suffix in _CHECKPOINT_SUFFIXES for p in folder.iterdir())
    elif model_name.startswith("hf-hub:"):
        has_weights = True
    else:
        if model_name not in open_clip.list_models():
            raise ValueError(
                f"clip model {model_name!r} is not an open_clip architecture; "
                "see open_clip.list_models(), or use 'local-dir:/path'"
            )
        has_weights = pretrained is not None
        if pretrained is not None and not os.path.isfile(pretrained):
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            if pretrained not in tags:
                raise ValueError(
                    f"clip pretrained {pretrained!r} is neither a weights file nor a tag of "
                    f"{model_name!r} (tags: {tags})"
                )

    # 2. build
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained, device=target
    )
    if not has_weights:
        logger.warning("clip model %s has random weights: its scores are meaningless", model_name)
    return ClipModel(
        model=model.eval(),
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(model_name),
        name=model_name,
        pretrained=pretrained,
        has_weights=has_weights,
        device=target,
    )


@torch.no_grad()
def clip_scores(
    images: ClipImages,
    prompts: Sequence[str],
    model_name: str = "ViT-B-32",
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    *,
    clip: ClipModel | None = None,
    batch_size: int = 64,
    indices: torch.Tensor | None = None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> torch.Tensor:
    """Cosine similarity between each image and its prompt in CLIP's embedding space.

    Args:
        images: ``N`` PIL images or a float ``[N, C, H, W]`` tensor of pixels in ``[0, 1]``.
        prompts: ``N`` strings, one per image (repeated prompts are encoded once).
        model_name, pretrained, device: passed to :func:`load_clip` unless ``clip`` is given.
        clip: an already loaded model (the model name arguments are then ignored).
        indices: rows to score (default all).

    Returns:
        float32 ``[len(indices)]`` similarities in ``[-1, 1]`` on the CPU; higher = keep.

    Raises:
        ValueError: images and prompts of different lengths, tensors outside ``[0, 1]``.
        FilterCanceled: ``should_stop()`` returned True between batches.
    """
    # 1. check inputs
    check_batch_size(batch_size)
    count = _count_images(images)
    if len(prompts) != count:
        raise ValueError(f"prompts must give one string per image: {len(prompts)} for {count}")
    rows = resolve_indices(count, indices)
    scorer = clip if clip is not None else load_clip(model_name, pretrained, device)

    # 2. text embeddings, once per distinct prompt
    wanted = sorted({prompts[int(i)] for i in rows})
    text: dict[str, torch.Tensor] = {}
    for start in range(0, len(wanted), batch_size):
        chunk = wanted[start : start + batch_size]
        text.update(zip(chunk, scorer.encode_text(chunk), strict=True))

    # 3. image embeddings batch by batch, dotted with their prompt's embedding
    scores: list[torch.Tensor] = []
    done = 0
    for batch in torch.split(rows, batch_size):
        check_stop(should_stop, "clip_scores", FilterCanceled)
        encoded = scorer.encode_images([_pil(images, int(i)) for i in batch])
        targets = torch.stack([text[prompts[int(i)]] for i in batch])
        scores.append((encoded * targets).sum(dim=1).cpu())
        done += batch.numel()
        if on_progress is not None:
            on_progress("filter:clip", done, rows.numel())
    return torch.cat(scores) if scores else torch.zeros(0)


def _count_images(images: ClipImages) -> int:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] not in (1, 3) or not images.is_floating_point():
            raise ValueError(
                f"clip images must be a float [N, 1 or 3, H, W] tensor, got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        if images.numel() and (float(images.min()) < -1e-3 or float(images.max()) > 1 + 1e-3):
            raise ValueError(
                "clip images must be pixels in [0, 1] (not the classifier's normalised input), "
                f"got values in [{float(images.min()):.3g}, {float(images.max()):.3g}]"
            )
        return images.shape[0]
    for position, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ValueError(
                f"clip images[{position}] is a {type(image).__name__}, not a PIL image"
            )
    return len(images)


def _pil(images: ClipImages, index: int) -> Image.Image:
    """Image ``index`` as a PIL image (tensors are rounded to 8-bit pixels like a saved PNG)."""
    if not isinstance(images, torch.Tensor):
        return images[index]
    pixels = (images[index].detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    if pixels.shape[0] == 1:
        return Image.fromarray(pixels[0].numpy())
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())
