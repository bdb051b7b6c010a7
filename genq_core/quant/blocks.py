"""Find the units that reconstruction optimises one at a time: blocks, with a fallback to layers.

A block is a module that holds two or more quantized layers and is either of a registered block
type or one element of a container (``nn.Sequential``/``nn.ModuleList``) that stacks several such
modules: residual blocks of ResNets, inverted residuals of MobileNets, transformer blocks of ViTs.
Layers outside any block (stems, heads) are units on their own.
"""

from __future__ import annotations

from typing import Literal

from timm.models.vision_transformer import Block as TimmBlock
from torch import nn

from genq_core.quant.modules import QuantConv2d, QuantInput, QuantLinear

__all__ = ["BLOCK_TYPES", "find_units", "following_activation", "register_block_type"]

BLOCK_TYPES: list[type[nn.Module]] = [TimmBlock]

# Element-wise modules that may follow a layer; Identity is what a folded BatchNorm leaves.
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Mish,
    nn.ELU,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
)

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def register_block_type(block_type: type[nn.Module]) -> None:
    """Treat every module of ``block_type`` as one reconstruction block."""
    if block_type not in BLOCK_TYPES:
        BLOCK_TYPES.append(block_type)


def find_units(
    model: nn.Module, granularity: Literal["layer", "block"]
) -> list[tuple[str, nn.Module]]:
    """The reconstruction units of ``model`` in registration order.

    Args:
        model: a prepared model (quantized layers swapped in).
        granularity: ``"layer"`` for every quantized layer, ``"block"`` for blocks plus the layers
            outside them.

    Returns:
        ``(name, module)`` pairs; every quantized layer belongs to exactly one unit.
    """
    if granularity not in ("layer", "block"):
        raise ValueError(f"granularity must be 'layer' or 'block', got {granularity!r}")
    units: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module, in_container: bool) -> None:
        if isinstance(module, QuantConv2d | QuantLinear):
            units.append((prefix, module))
            return
        count = _count_layers(module)
        if count == 0:
            return
        if granularity == "block" and count >= 2 and _is_block(module, in_container):
            units.append((prefix, module))
            return
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child, isinstance(module, _CONTAINERS))

    visit("", model, in_container=False)
    return units


def _is_block(module: nn.Module, in_container: bool) -> bool:
    wrapped = module.module if isinstance(module, QuantInput) else module
    if isinstance(wrapped, tuple(BLOCK_TYPES)):
        return True
    return in_container and not isinstance(module, _CONTAINERS)


def _count_layers(module: nn.Module) -> int:
    return sum(isinstance(m, QuantConv2d | QuantLinear) for m in module.modules())


def following_activation(model: nn.Module, name: str) -> nn.Sequential | None:
    """The element-wise modules that directly follow layer ``name`` inside an ``nn.Sequential``.

    Layer-wise reconstruction matches the output after them (as BRECQ and QDrop do): errors that a
    ReLU discards then cost nothing. Returns ``None`` when the layer's parent is not a plain
    ``nn.Sequential`` or nothing but ``Identity`` follows it.
    """
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if type(parent).forward is not nn.Sequential.forward or not isinstance(parent, nn.Sequential):
        return None
    names = [child for child, _ in parent.named_children()]
    following: list[nn.Module] = []
    for child in names[names.index(child_name) + 1 :]:
        module = parent.get_submodule(child)
        if not isinstance(module, ELEMENTWISE):
            break
        following.append(module)
    if all(isinstance(module, nn.Identity) for module in following):
        return None
    return nn.Sequential(*following)
