from __future__ import annotations

import pytest

from genq_core.quant import PRESETS, QuantConfig, ReconstructionConfig


@pytest.mark.parametrize("field", ["weight_bits", "act_bits", "first_last_bits"])
@pytest.mark.parametrize("bits", [0, 1, 9, 17, 4.0])
def test_bad_bits_named(field: str, bits: object) -> None:
    with pytest.raises(ValueError, match=field):
        QuantConfig(**{field: bits})  # type: ignore[arg-type]


def test_unknown_preset_lists_known_ones() -> None:
    with pytest.raises(ValueError, match=r"preset .*qdrop"):
        QuantConfig(preset="gptq")


@pytest.mark.parametrize(
    ("field", "value"),
    [("iters", 0), ("batch_size", 0), ("weight_lr", 0.0), ("warmup", 1.0), ("drop_prob", 1.0)],
)
def test_bad_reconstruction_values_named(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        ReconstructionConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [("bn_align_iters", -1), ("bn_align_iters", True), ("bn_align_lr", 0.0), ("bn_align_lr", "x")],
)
def test_bad_bn_alignment_values_named(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        QuantConfig(**{field: value})  # type: ignore[arg-type]


def test_dict_round_trip_and_unknown_keys() -> None:
    config = QuantConfig(
        weight_bits=2,
        preset="brecq",
        reconstruction=ReconstructionConfig.cheap(),
        bn_align_iters=50,
    )
    assert QuantConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown QuantConfig keys: \\['wbits'\\]"):
        QuantConfig.from_dict({"wbits": 4})
    with pytest.raises(ValueError, match="unknown ReconstructionConfig keys"):
        QuantConfig.from_dict({"reconstruction": {"steps": 3}})


def test_presets_cover_fast_and_learned() -> None:
    assert {"minmax", "percentile", "mse", "adaround", "brecq", "qdrop"} <= set(PRESETS)
    assert PRESETS["qdrop"].drop and PRESETS["qdrop"].granularity == "block"
    assert PRESETS["adaround"].granularity == "layer"
    assert PRESETS["mse"].granularity is None
