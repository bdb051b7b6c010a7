"""Tests for genq_core.bench.fashion_mnist (IDX parsing, splits, normalization)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from genq_core.bench import fashion_mnist as fm


def test_load_split_plain_idx(tmp_path: Path) -> None:
    images, labels = _synthetic(n=12, seed=1)
    _write_split(tmp_path, "test", images, labels, gz=False)
    x, y = fm.load_split("test", root=tmp_path)
    assert x.dtype == torch.uint8
    assert x.shape == (12, 28, 28)
    assert y.dtype == torch.int64
    assert y.shape == (12,)
    assert torch.equal(x, torch.from_numpy(images))
    assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))


def test_load_split_gzip_idx(tmp_path: Path) -> None:
    images, labels = _synthetic(n=7, seed=2)
    _write_split(tmp_path, "train", images, labels, gz=True)
    x, y = fm.load_split("train", root=tmp_path)
    assert torch.equal(x, torch.from_numpy(images))
    assert y.tolist() == labels.tolist()


def test_env_var_overrides_default_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = _synthetic(n=3, seed=3)
    _write_split(tmp_path, "test", images, labels, gz=True)
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path))
    assert fm.resolve_root() == tmp_path
    x, _ = fm.load_split("test")
    assert x.shape == (3, 28, 28)


def test_missing_dir_raises_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as info:
        fm.load_split("test", root=missing)
    assert str(missing) in str(info.value)
    assert not fm.dataset_available(missing)


def test_bad_magic_raises_value_error_naming_file(tmp_path: Path) -> None:
    images, labels = _synthetic(n=4, seed=4)
    _write_split(tmp_path, "test", images, labels, gz=False)
    bad = tmp_path / "t10k-images-idx3-ubyte"
    raw = bytearray(bad.read_bytes())
    raw[2:4] = b"\x08\x01"  # labels magic in an images file
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="magic") as info:
        fm.load_split("test", root=tmp_path)
    assert str(bad) in str(info.value)


def test_truncated_file_raises_value_error_naming_file(tmp_path: Path) -> None:
    images, labels = _synthetic(n=4, seed=5)
    _write_split(tmp_path, "test", images, labels, gz=True)
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(gzip.decompress(bad.read_bytes())[:-1]))
    with pytest.raises(ValueError, match="data bytes") as info:
        fm.load_split("test", root=tmp_path)
    assert str(bad) in str(info.value)


def test_not_gzip_raises_value_error_naming_file(tmp_path: Path) -> None:
    images, labels = _synthetic(n=4, seed=6)
    _write_split(tmp_path, "test", images, labels, gz=True)
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(b"this is not gzip data")
    with pytest.raises(ValueError, match="cannot read") as info:
        fm.load_split("test", root=tmp_path)
    assert str(bad) in str(info.value)


def test_count_mismatch_and_label_range(tmp_path: Path) -> None:
    images, labels = _synthetic(n=5, seed=7)
    _write_split(tmp_path, "test", images, labels[:4], gz=False)
    with pytest.raises(ValueError, match="labels"):
        fm.load_split("test", root=tmp_path)
    labels_bad = labels.copy()
    labels_bad[0] = 10
    _write_split(tmp_path, "test", images, labels_bad, gz=False)
    with pytest.raises(ValueError, match="out of range"):
        fm.load_split("test", root=tmp_path)


def test_unknown_split_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'val'"):
        fm.load_split("val", root=tmp_path)  # type: ignore[arg-type]


def test_split_is_disjoint_stratified_and_complete() -> None:
    labels = torch.arange(10).repeat_interleave(100)[torch.randperm(1000)]
    split = fm.split_train_indices(labels, seed=0, classifier_fraction=0.5, kshot_per_class=20)
    parts = [split.classifier, split.generator, split.kshot]
    for part in parts:
        assert part.dtype == torch.int64
    combined = torch.cat(parts)
    assert combined.numel() == 1000
    assert torch.equal(torch.sort(combined).values, torch.arange(1000))
    assert torch.equal(torch.bincount(labels[split.kshot], minlength=10), torch.full((10,), 20))
    assert torch.equal(
        torch.bincount(labels[split.classifier], minlength=10), torch.full((10,), 40)
    )
    assert torch.equal(torch.bincount(labels[split.generator], minlength=10), torch.full((10,), 40))


def test_split_deterministic_per_seed() -> None:
    labels = torch.arange(10).repeat(60)
    a = fm.split_train_indices(labels, seed=3)
    b = fm.split_train_indices(labels, seed=3)
    c = fm.split_train_indices(labels, seed=4)
    for name in ("classifier", "generator", "kshot"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.kshot, c.kshot)
    assert not torch.equal(a.classifier, c.classifier)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"classifier_fraction": 1.5}, "classifier_fraction"),
        ({"classifier_fraction": -0.1}, "classifier_fraction"),
        ({"kshot_per_class": -1}, "kshot_per_class"),
        ({"kshot_per_class": 1000}, "kshot_per_class"),
    ],
)
def test_split_rejects_bad_arguments(kwargs: dict[str, float], match: str) -> None:
    labels = torch.arange(10).repeat(5)
    with pytest.raises(ValueError, match=match):
        fm.split_train_indices(labels, **kwargs)  # type: ignore[arg-type]


def test_to_float_images_and_normalize() -> None:
    x = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)
    f = fm.to_float_images(x)
    assert f.dtype == torch.float32
    assert f.shape == (1, 1, 2, 2)
    assert f.min() == 0.0
    assert f.max() == 1.0
    n = fm.normalize(f)
    assert torch.allclose(n[0, 0, 0, 0], torch.tensor(-fm.MEAN[0] / fm.STD[0]))
    with pytest.raises(ValueError, match="uint8"):
        fm.to_float_images(f[:, 0])
    with pytest.raises(ValueError, match="shape"):
        fm.normalize(f[0])


def test_class_names() -> None:
    assert len(fm.CLASS_NAMES) == 10
    assert fm.CLASS_NAMES[0] == "T-shirt/top"
    assert fm.CLASS_NAMES[9] == "ankle boot"


@pytest.mark.skipif(not fm.dataset_available(), reason="dataset-fashion-mnist not installed")
def test_real_test_split() -> None:
    x, y = fm.load_split("test")
    assert x.shape == (10_000, 28, 28)
    assert x.dtype == torch.uint8
    assert y.shape == (10_000,)
    assert y.dtype == torch.int64
    assert int(y.min()) == 0
    assert int(y.max()) == 9
    assert torch.equal(torch.bincount(y), torch.full((10,), 1000))


def _synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images [n, 28, 28] and uint8 labels [n] in 0..9."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
    return images, labels


def _idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an unsigned-byte IDX file."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_split(root: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    """Write a split's two IDX files (gzipped or plain) into ``root``."""
    prefix = "train" if split == "train" else "t10k"
    root.mkdir(parents=True, exist_ok=True)
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        path = root / f"{prefix}-{kind}-ubyte"
        data = _idx_bytes(array)
        if gz:
            path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
        else:
            path.write_bytes(data)


def test_garment_intensity_averages_the_pixels_above_the_background() -> None:
    pixels = torch.zeros(3, 1, 4, 4)
    pixels[0, 0, :2, :2] = 0.5  # four garment pixels at 0.5
    pixels[1, 0, 0, :2] = torch.tensor([1.0, 0.6])
    pixels[1, 0, 3, 3] = 0.05  # background noise, below the threshold
    assert fm.garment_intensity(pixels).tolist() == pytest.approx([0.5, 0.8, 0.0])
    assert fm.garment_intensity(pixels, threshold=0.7).tolist() == pytest.approx([0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="float"):
        fm.garment_intensity(torch.zeros(1, 1, 4, 4, dtype=torch.uint8))
