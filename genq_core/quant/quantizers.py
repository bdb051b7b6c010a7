"""Quantizer modules with explicit state.

* :class:`WeightQuantizer`: per-channel or per-tensor weight grid with learned rounding (AdaRound).
* :class:`ActivationQuantizer`: per-tensor activation grid with a learned step size (LSQ) and
  QDrop's random quantization drop.

Both are calibrated explicitly (``calibrate``); using one before that raises ``RuntimeError``.
"""

from __future__ import annotations

import random
from typing import Literal

import torch
from torch import nn

from genq_core.quant.calibration import (
    CALIBRATION_METHODS,
    ActivationObserver,
    minmax_range,
    mse_range,
    percentile_range,
)
from genq_core.quant.functional import (
    ADAROUND_GAMMA,
    ADAROUND_ZETA,
    fake_quantize,
    qparams_from_range,
    quant_range,
    rectified_sigmoid,
    rounding_regularizer,
)

__all__ = ["ActivationQuantizer", "QuantDrop", "RoundingMode", "WeightQuantizer"]

RoundingMode = Literal["nearest", "soft", "hard"]
_ROUNDING_CODES: dict[str, int] = {"nearest": 0, "soft": 1, "hard": 2}
_ROUNDING_NAMES: dict[int, RoundingMode] = {0: "nearest", 1: "soft", 2: "hard"}


class WeightQuantizer(nn.Module):
    """Fake-quantizes a weight tensor, with rounding to nearest or learned rounding (AdaRound).

    Rounding modes:
        ``nearest``: ``round(w / s)``.
        ``soft``: ``floor(w / s) + h(alpha)`` with ``h`` in ``[0, 1]``; differentiable in ``alpha``.
        ``hard``: ``floor(w / s) + 1[alpha >= 0]``; the final learned decision.

    Args:
        weight_shape: shape of the weight, output channels first (``[C_out, ...]``).
        bits: bit width (2..8).
        symmetric: symmetric grid with signed codes, or asymmetric with unsigned codes.
        per_channel: one scale per output channel (axis 0) or one per tensor.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    calibrated: torch.Tensor
    rounding_code: torch.Tensor

    def __init__(
        self,
        weight_shape: torch.Size | tuple[int, ...],
        bits: int,
        symmetric: bool,
        per_channel: bool,
    ):
        super().__init__()
        self.bits = bits
        self.symmetric = symmetric
        self.signed = symmetric
        self.per_channel = per_channel
        self.quant_min, self.quant_max = quant_range(bits, self.signed)
        channels = weight_shape[0] if per_channel else 1
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("zero_point", torch.zeros(channels))
        self.register_buffer("calibrated", torch.tensor(False))
        self.register_buffer("rounding_code", torch.tensor(_ROUNDING_CODES["nearest"]))
        self.alpha = nn.Parameter(torch.zeros(weight_shape), requires_grad=False)
        self.enabled = True
        self.onnx_export = False
        self._export_weight: torch.Tensor | None = None

    @property
    def axis(self) -> int | None:
        return 0 if self.per_channel else None

    @property
    def rounding(self) -> RoundingMode:
        return _ROUNDING_NAMES[int(self.rounding_code.item())]

    @torch.no_grad()
    def calibrate(self, weight: torch.Tensor, method: str) -> None:
        """Set scale and zero point from ``weight`` by ``minmax`` or ``mse`` search."""
        if method not in ("minmax", "mse"):
            raise ValueError(f"weight calibration method must be 'minmax' or 'mse', got {method!r}")
        if not torch.isfinite(weight).all():
            raise ValueError("weight contains NaN or Inf values")
        if method == "minmax":
            w_min, w_max = minmax_range(weight, self.axis)
        else:
            w_min, w_max = mse_range(weight, self.bits, self.symmetric, self.signed, self.axis)
        scale, zero_point = qparams_from_range(w_min, w_max, self.bits, self.symmetric, self.signed)
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
        self.calibrated.fill_(True)
        self.rounding_code.fill_(_ROUNDING_CODES["nearest"])

    @torch.no_grad()
    def init_rounding(self, weight: torch.Tensor) -> None:
        """Start learned rounding: set ``alpha`` so that ``h(alpha)`` equals ``frac(w / s)``."""
        self._check_calibrated()
        scaled = weight / self._scale(weight)
        rest = scaled - scaled.floor()
        ratio = (ADAROUND_ZETA - ADAROUND_GAMMA) / (rest - ADAROUND_GAMMA) - 1.0
        self.alpha.copy_(-torch.log(ratio))
        self.alpha.requires_grad_(True)
        self.rounding_code.fill_(_ROUNDING_CODES["soft"])

    def finalize_rounding(self) -> None:
        """Freeze learned rounding to its hard 0/1 decision."""
        self.alpha.requires_grad_(False)
        self.rounding_code.fill_(_ROUNDING_CODES["hard"])

    def regularizer(self, beta: float) -> torch.Tensor:
        """AdaRound's rounding regulariser of this quantizer's ``alpha``."""
        return rounding_regularizer(self.alpha, beta)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        if self.onnx_export:
            return self._torch_fake_quantize()
        self._check_calibrated()
        rounding = self.rounding
        if rounding == "nearest":
            return fake_quantize(
                weight, self.scale, self.zero_point, self.quant_min, self.quant_max, self.axis
            )
        scale, zero_point = self._scale(weight), self._zero_point(weight)
        if rounding == "soft":
            offset = rectified_sigmoid(self.alpha)
        else:
            offset = (self.alpha >= 0).to(weight.dtype)
        w_int = torch.clamp(
            torch.floor(weight / scale).detach() + offset + zero_point,
            self.quant_min,
            self.quant_max,
        )
        return (w_int - zero_point) * scale

    @torch.no_grad()
    def integer_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The integer codes of ``weight`` (int32, same shape), as the forward pass uses them."""
        self._check_calibrated()
        scale, zero_point = self._scale(weight), self._zero_point(weight)
        if self.rounding == "soft":
            raise RuntimeError(
                "soft rounding has no integer weights; call finalize_rounding() first"
            )
        if self.rounding == "nearest":
            codes = torch.round(weight / scale)
        else:
            codes = torch.floor(weight / scale) + (self.alpha >= 0).to(weight.dtype)
        return torch.clamp(codes + zero_point, self.quant_min, self.quant_max).to(torch.int32)

    def extra_repr(self) -> str:
        kind = "per-channel" if self.per_channel else "per-tensor"
        grid = "symmetric" if self.symmetric else "asymmetric"
        return f"bits={self.bits}, {kind}, {grid}, rounding={self.rounding}"

    @torch.no_grad()
    def prepare_export(self, weight: torch.Tensor) -> None:
        """Fix the rounded weight as a constant for export (``onnx_export`` mode reads it)."""
        codes = self.integer_weight(weight).to(weight.dtype)
        self._export_weight = (codes - self._zero_point(weight)) * self._scale(weight)

    def _torch_fake_quantize(self) -> torch.Tensor:
        """The rounded weight through ``torch.fake_quantize_*`` (exported to ONNX as Q/DQ)."""
        if self._export_weight is None:
            raise RuntimeError("call prepare_export(weight) before exporting")
        rounded = self._export_weight
        zero_point = self.zero_point.to(torch.int32)
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(
                rounded, self.scale, zero_point, 0, self.quant_min, self.quant_max
            )
        return torch.fake_quantize_per_tensor_affine(
            rounded, self.scale, zero_point, self.quant_min, self.quant_max
        )

    def _scale(self, weight: torch.Tensor) -> torch.Tensor:
        return (
            self.scale.reshape([-1] + [1] * (weight.dim() - 1)) if self.per_channel else self.scale
        )

    def _zero_point(self, weight: torch.Tensor) -> torch.Tensor:
        if self.per_channel:
            return self.zero_point.reshape([-1] + [1] * (weight.dim() - 1))
        return self.zero_point

    def _check_calibrated(self) -> None:
        if not bool(self.calibrated):
            raise RuntimeError("WeightQuantizer used before calibrate()")


class ActivationQuantizer(nn.Module):
    """Per-tensor asymmetric activation quantizer with a learnable step size (LSQ).

    Codes are unsigned (``[0, 2^b - 1]``) with a zero point, so non-negative inputs (after ReLU)
    get zero point 0 and the full grid. During QDrop reconstruction ``drop`` (a :class:`QuantDrop`)
    keeps a random part of the elements in full precision.

    Args:
        bits: bit width (2..8).
    """

    zero_point: torch.Tensor
    calibrated: torch.Tensor

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.quant_min, self.quant_max = quant_range(bits, signed=False)
        self.scale = nn.Parameter(torch.ones(1), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(1))
        self.register_buffer("calibrated", torch.tensor(False))
        self.enabled = True
        self.drop: QuantDrop | None = None
        self.onnx_export = False
        self._export_qparams: tuple[float, int] | None = None

    @torch.no_grad()
    def calibrate(
        self, observer: ActivationObserver, method: str, percentile: float = 99.99
    ) -> None:
        """Set the step size and zero point from what ``observer`` saw."""
        if method not in CALIBRATION_METHODS:
            raise ValueError(
                f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}"
            )
        if observer.empty:
            raise RuntimeError("activation observer saw no data; was the quantizer ever called?")
        assert observer.min is not None and observer.max is not None
        if method == "minmax":
            x_min, x_max = observer.min, observer.max
        elif method == "percentile":
            x_min, x_max = percentile_range(observer.samples(), percentile, axis=None)
        else:
            x_min, x_max = mse_range(observer.samples(), self.bits, False, False, axis=None)
        scale, zero_point = qparams_from_range(
            x_min, x_max, self.bits, symmetric=False, signed=False
        )
        self.scale.copy_(scale.reshape(1))
        self.zero_point.copy_(zero_point.reshape(1))
        self.calibrated.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.onnx_export:
            if self._export_qparams is None:
                raise RuntimeError("call prepare_export() before exporting")
            scale_value, zero_point_value = self._export_qparams
            return torch.fake_quantize_per_tensor_affine(
                x, scale_value, zero_point_value, self.quant_min, self.quant_max
            )
        scale = torch.clamp(self.scale, min=1e-8)
        if not bool(self.calibrated):
            raise RuntimeError("ActivationQuantizer used before calibrate()")
        x_q = fake_quantize(x, scale, self.zero_point, self.quant_min, self.quant_max)
        if self.drop is not None:
            x_q = self.drop(x, x_q)
        return x_q

    def prepare_export(self) -> None:
        """Fix step size and zero point as Python numbers for export (``onnx_export`` mode)."""
        self._export_qparams = (
            float(torch.clamp(self.scale, min=1e-8).item()),
            int(self.zero_point.item()),
        )

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, step={self.scale.item():.4g}, zero_point={self.zero_point.item():g}"
        )


class QuantDrop:
    """QDrop's random drop: keep each element of a tensor in full precision with ``prob``.

    Drawing a fresh uniform mask per call costs as much as the convolutions of a small layer on a
    CPU, so masks are random windows of one 0/1 pool drawn once: the window at offset ``k`` gives
    element ``i`` the pool's entry ``k + i``, so masks at different offsets are independent per
    element. Offsets come from a seeded generator, so a run is reproducible.

    Args:
        prob: probability of keeping an element in float, in ``[0, 1)``.
        seed: seeds the pool and the offsets.
    """

    OFFSETS = 1 << 16

    def __init__(self, prob: float, seed: int):
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"drop probability must be in [0, 1), got {prob}")
        self.prob = prob
        self._seed = seed
        self._offsets = random.Random(seed)
        self._pool: torch.Tensor | None = None

    def __call__(self, x_float: torch.Tensor, x_quant: torch.Tensor) -> torch.Tensor:
        """``x_float`` where the mask keeps float, else ``x_quant`` (gradients flow to both)."""
        mask = self.mask(x_float)
        return torch.lerp(x_quant, x_float, mask)

    def mask(self, like: torch.Tensor) -> torch.Tensor:
        """A 0/1 mask shaped like ``like`` (1 = keep float), fresh at every call."""
        numel = like.numel()
        pool = self._pool
        if pool is None or pool.numel() < numel + self.OFFSETS or pool.device != like.device:
            generator = torch.Generator(device=like.device).manual_seed(self._seed)
            uniform = torch.rand(numel + self.OFFSETS, generator=generator, device=like.device)
            pool = self._pool = (uniform < self.prob).to(like.dtype)
        offset = self._offsets.randrange(self.OFFSETS)
        return pool[offset : offset + numel].view(like.shape).to(like.dtype)
