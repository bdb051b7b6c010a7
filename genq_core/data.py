"""Image inputs: the classifier's preprocessing, image folders and tensor files.

A classifier's preprocessing (input size, mean/std, interpolation, crop) travels with it as a
:class:`Preprocessing`; every image the library feeds a classifier goes through it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file
from timm.data import create_transform, resolve_data_config
from torch import nn

__all__ = [
    "IMAGE_SUFFIXES",
    "Preprocessing",
    "load_image_folder",
    "load_labelled_image_folder",
    "load_tensor_file",
    "repeat_in_turn",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Preprocessing:
    """How a classifier expects its input images.

    Attributes:
        input_size: ``(C, H, W)``; ``C`` is 1 (grayscale) or 3 (RGB).
        mean, std: per-channel normalisation of ``[0, 1]`` pixel values.
        interpolation: resize filter (``bilinear``, ``bicubic``, ``nearest``).
        crop_pct: resize the shorter side to ``H / crop_pct``, then centre-crop ``H x W``.
    """

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        channels, height, width = self.input_size
        if channels not in (1, 3) or height < 1 or width < 1:
            raise ValueError(f"input_size must be (1 or 3, H, W), got {self.input_size}")
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"mean and std need {channels} values for {channels} channels, "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"unknown interpolation {self.interpolation!r}")

    @classmethod
    def from_model(cls, model: nn.Module, overrides: dict[str, Any] | None = None) -> Preprocessing:
        """timm's data config of ``model`` (its ``pretrained_cfg``), with ``overrides`` applied."""
        config = resolve_data_config(dict(overrides or {}), model=model)
        return cls(
            input_size=tuple(config["input_size"]),
            mean=tuple(float(m) for m in config["mean"]),
            std=tuple(float(s) for s in config["std"]),
            interpolation=str(config.get("interpolation", "bilinear")),
            crop_pct=float(config.get("crop_pct", 1.0)),
        )

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image -> normalised ``[C, H, W]`` float tensor."""
        timm_transform = create_transform(
            input_size=self.input_size,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            crop_pct=self.crop_pct,
        )
        mode = "L" if self.input_size[0] == 1 else "RGB"

        def apply(image: Image.Image) -> torch.Tensor:
            result = timm_transform(image.convert(mode))
            assert isinstance(result, torch.Tensor)
            return result

        return apply

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` pixels in ``[0, 1]`` -> normalised tensor."""
        mean = torch.tensor(self.mean, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, -1, 1, 1)
        return (pixels - mean) / std


def load_image_folder(
    folder: str | Path, preprocessing: Preprocessing, limit: int | None = None
) -> torch.Tensor:
    """Every image below ``folder`` (sorted, recursive), preprocessed: ``[N, C, H, W]``.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: no images, or a file that is not a readable image (named).
    """
    files = _image_files(Path(folder))
    if limit is not None:
        files = files[:limit]
    return _load_images(files, preprocessing)


def load_labelled_image_folder(
    folder: str | Path, preprocessing: Preprocessing, class_names: Sequence[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """An ImageNet-style folder (one sub-folder per class): images, labels and class names.

    Classes are the sorted sub-folder names unless ``class_names`` gives the order.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    names = (
        list(class_names) if class_names else sorted(p.name for p in root.iterdir() if p.is_dir())
    )
    if not names:
        raise ValueError(f"{root} has no class sub-folders")
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(names):
        class_dir = root / name
        if not class_dir.is_dir():
            raise ValueError(f"class folder {class_dir} does not exist")
        class_files = _image_files(class_dir, allow_empty=True)
        files += class_files
        labels += [index] * len(class_files)
    if not files:
        raise ValueError(f"no images found under {root}")
    return _load_images(files, preprocessing), torch.tensor(labels), names


def load_tensor_file(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images (and labels, if present) from a ``.safetensors`` or ``.pt`` file.

    The file holds either one tensor ``[N, C, H, W]`` or a mapping with ``images`` and optionally
    ``labels``. ``.pt`` files are loaded with ``weights_only=True`` (no code is unpickled).
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"tensor file {file} does not exist")
    try:
        if file.suffix == ".safetensors":
            content: object = load_file(str(file))
        else:
            content = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read tensor file {file}: {err}") from err
    if isinstance(content, torch.Tensor):
        images, labels = content, None
    elif isinstance(content, dict) and isinstance(content.get("images"), torch.Tensor):
        images, labels = content["images"], content.get("labels")
    else:
        raise ValueError(f"{file} must hold a tensor or a mapping with an 'images' tensor")
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(
            f"{file}: images must be a float [N, C, H, W] tensor, got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.shape != (images.shape[0],):
            raise ValueError(f"{file}: labels must be a [N] tensor matching the images")
        labels = labels.long()
    return images.float(), labels


def repeat_in_turn(images: torch.Tensor, count: int) -> torch.Tensor:
    """The rows of ``images`` taken in turn (first, second, ..., first again) until there are
    ``count`` of them; each row once if there are already that many."""
    count = max(count, images.shape[0])
    return images[torch.arange(count) % images.shape[0]]


def _image_files(root: Path, allow_empty: bool = False) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files and not allow_empty:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
    return files


def _load_images(files: list[Path], preprocessing: Preprocessing) -> torch.Tensor:
    transform = preprocessing.transform()
    tensors = []
    for file in files:
        try:
            with Image.open(file) as image:
                image.load()
                tensors.append(transform(image))
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{file} is not a readable image: {err}") from err
    logger.info("loaded %d images", len(tensors))
    return torch.stack(tensors)
