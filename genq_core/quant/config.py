"""Configuration of the quantizer: frozen, validated on construction, serialisable to dicts."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["PRESETS", "PresetSpec", "QuantConfig", "ReconstructionConfig"]


@dataclass(frozen=True)
class PresetSpec:
    """What a preset does.

    Attributes:
        weight_init: range estimation of weight quantizers before any learning.
        act_init: range estimation of activation quantizers.
        granularity: ``None`` for no reconstruction; ``"layer"`` (AdaRound) or ``"block"`` (BRECQ).
        drop: whether reconstruction randomly drops activation quantization (QDrop).
    """

    weight_init: Literal["minmax", "mse"]
    act_init: Literal["minmax", "percentile", "mse"]
    granularity: Literal["layer", "block"] | None
    drop: bool


PRESETS: dict[str, PresetSpec] = {
    "minmax": PresetSpec("minmax", "minmax", None, False),
    "percentile": PresetSpec("minmax", "percentile", None, False),
    "mse": PresetSpec("mse", "mse", None, False),
    "adaround": PresetSpec("mse", "mse", "layer", False),
    "brecq": PresetSpec("mse", "mse", "block", False),
    "qdrop": PresetSpec("mse", "mse", "block", True),
}


@dataclass(frozen=True)
class ReconstructionConfig:
    """Hyper-parameters of AdaRound/BRECQ/QDrop reconstruction (one set for every unit).

    Attributes:
        iters: optimisation steps per unit (layer or block).
        batch_size: calibration images per step.
        weight_lr: Adam learning rate of the rounding variables. 1e-2, ten times AdaRound's
            and QDrop's 1e-3: on the engine benchmark it reaches in 500 steps what 1e-3 does not
            reach in 3000 (``benchmarks/quant_sweep.py``, BENCHMARKS.md).
        act_lr: Adam learning rate of the activation step sizes (cosine-annealed to 0).
        round_weight: weight of the rounding regulariser against the reconstruction loss.
        beta_start, beta_end: the regulariser's temperature, annealed linearly after warmup.
        warmup: fraction of ``iters`` before the regulariser is switched on.
        drop_prob: probability of keeping an activation in full precision (QDrop only).
        p_norm: exponent of the reconstruction loss.
    """

    iters: int = 2000
    batch_size: int = 32
    weight_lr: float = 1e-2
    act_lr: float = 4e-5
    round_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    drop_prob: float = 0.5
    p_norm: float = 2.0

    def __post_init__(self) -> None:
        _check(self.iters >= 1, "iters", self.iters, "must be >= 1")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        for name in ("weight_lr", "act_lr", "beta_start", "beta_end", "p_norm"):
            value = getattr(self, name)
            _check(value > 0, name, value, "must be > 0")
        _check(self.round_weight >= 0, "round_weight", self.round_weight, "must be >= 0")
        _check(self.beta_start >= self.beta_end, "beta_start", self.beta_start, ">= beta_end")
        _check(0.0 <= self.warmup < 1.0, "warmup", self.warmup, "must be in [0, 1)")
        _check(0.0 <= self.drop_prob < 1.0, "drop_prob", self.drop_prob, "must be in [0, 1)")

    @classmethod
    def cheap(cls) -> ReconstructionConfig:
        """A few steps per unit: for tests and smoke runs, not for accuracy."""
        return cls(iters=20, batch_size=8)


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a model.

    Attributes:
        weight_bits: weight bit width of every quantized layer but the first and last.
        act_bits: bit width of activations (layer inputs, attention matmul inputs).
        preset: a key of :data:`PRESETS`.
        first_last_bits: weight and input bits of the first and last layers; ``None`` treats them
            like every other layer.
        weight_symmetric: symmetric (signed codes, zero point 0) or asymmetric weight grids.
        weight_per_channel: one scale per output channel, or one per tensor.
        quantize_block_inputs: also quantize the residual stream at each transformer block's
            input. Off by default: a per-tensor grid on the residual stream erases small tokens
            (the class token) and costs ViTs far more accuracy than any other quantizer; the
            inputs of every linear and of both attention matmuls are quantized either way.
        percentile: the clipping percentile of the ``percentile`` preset.
        batch_size: images per forward pass while calibrating and caching block inputs.
        max_calibration_images: calibration images used (the first ones), ``None`` for all.
        seed: seeds calibration sampling and reconstruction.
        reconstruction: used by the learned presets.
        bn_align_iters: before anything else, Adam steps per batch that pull the calibration
            images towards the float model's BatchNorm statistics
            (:func:`genq_core.align.align_to_bn_statistics`); 0 leaves them as given. Meant for
            synthetic images; needs a model with BatchNorm.
        bn_align_lr: learning rate of that alignment (normalised pixel space).
    """

    weight_bits: int = 4
    act_bits: int = 4
    preset: str = "qdrop"
    first_last_bits: int | None = 8
    weight_symmetric: bool = False
    weight_per_channel: bool = True
    quantize_block_inputs: bool = False
    percentile: float = 99.99
    batch_size: int = 64
    max_calibration_images: int | None = 1024
    seed: int = 0
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    bn_align_iters: int = 0
    bn_align_lr: float = 0.05

    def __post_init__(self) -> None:
        for name in ("weight_bits", "act_bits", "first_last_bits"):
            value = getattr(self, name)
            if name == "first_last_bits" and value is None:
                continue
            ok = isinstance(value, int) and not isinstance(value, bool) and 2 <= value <= 8
            _check(ok, name, value, "must be an integer from 2 to 8")
        _check(self.preset in PRESETS, "preset", self.preset, f"must be one of {sorted(PRESETS)}")
        _check(
            50.0 < self.percentile <= 100.0, "percentile", self.percentile, "must be in (50, 100]"
        )
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1")
        if self.max_calibration_images is not None:
            _check(
                self.max_calibration_images >= 1,
                "max_calibration_images",
                self.max_calibration_images,
                "must be >= 1 or None",
            )
        ok = (
            isinstance(self.bn_align_iters, int)
            and not isinstance(self.bn_align_iters, bool)
            and self.bn_align_iters >= 0
        )
        _check(ok, "bn_align_iters", self.bn_align_iters, "must be an integer >= 0")
        ok = isinstance(self.bn_align_lr, int | float) and 0 < self.bn_align_lr < math.inf
        _check(ok, "bn_align_lr", self.bn_align_lr, "must be a finite number > 0")
        if not isinstance(self.reconstruction, ReconstructionConfig):
            raise ValueError(
                "reconstruction must be a ReconstructionConfig, got "
                f"{type(self.reconstruction).__name__}"
            )

    @property
    def preset_spec(self) -> PresetSpec:
        return PRESETS[self.preset]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QuantConfig keys: {unknown}")
        values = dict(data)
        rec = values.get("reconstruction")
        if isinstance(rec, dict):
            rec_known = {f.name for f in dataclasses.fields(ReconstructionConfig)}
            rec_unknown = sorted(set(rec) - rec_known)
            if rec_unknown:
                raise ValueError(f"unknown ReconstructionConfig keys: {rec_unknown}")
            values["reconstruction"] = ReconstructionConfig(**rec)
        return cls(**values)


def _check(ok: bool, name: str, value: object, requirement: str) -> None:
    if not ok:
        raise ValueError(f"{name} {requirement}, got {value!r}")
