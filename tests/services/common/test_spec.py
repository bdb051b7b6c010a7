from __future__ import annotations

from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from genq_core.filters import ORDERED_FILTERS
from genq_core.generate.pipeline import SCHEDULERS
from genq_core.quant import PRESETS
from services.common import spec
from services.common.spec import (
    GenqJobRequest,
    JobRequest,
    LimitExceeded,
    Limits,
    QuantizeJobRequest,
    check_limits,
    generation_fingerprint,
    request_hash,
)

ADAPTER: TypeAdapter[Any] = TypeAdapter(JobRequest)
MODEL = {"source": "builtin", "name": "fashion-bn-cnn"}


def parse(body: dict[str, Any]) -> Any:
    return ADAPTER.validate_python(body)


def error_fields(body: dict[str, Any]) -> list[tuple[Any, ...]]:
    with pytest.raises(ValidationError) as info:
        parse(body)
    return [error["loc"] for error in info.value.errors()]


def test_mirrors_match_the_library_registries() -> None:
    assert tuple(SCHEDULERS) == spec.SCHEDULERS
    assert tuple(PRESETS) == spec.PRESETS
    assert ORDERED_FILTERS == spec.FILTERS


def test_kind_picks_the_request_model_and_fills_defaults() -> None:
    genq = parse({"kind": "genq", "model": MODEL})
    assert isinstance(genq, GenqJobRequest)
    assert (genq.quant.weight_bits, genq.quant.preset, genq.filters.energy_keep) == (
        4,
        "qdrop",
        0.5,
    )
    quantize = parse(
        {"kind": "quantize", "model": MODEL, "calibration": {"dataset_job_id": "job_1"}}
    )
    assert isinstance(quantize, QuantizeJobRequest)


def test_errors_name_the_field() -> None:
    assert error_fields({"kind": "genq", "model": MODEL, "quant": {"weight_bits": 9}}) == [
        ("genq", "quant", "weight_bits")
    ]
    assert error_fields({"kind": "genq", "model": MODEL, "generation": {"stpes": 5}}) == [
        ("genq", "generation", "stpes")
    ]
    assert error_fields({"kind": "train", "model": MODEL}) == [()]
    assert ("genq", "model") in error_fields({"kind": "genq"})
    bad_template = {"kind": "genq", "model": MODEL, "generation": {"templates": ["a photo"]}}
    assert error_fields(bad_template) == [("genq", "generation", "templates")]
    assert error_fields({"kind": "genq", "model": MODEL, "quant": {"bn_align_iters": -1}}) == [
        ("genq", "quant", "bn_align_iters")
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"kind": "genq", "model": {"source": "upload"}}, "upload_id is required"),
        ({"kind": "genq", "model": {"source": "timm"}}, "name is required"),
        (
            {"kind": "genq", "model": MODEL, "calibration": {"dataset_job_id": "job_1"}},
            "use kind='quantize'",
        ),
        ({"kind": "quantize", "model": MODEL, "calibration": {}}, "needs calibration"),
        (
            {"kind": "genq", "model": {**MODEL, "class_names": ["a", "a"]}},
            "class_names has duplicates",
        ),
        ({"kind": "genq", "model": {**MODEL, "name": "../../etc/passwd x"}}, "pattern"),
    ],
)
def test_inconsistent_requests_are_rejected(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        parse(body)


def test_limits_name_the_field_beyond_them() -> None:
    limits = Limits(max_images_per_job=1000, max_generation_steps=50, min_bits=3)
    ten_classes = {**MODEL, "class_names": [f"c{i}" for i in range(10)]}
    check_limits(parse({"kind": "genq", "model": ten_classes, "quant": {"weight_bits": 3,
                 "act_bits": 3}, "generation": {"num_per_class": 100}}), limits)  # fmt: skip
    with pytest.raises(LimitExceeded, match="101 per class x 10 classes = 1010 images") as info:
        check_limits(
            parse({"kind": "genq", "model": ten_classes, "generation": {"num_per_class": 101}}),
            limits,
        )
    assert info.value.field == "generation.num_per_class"
    with pytest.raises(LimitExceeded) as info:
        check_limits(parse({"kind": "genq", "model": MODEL, "generation": {"steps": 51}}), limits)
    assert info.value.field == "generation.steps"
    with pytest.raises(LimitExceeded, match="outside this service's range 3..8") as info:
        check_limits(parse({"kind": "genq", "model": MODEL, "quant": {"act_bits": 2}}), limits)
    assert info.value.field == "quant.act_bits"


def test_hashes() -> None:
    implicit = parse({"kind": "genq", "model": MODEL})
    explicit = parse({"kind": "genq", "model": MODEL, "quant": {"weight_bits": 4}})
    other_bits = parse({"kind": "genq", "model": MODEL, "quant": {"weight_bits": 2}})
    other_seed = parse({"kind": "genq", "model": MODEL, "generation": {"seed": 1}})
    # the request hash sees every field, defaults filled in
    assert request_hash(implicit) == request_hash(explicit) != request_hash(other_bits)
    # the dataset fingerprint ignores what happens after generation and filtering
    assert generation_fingerprint(implicit) == generation_fingerprint(other_bits)
    assert generation_fingerprint(implicit) != generation_fingerprint(other_seed)
    # ... and whether the k-shot images also calibrate (the dataset is the same)
    scarce = {"kind": "genq", "model": MODEL, "data_scarce": {"kshot_upload_id": "k1"}}
    without = {**scarce, "data_scarce": {"kshot_upload_id": "k1", "calibrate_with_kshot": False}}
    assert generation_fingerprint(parse(scarce)) == generation_fingerprint(parse(without))
    assert request_hash(parse(scarce)) != request_hash(parse(without))
    for share in (0.25, None):  # the default is 0.5
        other = {**scarce, "data_scarce": {"kshot_upload_id": "k1", "kshot_share": share}}
        assert generation_fingerprint(parse(scarce)) == generation_fingerprint(parse(other))
        assert request_hash(parse(scarce)) != request_hash(parse(other))
    for bad in (0, 1, 1.5, "half"):
        with pytest.raises(ValidationError, match="kshot_share"):
            parse({**scarce, "data_scarce": {"kshot_upload_id": "k1", "kshot_share": bad}})
