"""Pure tensor functions of uniform affine quantization.

Everything here is stateless: quantizer modules (``quantizers.py``) hold scales and zero points and
call these functions. Conventions:

* ``x_int = clamp(round(x / scale) + zero_point, quant_min, quant_max)``
* ``x_hat = (x_int - zero_point) * scale``  (the fake-quantized, "dequantized" value)

Per-channel parameters are broadcast along ``axis`` of ``x``; per-tensor parameters are scalars.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "fake_quantize",
    "lp_loss",
    "qparams_from_range",
    "quant_range",
    "rectified_sigmoid",
    "rounding_regularizer",
    "round_ste",
    "sqnr_db",
    "to_channel_shape",
]

ADAROUND_ZETA = 1.1
ADAROUND_GAMMA = -0.1


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-wide code: ``[-2^(b-1), 2^(b-1)-1]`` or ``[0, 2^b-1]``."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an integer in [2, 16], got {bits!r}")
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through gradient (d round(x) / dx := 1)."""
    return (x.round() - x).detach() + x


def to_channel_shape(param: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Reshape a per-channel parameter ``[C]`` so it broadcasts against ``x`` along ``axis``.

    ``axis=None`` means per-tensor: ``param`` must hold a single element and is returned as a scalar.
    """
    if axis is None:
        if param.numel() != 1:
            raise ValueError(
                f"per-tensor parameter must have one element, got shape {tuple(param.shape)}"
            )
        return param.reshape(())
    axis = axis % x.dim()
    if param.numel() != x.shape[axis]:
        raise ValueError(
            f"per-channel parameter has {param.numel()} elements but axis {axis} of x has "
            f"{x.shape[axis]}"
        )
    shape = [1] * x.dim()
    shape[axis] = -1
    return param.reshape(shape)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None = None,
) -> torch.Tensor:
    """Quantize and dequantize ``x`` with straight-through rounding.

    Args:
        x: any shape, float.
        scale: ``[C]`` for per-channel along ``axis`` or one element for per-tensor; positive.
        zero_point: same shape as ``scale``; integer-valued float.
        quant_min, quant_max: the integer range (see :func:`quant_range`).
        axis: channel axis of ``x`` for per-channel parameters, ``None`` for per-tensor.

    Returns:
        Tensor like ``x`` whose values lie on the grid ``(k - zero_point) * scale``. Gradients flow to
        ``x`` (straight-through inside the range, zero outside) and to ``scale`` (LSQ:
        ``d x_hat / d s = round(x / s) - x / s`` inside the range, the clipped code outside).
    """
    s = to_channel_shape(scale, x, axis)
    z = to_channel_shape(zero_point, x, axis)
    return _FakeQuantize.apply(x, s, z, quant_min, quant_max)


class _FakeQuantize(torch.autograd.Function):
    """Fused fake quantization: a few in-place passes instead of a graph of ten small ops.

    Reconstruction runs it on every activation of every step, where it costs as much as the
    convolutions; fusing the backward pass roughly halves that.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        quant_min: int,
        quant_max: int,
    ) -> torch.Tensor:
        codes = torch.round(x / scale).add_(zero_point)
        inside = (codes >= quant_min) & (codes <= quant_max)
        out = codes.clamp_(quant_min, quant_max).sub_(zero_point).mul_(scale)
        ctx.save_for_backward(x, scale, out, inside)
        return out

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        x, scale, out, inside = ctx.saved_tensors  # type: ignore[attr-defined]
        grad_x = grad * inside if ctx.needs_input_grad[0] else None  # type: ignore[attr-defined]
        grad_scale = None
        if ctx.needs_input_grad[1]:  # type: ignore[attr-defined]
            # d out / d s = (out - x * inside) / s, summed to the shape of ``scale``
            local = (out - x * inside).div_(scale).mul_(grad)
            dims = [d for d in range(local.dim()) if scale.dim() == 0 or scale.shape[d] == 1]
            grad_scale = local.sum(dim=dims, keepdim=scale.dim() > 0).reshape(scale.shape)
        return grad_x, grad_scale, None, None, None


def qparams_from_range(
    x_min: torch.Tensor,
    x_max: torch.Tensor,
    bits: int,
    symmetric: bool,
    signed: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map ``[x_min, x_max]`` onto the ``bits``-wide integer grid.

    The range is widened to include 0 so that zero is exactly representable (padding, ReLU).
    Symmetric quantization uses ``max(|x_min|, |x_max|)`` and a zero point at the grid's centre
    (0 for signed codes, ``2^(b-1)`` for unsigned ones).

    Returns:
        ``(scale, zero_point)``, both shaped like ``x_min``; ``scale > 0``.
    """
    quant_min, quant_max = quant_range(bits, signed)
    x_min = torch.minimum(x_min, torch.zeros_like(x_min))
    x_max = torch.maximum(x_max, torch.zeros_like(x_max))
    tiny = torch.finfo(torch.float32).tiny * 1e6
    if symmetric:
        bound = torch.maximum(-x_min, x_max)
        half_levels = (quant_max - quant_min) / 2.0
        scale = torch.clamp(bound / half_levels, min=tiny)
        centre = 0.0 if signed else float(2 ** (bits - 1))
        zero_point = torch.full_like(scale, centre)
    else:
        scale = torch.clamp((x_max - x_min) / float(quant_max - quant_min), min=tiny)
        zero_point = torch.clamp(quant_min - torch.round(x_min / scale), quant_min, quant_max)
    return scale, zero_point


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    """AdaRound's soft rounding ``h(alpha) = clip(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(
        torch.sigmoid(alpha) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0, 1
    )


def rounding_regularizer(alpha: torch.Tensor, beta: float) -> torch.Tensor:
    """AdaRound's regulariser ``sum(1 - |2 h(alpha) - 1|^beta)``; pushes ``h`` towards 0 or 1.

    Large ``beta`` (~20) leaves ``h`` free; small ``beta`` (~2) forces a binary decision. Callers
    anneal ``beta`` from large to small over the iterations.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    h = rectified_sigmoid(alpha)
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


def lp_loss(
    pred: torch.Tensor, target: torch.Tensor, p: float = 2.0, channel_dim: int = 1
) -> torch.Tensor:
    """Reconstruction loss: ``|pred - target|^p`` summed over channels, averaged over the rest.

    This is the loss of BRECQ and QDrop (``p = 2``), whose rounding-regulariser weight (0.01) is
    tuned for this normalisation.

    Args:
        pred, target: ``[N, C, ...]`` (or channels at ``channel_dim``), same shape.
        p: the norm's exponent.
        channel_dim: the axis summed over (1 for convolutions and linears, -1 for token tensors).
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"shape mismatch: pred {tuple(pred.shape)} vs target {tuple(target.shape)}"
        )
    return (pred - target).abs().pow(p).sum(channel_dim).mean()


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|ref|^2 / |ref - test|^2)`` in dB.

    Returns ``inf`` when the two are identical.
    """
    signal = reference.double().pow(2).sum().item()
    noise = (reference.double() - test.double()).pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
