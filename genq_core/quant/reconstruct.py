"""Block (BRECQ) and layer (AdaRound) reconstruction, with QDrop's random quantization drop.

Units are optimised one after another in execution order. For unit ``i``:

1. cache its float input and float output (all quantizers off) and its input in the model whose
   units ``< i`` are already quantized;
2. learn the rounding of its weights (AdaRound) and the step sizes of its activation quantizers
   (LSQ) so that the quantized unit, fed the quantized input, reproduces the float output;
   with QDrop, half of the input elements are taken from the float input and each activation
   quantizer inside keeps half of its elements in float;
3. freeze the rounding to hard decisions and move on.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
from torch import nn

from genq_core.progress import Canceled, ProgressFn, StopFn
from genq_core.quant.blocks import find_units, following_activation
from genq_core.quant.config import QuantConfig, ReconstructionConfig
from genq_core.quant.functional import lp_loss
from genq_core.quant.modules import QuantConv2d, QuantLinear
from genq_core.quant.prepare import QuantizedModel
from genq_core.quant.quantizers import ActivationQuantizer, QuantDrop

__all__ = ["QuantizationCanceled", "reconstruct"]

logger = logging.getLogger(__name__)

_REPORT_EVERY = 50


class QuantizationCanceled(Canceled):
    """``should_stop()`` returned True; the partially quantized model is discarded."""


class _StopForward(Exception):
    """Raised inside a hook to end a forward pass once the wanted tensors are captured."""


def reconstruct(
    qmodel: QuantizedModel,
    images: torch.Tensor,
    config: QuantConfig,
    device: torch.device,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> None:
    """Reconstruct ``qmodel`` in place on calibration ``images`` (``[N, ...]``, on ``device``).

    Weight quantizers must be calibrated (rounding to nearest) and activation quantizers too.
    """
    spec = config.preset_spec
    if spec.granularity is None:
        raise ValueError(f"preset {config.preset!r} does not reconstruct")
    rec = config.reconstruction
    units = _execution_ordered(qmodel, find_units(qmodel.model, spec.granularity), images[:1])
    total = len(units) * rec.iters
    logger.info(
        "reconstructing %d units (%s-wise), %d steps each", len(units), spec.granularity, rec.iters
    )
    for index, (name, unit) in enumerate(units):
        if should_stop is not None and should_stop():
            raise QuantizationCanceled(f"canceled before unit {name}")
        # 1. cache inputs and targets
        qmodel.set_quant_state(weights=False, activations=False)
        fp_in, fp_out = _capture(qmodel, unit, images, config.batch_size, with_output=True)
        qmodel.set_quant_state(weights=True, activations=True)
        q_in, _ = _capture(qmodel, unit, images, config.batch_size, with_output=False)
        post = None
        if isinstance(unit, QuantConv2d | QuantLinear):
            post = following_activation(qmodel.model, name)
            if post is not None:
                with torch.no_grad():
                    fp_out = post(fp_out)
        # 2. learn rounding and step sizes
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(config.seed * 100_003 + index)
            loss = _optimise_unit(
                unit,
                q_in,
                fp_in,
                fp_out,
                post,
                rec,
                spec.drop,
                progress=_unit_progress(on_progress, index * rec.iters, total),
                should_stop=should_stop,
            )
        logger.info("unit %s: final reconstruction loss %.4g", name, loss)
        del fp_in, fp_out, q_in
        if on_progress is not None:
            on_progress("reconstruct", (index + 1) * rec.iters, total)
    qmodel.set_quant_state(weights=True, activations=True)


def _optimise_unit(
    unit: nn.Module,
    q_in: torch.Tensor,
    fp_in: torch.Tensor,
    fp_out: torch.Tensor,
    post: nn.Module | None,
    rec: ReconstructionConfig,
    drop: bool,
    progress: Callable[[int], None],
    should_stop: StopFn | None,
) -> float:
    """Steps 2 and 3 for one unit; returns the last reconstruction loss.

    ``post`` (the activation after a single layer) is applied to the unit's output; ``fp_out``
    already includes it. With ``drop``, a single layer's input is QDrop's mix of the float model's
    input and the quantized input; a block's input is a mix of the float and quantized models'
    inputs, and its activation quantizers drop inside.
    """
    layers = [m for m in unit.modules() if isinstance(m, QuantConv2d | QuantLinear)]
    act_quantizers = [m for m in unit.modules() if isinstance(m, ActivationQuantizer)]
    for layer in layers:
        layer.weight_quantizer.init_rounding(layer.weight)
    dropper = QuantDrop(rec.drop_prob, seed=int(torch.randint(2**31, ()).item())) if drop else None
    single_layer = isinstance(unit, QuantConv2d | QuantLinear)
    for quantizer in act_quantizers:
        quantizer.scale.requires_grad_(True)
        quantizer.drop = None if single_layer else dropper
    weight_opt = torch.optim.Adam(
        [layer.weight_quantizer.alpha for layer in layers], lr=rec.weight_lr
    )
    act_opt = torch.optim.Adam([q.scale for q in act_quantizers], lr=rec.act_lr)
    act_sched = torch.optim.lr_scheduler.CosineAnnealingLR(act_opt, T_max=rec.iters, eta_min=0.0)
    warmup_iters = int(rec.warmup * rec.iters)
    channel_dim = -1 if fp_out.dim() == 3 else 1
    count = q_in.shape[0]
    rec_loss = torch.zeros(())
    try:
        for step in range(rec.iters):
            index = torch.randint(count, (min(rec.batch_size, count),), device=q_in.device)
            out = _unit_forward(unit, q_in, fp_in, index, dropper)
            if post is not None:
                out = post(out)
            rec_loss = lp_loss(out, fp_out[index], rec.p_norm, channel_dim)
            loss = rec_loss
            if step >= warmup_iters and rec.round_weight > 0:
                beta = _beta(step, warmup_iters, rec)
                reg = sum(layer.weight_quantizer.regularizer(beta) for layer in layers)
                loss = loss + rec.round_weight * reg
            weight_opt.zero_grad(set_to_none=True)
            act_opt.zero_grad(set_to_none=True)
            loss.backward()
            weight_opt.step()
            act_opt.step()
            act_sched.step()
            if (step + 1) % _REPORT_EVERY == 0:
                progress(step + 1)
                if should_stop is not None and should_stop():
                    raise QuantizationCanceled("canceled during reconstruction")
    finally:
        for layer in layers:
            layer.weight_quantizer.finalize_rounding()
        for quantizer in act_quantizers:
            quantizer.scale.requires_grad_(False)
            quantizer.drop = None
    return float(rec_loss.item())


def _unit_forward(
    unit: nn.Module,
    q_in: torch.Tensor,
    fp_in: torch.Tensor,
    index: torch.Tensor,
    dropper: QuantDrop | None,
) -> torch.Tensor:
    """The unit on the batch ``index`` of its cached inputs, with QDrop's mixing if asked."""
    if dropper is None:
        return unit(q_in[index])
    if isinstance(unit, QuantConv2d | QuantLinear):
        # elements of the quantized input, or of the float model's input where dropped
        return unit.forward_quantized(dropper(fp_in[index], unit.input_quantizer(q_in[index])))
    return unit(dropper(fp_in[index], q_in[index]))


def _beta(step: int, warmup_iters: int, rec: ReconstructionConfig) -> float:
    """Linear decay of the regulariser temperature from ``beta_start`` to ``beta_end``."""
    progress = (step - warmup_iters) / max(rec.iters - warmup_iters, 1)
    return rec.beta_end + (rec.beta_start - rec.beta_end) * max(0.0, 1.0 - progress)


@torch.no_grad()
def _capture(
    qmodel: QuantizedModel,
    unit: nn.Module,
    images: torch.Tensor,
    batch_size: int,
    with_output: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``images`` through ``qmodel`` up to ``unit``; return its inputs (and outputs)."""
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def pre_hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        inputs.append(args[0].detach())
        if not with_output:
            raise _StopForward

    def post_hook(_: nn.Module, __: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        outputs.append(output.detach())
        raise _StopForward

    handles = [unit.register_forward_pre_hook(pre_hook)]
    if with_output:
        handles.append(unit.register_forward_hook(post_hook))
    try:
        for start in range(0, images.shape[0], batch_size):
            with contextlib.suppress(_StopForward):
                qmodel(images[start : start + batch_size])
    finally:
        for handle in handles:
            handle.remove()
    empty = torch.empty(0)
    return torch.cat(inputs), torch.cat(outputs) if outputs else empty


@torch.no_grad()
def _execution_ordered(
    qmodel: QuantizedModel, units: list[tuple[str, nn.Module]], example: torch.Tensor
) -> list[tuple[str, nn.Module]]:
    """Sort units by first call; split units that take more than one tensor into their layers."""
    calls: dict[str, list[bool]] = {}
    order: list[str] = []

    def hook_for(name: str) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
            single = len(args) == 1 and isinstance(args[0], torch.Tensor) and not kwargs
            calls.setdefault(name, []).append(single)
            if name not in order:
                order.append(name)

        return hook

    handles = [
        unit.register_forward_pre_hook(hook_for(name), with_kwargs=True) for name, unit in units
    ]
    try:
        qmodel(example)
    finally:
        for handle in handles:
            handle.remove()
    by_name = dict(units)
    ordered: list[tuple[str, nn.Module]] = []
    for name in order:
        unit = by_name[name]
        if len(calls[name]) > 1:
            raise ValueError(f"module '{name}' runs {len(calls[name])} times per forward pass")
        if calls[name][0] or isinstance(unit, QuantConv2d | QuantLinear):
            ordered.append((name, unit))
            continue
        logger.info(
            "unit %s takes more than one tensor: reconstructing its layers one by one", name
        )
        sub_units = find_units(unit, "layer")
        ordered.extend(
            _execution_ordered(qmodel, [(f"{name}.{n}", m) for n, m in sub_units], example)
        )
    skipped = sorted(set(by_name) - set(order))
    if skipped:
        logger.warning(
            "units never called in forward(), left at their initial rounding: %s", skipped
        )
    return ordered


def _unit_progress(
    on_progress: ProgressFn | None, offset: int, total: int
) -> Callable[[int], None]:
    def report(done: int) -> None:
        if on_progress is not None:
            on_progress("reconstruct", offset + done, total)

    return report
