"""Loading the float classifier to quantize.

Two sources here: a timm architecture plus a local weights file (safetensors, or a state dict
read with ``weights_only=True``), and a whole pickled module, which is only unpickled when the
local user passes ``trust_pickle=True`` (unpickling runs arbitrary code).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from torch import nn

__all__ = ["load_classifier"]


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
    if arch not in timm.list_models():
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
