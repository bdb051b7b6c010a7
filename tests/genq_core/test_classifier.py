from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

import genq_core.classifier as classifier_module
from genq_core.classifier import (
    ClassifierConfig,
    PreprocessingOverrides,
    imagenet_class_names,
    load,
    load_classifier,
)
from genq_core.configio import from_dict

ARCH = "resnet10t"
NAMES = ("cat", "dog", "fox")


class SmallNet(nn.Module):
    """conv-bn-relu, pooled, linear head: a tiny classifier for any input size."""

    def __init__(self, num_classes: int = 3, in_chans: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def small_net() -> nn.Module:
    """A ``module:function`` builder target for the tests."""
    torch.manual_seed(0)
    return SmallNet()


@pytest.fixture
def resnet_file(tmp_path: Path) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=3).eval()
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path


def _export(model: nn.Module, example: torch.Tensor, path: Path, dynamic: bool = True) -> Path:
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=shapes), path)
    return path


def test_weights_source_loads_arch_with_preprocessing_and_names(
    resnet_file: tuple[nn.Module, Path],
) -> None:
    model, path = resnet_file
    loaded = load(
        ClassifierConfig(
            source="weights",
            name=ARCH,
            weights=path,
            class_names=NAMES,
            preprocessing=PreprocessingOverrides(input_size=(3, 32, 32), crop_pct=0.875),
        )
    )
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.model(images), model(images))
    assert not loaded.model.training
    assert loaded.preprocessing.input_size == (3, 32, 32)
    assert loaded.preprocessing.crop_pct == 0.875
    assert loaded.preprocessing.mean == pytest.approx((0.485, 0.456, 0.406))  # timm's config
    assert loaded.class_names == list(NAMES) and loaded.num_classes == 3


def test_grayscale_model_gets_one_channel_preprocessing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=2, in_chans=1)
    save_file(model.state_dict(), str(tmp_path / "gray.safetensors"))
    config = from_dict(
        ClassifierConfig,
        {
            "source": "weights",
            "name": ARCH,
            "weights": str(tmp_path / "gray.safetensors"),
            "in_chans": 1,
            "class_names": ["a", "b"],
            "preprocessing": {"input_size": [1, 28, 28]},
        },
    )
    loaded = load(config)
    assert loaded.preprocessing.input_size == (1, 28, 28)
    assert loaded.preprocessing.mean == (0.5,) and loaded.preprocessing.std == (0.5,)


def test_builder_callable_and_module_function_with_weights(tmp_path: Path) -> None:
    model = small_net().eval()
    path = tmp_path / "small.pt"
    torch.save(model.state_dict(), path)
    overrides = PreprocessingOverrides(input_size=(3, 16, 16))

    from_callable = load(
        ClassifierConfig(source="builder", class_names=NAMES, preprocessing=overrides),
        builder=SmallNet,
    )
    named = load(
        ClassifierConfig(
            source="builder",
            name=f"{__name__}:small_net",
            weights=path,
            class_names=NAMES,
            preprocessing=overrides,
        )
    )
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(named.model(images), model(images))
    assert from_callable.model(images).shape == (2, 3)


def test_1000_class_model_gets_imagenet_names() -> None:
    loaded = load(
        ClassifierConfig(source="builder", preprocessing=PreprocessingOverrides((3, 8, 8))),
        builder=lambda: SmallNet(num_classes=1000),
    )
    assert loaded.class_names == imagenet_class_names()
    assert loaded.class_names[:2] == ["tench", "goldfish"] and len(loaded.class_names) == 1000


def test_export_source_takes_input_size_from_the_archive(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SmallNet(num_classes=3, in_chans=1).eval()
    path = _export(model, torch.randn(2, 1, 20, 20), tmp_path / "model.pt2")
    loaded = load(ClassifierConfig(source="export", weights=path, class_names=NAMES))

    assert loaded.preprocessing.input_size == (1, 20, 20)
    assert loaded.preprocessing.mean == (0.5,)
    assert isinstance(loaded.model, torch.fx.GraphModule)
    assert isinstance(loaded.model.get_submodule("conv"), nn.Conv2d)
    assert isinstance(loaded.model.get_submodule("bn"), nn.BatchNorm2d)
    images = torch.randn(5, 1, 20, 20)
    torch.testing.assert_close(loaded.model(images), model(images))


def test_static_batch_export_is_a_clear_error(tmp_path: Path) -> None:
    path = _export(SmallNet().eval(), torch.randn(2, 3, 8, 8), tmp_path / "s.pt2", dynamic=False)
    with pytest.raises(ValueError, match="dynamic batch dimension"):
        load(ClassifierConfig(source="export", weights=path, class_names=NAMES))


def test_pickle_needs_trust(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(SmallNet(), path)
    with pytest.raises(ValueError, match="trust_pickle: source 'pickle' needs trust_pickle"):
        ClassifierConfig(source="pickle", weights=path)
    loaded = load(
        ClassifierConfig(
            source="pickle",
            weights=path,
            trust_pickle=True,
            class_names=NAMES,
            preprocessing=PreprocessingOverrides(input_size=(3, 8, 8)),
        )
    )
    assert loaded.model(torch.zeros(1, 3, 8, 8)).shape == (1, 3)


def test_timm_hub_failure_suggests_local_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def offline_create_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
        calls.append({"name": name, "pretrained": pretrained, **kwargs})
        if pretrained:
            raise OSError("hub unreachable")
        return timm.create_model(name, pretrained=False, **kwargs)

    monkeypatch.setattr(classifier_module.timm, "create_model", offline_create_model)
    config = ClassifierConfig(source="timm", name=ARCH, num_classes=3)
    with pytest.raises(ValueError, match="source 'weights'") as info:
        load(config)
    assert "hub unreachable" in str(info.value)
    assert calls == [{"name": ARCH, "pretrained": True, "num_classes": 3}]
    with pytest.raises(ValueError, match="unknown timm model 'no_such_net'"):
        load(ClassifierConfig(source="timm", name="no_such_net"))


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"class_names": ("a", "b")}, ValueError, "class_names: 2 names for a model with 3"),
        ({"class_names": None}, ValueError, "class_names: the model has 3 outputs"),
        ({"num_classes": 4, "class_names": None}, ValueError, "does not fit architecture"),
        ({"name": "resnet18"}, ValueError, "does not fit architecture"),
        ({"name": "no_such_net"}, ValueError, "unknown timm architecture"),
        ({"weights": Path("missing.safetensors")}, FileNotFoundError, "does not exist"),
        (
            {"preprocessing": PreprocessingOverrides(mean=(0.1, 0.2))},
            ValueError,
            "preprocessing:",
        ),
        (
            {"preprocessing": PreprocessingOverrides(input_size=(1, 32, 32))},
            ValueError,
            "preprocessing: the model failed on a zero image of input size",
        ),
    ],
)
def test_load_errors_are_clear(
    resnet_file: tuple[nn.Module, Path],
    change: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    _, path = resnet_file
    fields: dict[str, Any] = {
        "source": "weights",
        "name": ARCH,
        "weights": path,
        "class_names": NAMES,
        "preprocessing": PreprocessingOverrides(input_size=(3, 32, 32)),
    }
    with pytest.raises(error, match=message):
        load(ClassifierConfig(**(fields | change)))


def test_output_count_is_checked_for_every_source(tmp_path: Path) -> None:
    overrides = PreprocessingOverrides(input_size=(3, 8, 8))
    with pytest.raises(ValueError, match="num_classes: the model has 3 outputs, not 5"):
        load(ClassifierConfig(source="builder", num_classes=5, preprocessing=overrides), SmallNet)
    corrupt = tmp_path / "corrupt.pt2"
    corrupt.write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="cannot read .*corrupt.pt2 as a torch.export archive"):
        load(ClassifierConfig(source="export", weights=corrupt, class_names=NAMES))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"source": "onnx"}, "source: must be one of"),
        ({"source": "timm"}, "name: source 'timm' needs a timm model name"),
        ({"source": "weights", "name": ARCH}, "weights: source 'weights' needs a file"),
        ({"source": "timm", "name": ARCH, "weights": "w.pt"}, "weights: source 'timm' fetches"),
        ({"source": "export", "name": ARCH, "weights": "m.pt2"}, "name: not used with source"),
        ({"source": "builder", "name": "no_colon"}, "name: must be 'package.module:function'"),
        (
            {"source": "weights", "name": ARCH, "weights": "w.pt", "trust_pickle": True},
            "trust_pickle: only used with source 'pickle'",
        ),
        ({"source": "timm", "name": ARCH, "in_chans": 2}, "in_chans: must be 1 or 3"),
        ({"source": "timm", "name": ARCH, "num_classes": 0}, "num_classes: must be >= 1"),
        ({"source": "timm", "name": ARCH, "class_names": ("a", "a")}, "duplicate names"),
        (
            {"source": "timm", "name": ARCH, "num_classes": 3, "class_names": ("a",)},
            "class_names: 1 names but num_classes is 3",
        ),
    ],
)
def test_config_validation_names_the_field(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClassifierConfig(**fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"input_size": (2, 8, 8)}, "input_size: must be"),
        ({"std": (0.0,)}, "std: must be positive"),
        ({"crop_pct": 1.5}, "crop_pct: must be in"),
        ({"mean": ()}, "mean: must not be empty"),
    ],
)
def test_preprocessing_overrides_are_validated(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PreprocessingOverrides(**fields)


def test_builder_argument_needs_builder_source(resnet_file: tuple[nn.Module, Path]) -> None:
    _, path = resnet_file
    config = ClassifierConfig(source="weights", name=ARCH, weights=path, class_names=NAMES)
    with pytest.raises(ValueError, match="builder: a builder callable needs source 'builder'"):
        load(config, builder=SmallNet)
    with pytest.raises(ValueError, match="exactly one of them"):
        load(ClassifierConfig(source="builder", name=f"{__name__}:small_net"), builder=SmallNet)


def test_load_classifier_still_loads_state_dicts(resnet_file: tuple[nn.Module, Path]) -> None:
    model, path = resnet_file
    loaded = load_classifier(path, ARCH)
    images = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded(images), model(images))
