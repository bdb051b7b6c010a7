"""Turn a float classifier into a quantization-ready copy: fold BatchNorm, swap in quantized layers.

Nothing here calibrates: :func:`prepare_model` only builds the structure, so that loading a saved
quantized model can rebuild the exact same module tree from the float model.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from timm.layers import BatchNormAct2d
from timm.models.vision_transformer import Attention as TimmAttention
from timm.models.vision_transformer import Block as TimmBlock
from torch import nn

from genq_core.quant.config import QuantConfig
from genq_core.quant.modules import QuantAttention, QuantConv2d, QuantInput, QuantLinear
from genq_core.quant.quantizers import ActivationQuantizer, WeightQuantizer

__all__ = [
    "KEPT_IN_FLOAT",
    "QuantizedModel",
    "UnsupportedModuleError",
    "fold_batchnorm",
    "prepare_model",
]

logger = logging.getLogger(__name__)

# Leaf modules with parameters that stay in float: element-wise affine maps, no matmul.
KEPT_IN_FLOAT: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.PReLU,
)


class UnsupportedModuleError(ValueError):
    """The model holds a module with weights that the quantizer does not know how to quantize."""


@dataclass(frozen=True)
class _ForwardTrace:
    """What one forward pass of the float model revealed about its wiring."""

    layer_order: list[str]
    bn_pairs: list[tuple[str, str]]


class QuantizedModel(nn.Module):
    """A fake-quantized copy of a classifier, with the config that made it.

    Attributes:
        model: the copied float model with quantized layers swapped in.
        config: the :class:`QuantConfig` it was prepared with.
        layer_order: names (in ``model``) of the quantized layers in execution order.
        input_shape: shape of one input sample, e.g. ``(3, 224, 224)``.
        folded_batchnorms: ``(layer, batchnorm)`` name pairs folded together.
    """

    def __init__(
        self,
        model: nn.Module,
        config: QuantConfig,
        layer_order: list[str],
        input_shape: tuple[int, ...],
        folded_batchnorms: list[tuple[str, str]],
    ):
        super().__init__()
        self.model = model
        self.config = config
        self.layer_order = layer_order
        self.input_shape = input_shape
        self.folded_batchnorms = folded_batchnorms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def quant_layers(self) -> Iterator[tuple[str, QuantConv2d | QuantLinear]]:
        """The quantized layers, in execution order."""
        for name in self.layer_order:
            layer = self.model.get_submodule(name)
            assert isinstance(layer, QuantConv2d | QuantLinear)
            yield name, layer

    def weight_quantizers(self) -> Iterator[tuple[str, WeightQuantizer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, WeightQuantizer):
                yield name, module

    def activation_quantizers(self) -> Iterator[tuple[str, ActivationQuantizer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, ActivationQuantizer):
                yield name, module

    def set_quant_state(self, weights: bool, activations: bool) -> None:
        """Switch weight and activation quantization on or off (off gives the folded float model)."""
        for _, wq in self.weight_quantizers():
            wq.enabled = weights
        for _, aq in self.activation_quantizers():
            aq.enabled = activations


def prepare_model(
    model: nn.Module, config: QuantConfig, example_input: torch.Tensor
) -> QuantizedModel:
    """Copy ``model``, fold its BatchNorms and replace its layers by quantized ones.

    The caller's model is never modified. Quantizers are created uncalibrated.

    Args:
        model: a float classifier (any ``nn.Module``).
        config: bit widths and weight grid.
        example_input: ``[N, C, H, W]`` (or whatever the model takes), used for one forward pass
            that finds Conv/Linear -> BatchNorm pairs and the execution order of layers.

    Raises:
        UnsupportedModuleError: a module with weights that cannot be quantized, named.
        ValueError: folding changed the model's outputs (a folded layer's output is used twice).
    """
    # 1. copy, freeze
    work = copy.deepcopy(model).eval()
    for param in work.parameters():
        param.requires_grad_(False)
    _check_supported(work)

    # 2. trace one forward pass and fold BatchNorm into the layer before it
    trace = _trace(work, example_input)
    if not trace.layer_order:
        raise UnsupportedModuleError("model has no Conv2d or Linear layer that runs in forward()")
    # full fp32 for the comparison: TF32 convolutions (a CUDA default) differ by more than folding
    with torch.no_grad(), _full_fp32():
        reference = work(example_input)
        fold_batchnorm(work, trace.bn_pairs)
        folded = work(example_input)
    _check_same_outputs(reference, folded, trace.bn_pairs)

    # 3. swap in quantized layers, attention and block-input quantizers
    first, last = trace.layer_order[0], trace.layer_order[-1]
    for name in trace.layer_order:
        edge = name in (first, last) and config.first_last_bits is not None
        weight_bits = config.first_last_bits if edge else config.weight_bits
        act_bits = config.first_last_bits if edge else config.act_bits
        assert weight_bits is not None and act_bits is not None
        layer = work.get_submodule(name)
        quant: nn.Module
        if isinstance(layer, nn.Conv2d):
            quant = QuantConv2d(
                layer, weight_bits, act_bits, config.weight_symmetric, config.weight_per_channel
            )
        else:
            assert isinstance(layer, nn.Linear)
            quant = QuantLinear(
                layer, weight_bits, act_bits, config.weight_symmetric, config.weight_per_channel
            )
        work.set_submodule(name, quant)
    quant_layers = [work.get_submodule(name) for name in trace.layer_order]
    for name, module in list(work.named_modules()):
        if type(module) is TimmAttention:
            work.set_submodule(name, QuantAttention(module, config.act_bits))
    for name, module in list(work.named_modules()):
        if config.quantize_block_inputs and isinstance(module, TimmBlock):
            work.set_submodule(name, QuantInput(module, config.act_bits))
    layer_names = {id(m): n for n, m in work.named_modules()}
    order = [layer_names[id(layer)] for layer in quant_layers]
    input_shape = tuple(example_input.shape[1:])
    return QuantizedModel(work, config, order, input_shape, trace.bn_pairs)


def fold_batchnorm(model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Fold each ``(layer, batchnorm)`` pair in place and replace the BatchNorm by ``Identity``.

    ``w' = w * gamma / sigma`` (per output channel), ``b' = (b - mu) * gamma / sigma + beta``.
    """
    for layer_name, bn_name in pairs:
        layer = model.get_submodule(layer_name)
        bn = model.get_submodule(bn_name)
        assert isinstance(layer, nn.Conv2d | nn.Linear)
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
        assert bn.running_var is not None and bn.running_mean is not None
        inv_std = torch.rsqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.weight is not None else torch.ones_like(inv_std)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(inv_std)
        factor = gamma * inv_std
        weight = layer.weight * factor.reshape([-1] + [1] * (layer.weight.dim() - 1))
        bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
        layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
        layer.bias = nn.Parameter(((bias - bn.running_mean) * factor + beta).detach(), False)
        # timm's BatchNormAct2d keeps its dropout and activation
        rest = nn.Sequential(bn.drop, bn.act) if isinstance(bn, BatchNormAct2d) else nn.Identity()
        model.set_submodule(bn_name, rest)


def _trace(model: nn.Module, example_input: torch.Tensor) -> _ForwardTrace:
    """One forward pass with hooks: layer execution order and layer -> BatchNorm pairs."""
    layer_calls: dict[str, int] = {}
    order: list[str] = []
    produced_by: dict[int, str] = {}
    keep_alive: list[torch.Tensor] = []
    bn_inputs: dict[str, list[int]] = {}
    handles = []

    def on_layer(name: str) -> Callable[..., None]:
        def hook(_: nn.Module, __: tuple[object, ...], output: torch.Tensor) -> None:
            layer_calls[name] = layer_calls.get(name, 0) + 1
            if name not in order:
                order.append(name)
            produced_by[id(output)] = name
            keep_alive.append(output)

        return hook

    def on_bn(name: str) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            bn_inputs.setdefault(name, []).append(id(args[0]))

        return hook

    for name, module in model.named_modules():
        if _is_plain_layer(module):
            handles.append(module.register_forward_hook(on_layer(name)))
        elif _is_foldable_bn(module):
            handles.append(module.register_forward_pre_hook(on_bn(name)))
    try:
        with torch.no_grad():
            model(example_input)
    except Exception as err:
        raise ValueError(f"the model failed on the example input: {err}") from err
    finally:
        for handle in handles:
            handle.remove()

    shared = sorted(name for name, calls in layer_calls.items() if calls > 1)
    if shared:
        raise UnsupportedModuleError(
            f"layers called more than once per forward pass cannot be quantized: {shared}"
        )
    pairs = []
    for bn_name, ids in bn_inputs.items():
        if len(ids) == 1 and ids[0] in produced_by:
            layer_name = produced_by[ids[0]]
            layer = model.get_submodule(layer_name)
            bn = model.get_submodule(bn_name)
            out_features = (
                layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
            )
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.num_features == out_features:
                pairs.append((layer_name, bn_name))
    folded_layers = [layer for layer, _ in pairs]
    if len(set(folded_layers)) != len(folded_layers):
        raise ValueError("a layer feeds more than one BatchNorm; cannot fold")
    return _ForwardTrace(order, pairs)


def _check_supported(model: nn.Module) -> None:
    """Raise for modules holding weights that are neither quantized nor kept in float.

    Leaf modules with any parameter must be a known type. Containers may hold their own
    parameters (a ViT's ``cls_token``, ``pos_embed``) unless those look like matmul weights
    (a name containing ``weight``, two or more dimensions), as in ``nn.MultiheadAttention``.
    """
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        if _is_plain_layer(module) or isinstance(module, KEPT_IN_FLOAT):
            continue
        if _is_timm_layer_scale(module):
            continue
        is_leaf = not any(True for _ in module.children())
        weights = [p for p, value in own if "weight" in p and value.dim() >= 2]
        if is_leaf or weights:
            raise UnsupportedModuleError(
                f"cannot quantize module '{name}' of type {type(module).__name__}: supported "
                "layers are Conv2d and Linear (with their standard forward) and timm attention; "
                "norms, LayerScale and PReLU stay in float"
            )


def _is_plain_layer(module: nn.Module) -> bool:
    """Conv2d or Linear with the standard forward (subclasses that change forward are refused)."""
    if isinstance(module, nn.Conv2d):
        return type(module).forward is nn.Conv2d.forward
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward
    return False


def _is_foldable_bn(module: nn.Module) -> bool:
    """A BatchNorm with running statistics and the standard forward (or timm's BN + act)."""
    standard_forward = (nn.modules.batchnorm._BatchNorm.forward, BatchNormAct2d.forward)
    return (
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        and type(module).forward in standard_forward
        and module.running_mean is not None
        and module.track_running_stats
    )


def _is_timm_layer_scale(module: nn.Module) -> bool:
    from timm.layers import LayerScale, LayerScale2d

    return isinstance(module, LayerScale | LayerScale2d)


@contextlib.contextmanager
def _full_fp32() -> Iterator[None]:
    """Turn TF32 convolutions and matmuls off (CUDA), restoring the caller's settings."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _check_same_outputs(
    reference: torch.Tensor, folded: torch.Tensor, pairs: list[tuple[str, str]]
) -> None:
    if not isinstance(reference, torch.Tensor) or not isinstance(folded, torch.Tensor):
        raise ValueError("the model must return a single tensor of logits")
    tolerance = 1e-4 * reference.abs().max().item() + 1e-5
    error = (reference - folded).abs().max().item()
    if error > tolerance:
        raise ValueError(
            f"folding BatchNorm changed the outputs (max abs error {error:.3g}); a folded layer's "
            f"output may be used elsewhere. Pairs: {pairs}"
        )
    logger.debug("folded %d BatchNorm layers, max abs output change %.3g", len(pairs), error)
