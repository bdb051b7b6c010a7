"""Quantized replacements for the layers of a classifier.

Activations are quantized at layer inputs: every :class:`QuantConv2d` and :class:`QuantLinear`
quantizes what it receives and its (BN-folded) weight. Whatever sits between layers (ReLU, GELU,
pooling, residual additions, LayerNorm) runs in float on dequantized values, so any wiring of the
forward pass is handled without tracing it. Attention additionally quantizes the inputs of its two
matrix products (:class:`QuantAttention`); optionally transformer blocks quantize their residual
input too (:class:`QuantInput`, ``QuantConfig.quantize_block_inputs``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genq_core.quant.quantizers import ActivationQuantizer, WeightQuantizer

__all__ = ["QuantAttention", "QuantConv2d", "QuantInput", "QuantLayer", "QuantLinear"]


class QuantConv2d(nn.Module):
    """A ``Conv2d`` (grouped and depthwise included) with quantized input and weight.

    Args:
        conv: the float layer, BN already folded in; it is held, not copied.
        weight_bits, act_bits: bit widths.
        weight_symmetric, weight_per_channel: weight grid (see :class:`WeightQuantizer`).
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        weight_bits: int,
        act_bits: int,
        weight_symmetric: bool,
        weight_per_channel: bool,
    ):
        super().__init__()
        self.conv = conv
        self.weight_quantizer = WeightQuantizer(
            conv.weight.shape, weight_bits, weight_symmetric, weight_per_channel
        )
        self.input_quantizer = ActivationQuantizer(act_bits)

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_quantized(self.input_quantizer(x))

    def forward_quantized(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on an input that is already quantized (or deliberately left in float)."""
        weight = self.weight_quantizer(self.conv.weight)
        return self.conv._conv_forward(x, weight, self.conv.bias)


class QuantLinear(nn.Module):
    """A ``Linear`` with quantized input and weight (arguments as :class:`QuantConv2d`)."""

    def __init__(
        self,
        linear: nn.Linear,
        weight_bits: int,
        act_bits: int,
        weight_symmetric: bool,
        weight_per_channel: bool,
    ):
        super().__init__()
        self.linear = linear
        self.weight_quantizer = WeightQuantizer(
            linear.weight.shape, weight_bits, weight_symmetric, weight_per_channel
        )
        self.input_quantizer = ActivationQuantizer(act_bits)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_quantized(self.input_quantizer(x))

    def forward_quantized(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on an input that is already quantized (or deliberately left in float)."""
        weight = self.weight_quantizer(self.linear.weight)
        return F.linear(x, weight, self.linear.bias)


QuantLayer = QuantConv2d | QuantLinear


class QuantInput(nn.Module):
    """Quantizes the first input of a wrapped module (a transformer block's residual stream)."""

    def __init__(self, module: nn.Module, act_bits: int):
        super().__init__()
        self.module = module
        self.input_quantizer = ActivationQuantizer(act_bits)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.module(self.input_quantizer(x), *args, **kwargs)


class QuantAttention(nn.Module):
    """timm's multi-head self-attention with quantized matmul inputs.

    Quantizes ``q`` and ``k`` (inputs of ``q @ k^T``) and the softmax probabilities and ``v``
    (inputs of ``attn @ v``); ``qkv`` and ``proj`` are quantized as layers. The computation is
    timm's ``Attention.forward`` written out without the fused kernel.

    Args:
        attention: a ``timm.models.vision_transformer.Attention`` whose linears may already be
            replaced by :class:`QuantLinear`; its submodules are held, not copied.
        act_bits: bit width of the four matmul inputs.
    """

    def __init__(self, attention: nn.Module, act_bits: int):
        super().__init__()
        self.num_heads = int(_value(attention, "num_heads"))
        self.head_dim = int(_value(attention, "head_dim"))
        self.attn_dim = int(_value(attention, "attn_dim", self.num_heads * self.head_dim))
        self.scale = float(_value(attention, "scale"))
        self.qkv = _child(attention, "qkv")
        self.q_norm = _child(attention, "q_norm")
        self.k_norm = _child(attention, "k_norm")
        self.attn_drop = _child(attention, "attn_drop")
        self.norm = _child(attention, "norm", nn.Identity())
        gate = getattr(attention, "gate", None)
        self.gate = gate if isinstance(gate, nn.Module) else None
        self.proj = _child(attention, "proj")
        self.proj_drop = _child(attention, "proj_drop")
        self.q_quantizer = ActivationQuantizer(act_bits)
        self.k_quantizer = ActivationQuantizer(act_bits)
        self.v_quantizer = ActivationQuantizer(act_bits)
        self.attn_quantizer = ActivationQuantizer(act_bits)
        self._timm_module = inspect.getmodule(type(attention))

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        batch, tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q = self.q_quantizer(q * self.scale)
        k = self.k_quantizer(k)
        attn = q @ k.transpose(-2, -1)
        if attn_mask is not None or is_causal:
            attn = self._add_mask(attn, tokens, attn_mask, is_causal)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = self.attn_quantizer(attn) @ self.v_quantizer(v)
        x = self.norm(x.transpose(1, 2).reshape(batch, tokens, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def _add_mask(
        self, attn: torch.Tensor, tokens: int, attn_mask: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        resolve = getattr(self._timm_module, "resolve_self_attn_mask", None)
        add = getattr(self._timm_module, "maybe_add_mask", None)
        if resolve is None or add is None:
            raise NotImplementedError("attention masks need timm's mask helpers (timm >= 1.0.20)")
        return add(attn, resolve(tokens, attn, attn_mask, is_causal))


def _child(module: nn.Module, name: str, default: nn.Module | None = None) -> nn.Module:
    """``module.<name>`` as a module (``default`` when absent)."""
    child = getattr(module, name, default)
    if not isinstance(child, nn.Module):
        raise TypeError(f"{type(module).__name__}.{name} is not a module")
    return child


def _value(module: nn.Module, name: str, default: float | None = None) -> float:
    """A plain number attribute of ``module`` (``default`` when absent)."""
    value = getattr(module, name, default)
    if not isinstance(value, int | float):
        raise TypeError(f"{type(module).__name__}.{name} is not a number")
    return value
