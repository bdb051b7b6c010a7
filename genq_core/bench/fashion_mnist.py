"""Fashion-MNIST loading, fixed data splits and normalization.

The data comes from the Debian package ``dataset-fashion-mnist``, which installs the
original gzipped IDX files under ``/usr/share/datasets/fashion-mnist``. Another directory
can be selected with the environment variable ``GENQ_FASHION_MNIST_DIR`` or the ``root``
argument of :func:`load_split`; plain (uncompressed) IDX files are accepted as well.
"""

from __future__ import annotations

import gzip
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_ROOT",
    "ENV_VAR",
    "MEAN",
    "STD",
    "TrainSplit",
    "dataset_available",
    "garment_intensity",
    "load_split",
    "normalize",
    "resolve_root",
    "split_train_indices",
    "to_float_images",
]

logger = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
"""Where ``apt-get install dataset-fashion-mnist`` puts the IDX files."""

ENV_VAR = "GENQ_FASHION_MNIST_DIR"
"""Environment variable that overrides :data:`DEFAULT_ROOT`."""

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
"""Class names, indexed by label (0..9)."""

MEAN = (0.2860,)
"""Pixel mean of the 60k training images scaled to [0, 1] (measured 0.286041)."""

STD = (0.3530,)
"""Pixel standard deviation of the 60k training images in [0, 1] (measured 0.353024)."""

IMAGE_SIZE = 28
NUM_CLASSES = len(CLASS_NAMES)

_FILE_STEMS: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_EXPECTED_COUNT = {"train": 60_000, "test": 10_000}
_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


@dataclass(frozen=True)
class TrainSplit:
    """Disjoint index sets into the 60k Fashion-MNIST training images.

    Attributes:
        classifier: int64 [N_c] indices used to train the full-precision classifier.
        generator: int64 [N_g] indices reserved for generator / calibration experiments.
        kshot: int64 [num_classes * kshot_per_class] indices of the few-shot pool.
    """

    classifier: torch.Tensor
    generator: torch.Tensor
    kshot: torch.Tensor


def resolve_root(root: Path | None = None) -> Path:
    """Return the dataset directory: ``root``, else ``$GENQ_FASHION_MNIST_DIR``, else default."""
    if root is not None:
        return Path(root)
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return DEFAULT_ROOT


def dataset_available(root: Path | None = None) -> bool:
    """True if all four IDX files (plain or ``.gz``) exist under the resolved root."""
    directory = resolve_root(root)
    stems = [stem for pair in _FILE_STEMS.values() for stem in pair]
    return all(_find_file(directory, stem) is not None for stem in stems)


def load_split(
    split: Literal["train", "test"], root: Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one Fashion-MNIST split from IDX files.

    Args:
        split: ``"train"`` (60k images) or ``"test"`` (10k images).
        root: directory holding the IDX files; defaults to :func:`resolve_root`.

    Returns:
        ``(images, labels)``: uint8 [N, 28, 28] with values in 0..255, and int64 [N] in 0..9.

    Raises:
        FileNotFoundError: if an IDX file is missing.
        ValueError: if ``split`` is unknown or a file is corrupt (bad magic number, wrong
            size, label out of range, image/label counts disagree).
    """
    if split not in _FILE_STEMS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = resolve_root(root)
    images_stem, labels_stem = _FILE_STEMS[split]
    images_path = _require_file(directory, images_stem)
    labels_path = _require_file(directory, labels_stem)

    images = _read_idx(images_path, _IMAGES_MAGIC)
    labels = _read_idx(labels_path, _LABELS_MAGIC)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            f"{images_path}: expected images of shape {IMAGE_SIZE}x{IMAGE_SIZE}, "
            f"got {images.shape[1:]}"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has "
            f"{labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise ValueError(f"{labels_path}: label {int(labels.max())} out of range 0..9")
    expected = _EXPECTED_COUNT[split]
    if images.shape[0] != expected:
        logger.warning(
            "%s split under %s has %d examples (the official one has %d)",
            split,
            directory,
            images.shape[0],
            expected,
        )
    logger.debug("loaded %s split from %s: %d examples", split, directory, images.shape[0])
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def split_train_indices(
    labels: torch.Tensor,
    seed: int = 0,
    classifier_fraction: float = 0.5,
    kshot_per_class: int = 20,
) -> TrainSplit:
    """Seeded, stratified, disjoint split of the training indices.

    For each class (in label order) the class's indices are permuted with a
    ``torch.Generator`` seeded by ``seed``; the first ``kshot_per_class`` go to the k-shot
    pool, and of the rest the first ``round(classifier_fraction * rest)`` go to the
    classifier part and the remainder to the generator part. Every index lands in
    exactly one part. Each returned index tensor is sorted ascending.

    Args:
        labels: int [N] class labels in ``0..C-1`` (e.g. the 60k training labels).
        seed: seed of the permutation; the same seed gives the same split.
        classifier_fraction: fraction in [0, 1] of the non-k-shot examples per class given
            to the classifier part.
        kshot_per_class: examples per class in the k-shot pool (>= 0).

    Returns:
        A :class:`TrainSplit` of int64 index tensors.

    Raises:
        ValueError: on bad arguments, or when a class has fewer than ``kshot_per_class``
            examples.
    """
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if not 0.0 <= classifier_fraction <= 1.0:
        raise ValueError(f"classifier_fraction must be in [0, 1], got {classifier_fraction}")
    if kshot_per_class < 0:
        raise ValueError(f"kshot_per_class must be >= 0, got {kshot_per_class}")

    labels = labels.detach().cpu().to(torch.int64)
    generator = torch.Generator().manual_seed(seed)
    classifier_parts: list[torch.Tensor] = []
    generator_parts: list[torch.Tensor] = []
    kshot_parts: list[torch.Tensor] = []
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls, as_tuple=False).flatten()
        if members.numel() < kshot_per_class:
            raise ValueError(
                f"class {cls} has {members.numel()} examples, fewer than "
                f"kshot_per_class={kshot_per_class}"
            )
        members = members[torch.randperm(members.numel(), generator=generator)]
        kshot_parts.append(members[:kshot_per_class])
        rest = members[kshot_per_class:]
        n_classifier = round(classifier_fraction * rest.numel())
        classifier_parts.append(rest[:n_classifier])
        generator_parts.append(rest[n_classifier:])

    return TrainSplit(
        classifier=_sorted_cat(classifier_parts),
        generator=_sorted_cat(generator_parts),
        kshot=_sorted_cat(kshot_parts),
    )


def to_float_images(images_uint8: torch.Tensor) -> torch.Tensor:
    """Convert uint8 images [N, 28, 28] (0..255) to float32 [N, 1, 28, 28] in [0, 1]."""
    if images_uint8.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got dtype {images_uint8.dtype}")
    if images_uint8.ndim != 3:
        raise ValueError(f"images must have shape [N, H, W], got {tuple(images_uint8.shape)}")
    return images_uint8.unsqueeze(1).to(torch.float32).div_(255.0)


def garment_intensity(pixels: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Per image, the mean of the pixels above ``threshold`` (the garment, not the background).

    Args:
        pixels: float ``[N, C, H, W]`` in [0, 1].
        threshold: pixels at or below it count as background.

    Returns:
        float ``[N]``; 0 for an image with no pixel above ``threshold``.
    """
    if pixels.ndim != 4 or not pixels.dtype.is_floating_point:
        raise ValueError(
            f"pixels must be float [N, C, H, W], got {pixels.dtype} {tuple(pixels.shape)}"
        )
    flat = pixels.flatten(1)
    mask = flat > threshold
    return (flat * mask).sum(1) / mask.sum(1).clamp(min=1)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Standardize float images [N, 1, H, W] in [0, 1] with :data:`MEAN` / :data:`STD`.

    Returns a new float tensor of the same shape, roughly zero-mean and unit-variance.
    """
    if x.ndim != 4 or x.shape[1] != len(MEAN):
        raise ValueError(f"x must have shape [N, {len(MEAN)}, H, W], got {tuple(x.shape)}")
    mean = torch.tensor(MEAN, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def _find_file(directory: Path, stem: str) -> Path | None:
    """Return ``directory/stem`` or ``directory/stem.gz``, whichever exists first."""
    for name in (stem, f"{stem}.gz"):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def _require_file(directory: Path, stem: str) -> Path:
    """Like :func:`_find_file` but raise a helpful FileNotFoundError when absent."""
    found = _find_file(directory, stem)
    if found is None:
        raise FileNotFoundError(
            f"Fashion-MNIST file {directory / stem}(.gz) not found. Install the data with "
            f"`apt-get install dataset-fashion-mnist` (files go to {DEFAULT_ROOT}) or set "
            f"{ENV_VAR} to a directory holding the IDX files."
        )
    return found


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file (plain or gzip) into a uint8 array of its shape."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot read IDX file ({exc})") from exc

    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x}"
        )
    ndim = expected_magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    n_items = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header_len != n_items:
        raise ValueError(
            f"{path}: IDX header declares shape {shape} ({n_items} bytes) but the file has "
            f"{len(raw) - header_len} data bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


def _sorted_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate int64 index tensors and sort ascending (empty list -> empty tensor)."""
    if not parts:
        return torch.empty(0, dtype=torch.int64)
    return torch.sort(torch.cat(parts)).values
