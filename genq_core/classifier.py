"""Loading the float classifier to quantize, its preprocessing and its class names.

:func:`load` is the one entry point: a :class:`ClassifierConfig` names a source in a registry,

- ``"timm"``: a timm model with its pretrained weights from the hub (production machines);
- ``"weights"``: a timm architecture (or a ``module:function`` builder) plus a local weights file,
  safetensors or a state dict read with ``weights_only=True``;
- ``"export"``: a ``torch.export`` ``.pt2`` archive, whose aten graph gets its Conv2d / Linear /
  BatchNorm modules back (:func:`genq_core.quant.export_graph.modules_from_export`);
- ``"builder"``: a Python callable that returns the model, optionally with a weights file;
- ``"pickle"``: a whole pickled module, only unpickled with ``trust_pickle=True`` (unpickling runs
  arbitrary code).

The model comes back with its :class:`~genq_core.data.Preprocessing` (timm's data config, with the
config's overrides) and class names, checked against the model's number of outputs.
:func:`load_classifier` is the older file-based entry point the CLI uses.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from safetensors.torch import load_file
from timm.data import ImageNetInfo, resolve_data_config
from torch import nn

from genq_core.data import Preprocessing

__all__ = [
    "SOURCES",
    "Builder",
    "ClassifierConfig",
    "ClassifierSource",
    "LoadedClassifier",
    "PreprocessingOverrides",
    "imagenet_class_names",
    "load",
    "load_classifier",
]

ClassifierSource = Literal["timm", "weights", "export", "builder", "pickle"]
SOURCES: tuple[str, ...] = ("timm", "weights", "export", "builder", "pickle")

Builder = Callable[[], nn.Module]


@dataclass(frozen=True)
class PreprocessingOverrides:
    """Fields of :class:`~genq_core.data.Preprocessing` that replace the model's own.

    ``None`` keeps what the model's timm data config says. A 1-channel ``input_size`` without
    ``mean``/``std`` normalises with 0.5 / 0.5.
    """

    input_size: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None
    crop_pct: float | None = None

    def __post_init__(self) -> None:
        if self.input_size is not None:
            channels, height, width = self.input_size
            _require(
                channels in (1, 3) and height >= 1 and width >= 1,
                "input_size",
                f"must be (1 or 3, H, W), got {self.input_size}",
            )
        for name in ("mean", "std"):
            values = getattr(self, name)
            _require(values is None or len(values) >= 1, name, "must not be empty")
        if self.std is not None:
            _require(all(s > 0 for s in self.std), "std", f"must be positive, got {self.std}")
        if self.crop_pct is not None:
            _require(0 < self.crop_pct <= 1, "crop_pct", f"must be in (0, 1], got {self.crop_pct}")
        if self.interpolation is not None:
            _require(
                self.interpolation in ("bilinear", "bicubic", "nearest"),
                "interpolation",
                f"must be bilinear, bicubic or nearest, got {self.interpolation!r}",
            )


@dataclass(frozen=True)
class ClassifierConfig:
    """Where the float classifier comes from, and what to check about it.

    Attributes:
        source: a key of :data:`SOURCES` (see the module docstring).
        name: ``"timm"``: a timm model name (``resnet50.a1_in1k``); ``"weights"``: a timm
            architecture or a builder ``package.module:function``; ``"builder"``: a builder
            ``package.module:function`` unless the caller passes the callable to :func:`load`;
            unused by ``"export"`` and ``"pickle"``.
        weights: a local file: safetensors / state dict (``"weights"``, optional for
            ``"builder"``), a ``.pt2`` archive (``"export"``) or a pickled module (``"pickle"``).
        num_classes: passed to timm architectures and builders named by ``name``; for every
            source, the model's number of outputs must equal it.
        in_chans: input channels (1 or 3), passed like ``num_classes``; also sets the channels of
            the default input size.
        class_names: one per output; ``None`` means ImageNet's for a 1000-class model.
        preprocessing: overrides of the model's preprocessing.
        trust_pickle: allow ``"pickle"`` to unpickle ``weights`` (runs code from the file).
    """

    source: ClassifierSource = "timm"
    name: str | None = None
    weights: Path | None = None
    num_classes: int | None = None
    in_chans: int | None = None
    class_names: tuple[str, ...] | None = None
    preprocessing: PreprocessingOverrides = field(default_factory=PreprocessingOverrides)
    trust_pickle: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.weights, str):
            object.__setattr__(self, "weights", Path(self.weights))
        source = self.source
        _require(source in SOURCES, "source", f"must be one of {list(SOURCES)}, got {source!r}")
        _require(self.name is None or self.name.strip() != "", "name", "must not be empty")
        _require(
            self.name is not None or source != "timm",
            "name",
            "source 'timm' needs a timm model name",
        )
        _require(
            self.name is not None or source != "weights",
            "name",
            "source 'weights' needs a timm architecture or 'package.module:function'",
        )
        _require(
            self.name is None or source not in ("export", "pickle"),
            "name",
            f"not used with source {source!r} (the file holds the whole model)",
        )
        if source == "builder" and self.name is not None:
            _require(
                ":" in self.name, "name", f"must be 'package.module:function', got {self.name!r}"
            )
        needs_file = source in ("weights", "export", "pickle")
        _require(
            self.weights is not None or not needs_file, "weights", f"source {source!r} needs a file"
        )
        _require(
            self.weights is None or source != "timm",
            "weights",
            "source 'timm' fetches pretrained weights from the hub; use source 'weights' for a "
            "local file",
        )
        _require(
            self.trust_pickle == (source == "pickle"),
            "trust_pickle",
            "source 'pickle' needs trust_pickle: true (unpickling runs code from the file)"
            if source == "pickle"
            else f"only used with source 'pickle', not {source!r}",
        )
        if self.num_classes is not None:
            _require(self.num_classes >= 1, "num_classes", f"must be >= 1, got {self.num_classes}")
        if self.in_chans is not None:
            _require(self.in_chans in (1, 3), "in_chans", f"must be 1 or 3, got {self.in_chans}")
        if self.class_names is not None:
            names = self.class_names
            _require(len(names) >= 1, "class_names", "must not be empty")
            _require(all(n.strip() for n in names), "class_names", "must not contain empty names")
            duplicates = sorted(n for n, count in Counter(names).items() if count > 1)
            _require(not duplicates, "class_names", f"duplicate names {duplicates}")
            _require(
                self.num_classes is None or len(names) == self.num_classes,
                "class_names",
                f"{len(names)} names but num_classes is {self.num_classes}",
            )
        if not isinstance(self.preprocessing, PreprocessingOverrides):
            raise ValueError(
                "preprocessing: must be a PreprocessingOverrides, got "
                f"{type(self.preprocessing).__name__}"
            )


@dataclass(frozen=True)
class LoadedClassifier:
    """A float classifier in eval mode with what it needs around it.

    Attributes:
        model: maps ``[N, *preprocessing.input_size]`` images to ``[N, len(class_names)]`` logits.
        preprocessing: how its input images are resized and normalised.
        class_names: one per output.
    """

    model: nn.Module
    preprocessing: Preprocessing
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load(
    config: ClassifierConfig,
    builder: Builder | None = None,
    *,
    device: str | torch.device = "cpu",
) -> LoadedClassifier:
    """Load the classifier ``config`` describes, with its preprocessing and class names.

    Args:
        config: the source and its settings.
        builder: for source ``"builder"``: a callable returning the model (instead of
            ``config.name``).
        device: where the returned model lives.

    Raises:
        FileNotFoundError: ``config.weights`` does not exist.
        ValueError: an unknown model name, weights that do not fit the architecture, an
            unreadable file, hub weights that cannot be fetched, a model that fails on a zero
            image of its input size, or class names / ``num_classes`` that do not match the
            model's outputs; the message names the config field.
    """
    # 1. check inputs
    if not isinstance(config, ClassifierConfig):
        raise ValueError(f"config must be a ClassifierConfig, got {type(config).__name__}")
    if builder is not None and config.source != "builder":
        raise ValueError(
            f"builder: a builder callable needs source 'builder', not {config.source!r}"
        )
    if config.source == "builder" and (builder is None) == (config.name is None):
        raise ValueError(
            "name: source 'builder' needs either name 'package.module:function' or a builder "
            "callable passed to load(), exactly one of them"
        )
    if config.weights is not None and not config.weights.is_file():
        raise FileNotFoundError(f"weights: model file {config.weights} does not exist")

    # 2. build the float model
    model = _LOADERS[config.source](config, builder).eval()

    # 3. preprocessing: timm's data config, the archive's input shape, the config's overrides
    preprocessing = _preprocessing(model, config)

    # 4. one forward pass on a zero image: the number of classes
    count = _count_outputs(model, preprocessing, config)
    if config.num_classes is not None and count != config.num_classes:
        raise ValueError(f"num_classes: the model has {count} outputs, not {config.num_classes}")

    # 5. class names
    if config.class_names is not None:
        if len(config.class_names) != count:
            raise ValueError(
                f"class_names: {len(config.class_names)} names for a model with {count} outputs"
            )
        names = list(config.class_names)
    elif count == 1000:
        names = imagenet_class_names()
    else:
        raise ValueError(
            f"class_names: the model has {count} outputs; give their names (only 1000-class "
            "models default to ImageNet's)"
        )
    return LoadedClassifier(model.to(device), preprocessing, names)


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names, from timm's bundled data (no download).

    Each is the first name of the class's WordNet lemmas (``"tench"`` for ``tench, Tinca
    tinca``); two pairs of classes share a name (``crane``, ``maillot``).
    """
    descriptions = ImageNetInfo().label_descriptions()
    assert isinstance(descriptions, list)
    return [str(d).split(",")[0].strip() for d in descriptions]


def load_classifier(
    weights: str | Path,
    arch: str | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    trust_pickle: bool = False,
) -> nn.Module:
    """Build the float classifier in eval mode.

    Args:
        weights: a ``.safetensors`` or ``.pt``/``.pth`` state dict (with ``arch``), or a pickled
            ``nn.Module`` (without ``arch``, needs ``trust_pickle``).
        arch: a timm architecture name, built with ``pretrained=False``, or a Python builder
            ``package.module:callable`` that returns the model (called with ``num_classes`` and
            ``in_chans`` when given).
        num_classes, in_chans: passed to timm; inferred from the state dict when ``None``.
        trust_pickle: allow unpickling a whole module from ``weights``.

    Raises:
        FileNotFoundError: ``weights`` does not exist.
        ValueError: unknown architecture, or weights that do not fit it (names the mismatch).
    """
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    if arch is None:
        if not trust_pickle:
            raise ValueError(
                f"{path}: without an architecture the file must be a pickled module, which is "
                "only loaded with trust_pickle=True (--trust-pickle); unpickling runs code"
            )
        module = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(module, nn.Module):
            raise ValueError(f"{path} holds a {type(module).__name__}, not an nn.Module")
        return module.eval()
    state = _read_state_dict(path)
    kwargs: dict[str, Any] = {}
    classes = num_classes if num_classes is not None else _infer_num_classes(state)
    if classes is not None:
        kwargs["num_classes"] = classes
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    model = _build(arch, kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} does not fit architecture {arch!r}: {err}") from err
    return model.eval()


def _build(arch: str, kwargs: dict[str, Any]) -> nn.Module:
    if ":" in arch:
        module_name, _, attr = arch.partition(":")
        try:
            builder = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot import model builder {arch!r}: {err}") from err
        model = builder(**kwargs)
        if not isinstance(model, nn.Module):
            raise ValueError(f"builder {arch!r} returned {type(model).__name__}, not an nn.Module")
        return model
    if not timm.is_model(arch):
        raise ValueError(
            f"unknown timm architecture {arch!r} (or give a builder 'module:function')"
        )
    return timm.create_model(arch, pretrained=False, **kwargs)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read weights from {path}: {err}") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors")
    return state


def _infer_num_classes(state: dict[str, torch.Tensor]) -> int | None:
    """Rows of the last 2-D weight named like a classifier head."""
    for key in reversed(list(state)):
        if (
            key.endswith("weight")
            and state[key].dim() == 2
            and key.split(".")[0]
            in (
                "fc",
                "head",
                "classifier",
                "last_linear",
            )
        ):
            return int(state[key].shape[0])
    return None


def _load_timm(config: ClassifierConfig, _: Builder | None) -> nn.Module:
    assert config.name is not None
    if not timm.is_model(config.name):
        raise ValueError(f"name: unknown timm model {config.name!r}")
    try:
        return timm.create_model(config.name, pretrained=True, **_shape_kwargs(config))
    except Exception as err:
        raise ValueError(
            f"name: cannot fetch the pretrained weights of timm model {config.name!r} "
            f"({type(err).__name__}: {err}); without hub access, save the weights to a file and "
            "use source 'weights' with weights: <file>"
        ) from err


def _load_weights(config: ClassifierConfig, _: Builder | None) -> nn.Module:
    assert config.weights is not None and config.name is not None
    return load_classifier(config.weights, config.name, config.num_classes, config.in_chans)


def _load_export(config: ClassifierConfig, _: Builder | None) -> nn.Module:
    from genq_core.quant.export_graph import modules_from_export

    assert config.weights is not None
    try:
        program = torch.export.load(config.weights)
    except Exception as err:
        raise ValueError(
            f"weights: cannot read {config.weights} as a torch.export archive (.pt2): {err}"
        ) from err
    return modules_from_export(program.module())


def _load_builder(config: ClassifierConfig, builder: Builder | None) -> nn.Module:
    if builder is not None:
        model = builder()
        if not isinstance(model, nn.Module):
            raise ValueError(f"builder: returned {type(model).__name__}, not an nn.Module")
    else:
        assert config.name is not None
        model = _build(config.name, _shape_kwargs(config))
    if config.weights is not None:
        state = _read_state_dict(config.weights)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(
                f"weights: {config.weights} does not fit the built model: {err}"
            ) from err
    return model


def _load_pickle(config: ClassifierConfig, _: Builder | None) -> nn.Module:
    assert config.weights is not None
    return load_classifier(config.weights, trust_pickle=config.trust_pickle)


def _shape_kwargs(config: ClassifierConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if config.num_classes is not None:
        kwargs["num_classes"] = config.num_classes
    if config.in_chans is not None:
        kwargs["in_chans"] = config.in_chans
    return kwargs


def _preprocessing(model: nn.Module, config: ClassifierConfig) -> Preprocessing:
    overrides = {
        f.name: getattr(config.preprocessing, f.name)
        for f in dataclasses.fields(config.preprocessing)
        if getattr(config.preprocessing, f.name) is not None
    }
    if "input_size" not in overrides:
        exported = _graph_input_size(model) if config.source == "export" else None
        if exported is not None:
            overrides["input_size"] = exported
        elif config.in_chans is not None:
            base = resolve_data_config({}, model=model)["input_size"]
            overrides["input_size"] = (config.in_chans, *base[1:])
    if overrides.get("input_size", (3,))[0] == 1:
        overrides.setdefault("mean", (0.5,))
        overrides.setdefault("std", (0.5,))
    try:
        return Preprocessing.from_model(model, overrides)
    except (AssertionError, ValueError) as err:
        message = str(err) or "mean/std do not fit the input channels"
        raise ValueError(f"preprocessing: {message}") from err


def _graph_input_size(model: nn.Module) -> tuple[int, int, int] | None:
    """``(C, H, W)`` of an exported graph's first input, when static."""
    if not isinstance(model, torch.fx.GraphModule):
        return None
    for node in model.graph.nodes:
        if node.op == "placeholder":
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor) and value.dim() == 4:
                dims = value.shape[1:]
                if all(isinstance(d, int) for d in dims):
                    return int(dims[0]), int(dims[1]), int(dims[2])
            return None
    return None


def _count_outputs(model: nn.Module, preprocessing: Preprocessing, config: ClassifierConfig) -> int:
    image = torch.zeros(1, *preprocessing.input_size)
    try:
        with torch.no_grad():
            logits = model(image)
    except Exception as err:
        hint = "set preprocessing.input_size (and in_chans) to what the model takes"
        if config.source == "export":
            hint += (
                "; export with a dynamic batch dimension, e.g. dynamic_shapes={'x': {0: "
                "torch.export.Dim('batch')}}"
            )
        raise ValueError(
            f"preprocessing: the model failed on a zero image of input size "
            f"{preprocessing.input_size} ({type(err).__name__}: {err}); {hint}"
        ) from err
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != 1:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"the model must return [N, num_classes] logits, got {shape}")
    return int(logits.shape[1])


def _require(ok: bool, name: str, problem: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {problem}")


_LOADERS: dict[str, Callable[[ClassifierConfig, Builder | None], nn.Module]] = {
    "timm": _load_timm,
    "weights": _load_weights,
    "export": _load_export,
    "builder": _load_builder,
    "pickle": _load_pickle,
}
