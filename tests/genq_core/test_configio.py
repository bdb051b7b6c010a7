from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from genq_core.classifier import ClassifierConfig, PreprocessingOverrides
from genq_core.configio import from_dict, load_config, to_dict
from genq_core.quant import QuantConfig, ReconstructionConfig


@dataclass(frozen=True)
class Inner:
    steps: int = 10
    rate: float = 0.5
    mode: Literal["fast", "exact"] = "fast"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")


@dataclass(frozen=True)
class Outer:
    name: str
    folder: Path = Path("out")
    sizes: tuple[int, ...] = (1, 2)
    pair: tuple[str, float] = ("a", 1.0)
    limit: int | None = None
    enabled: bool = True
    inner: Inner = field(default_factory=Inner)
    extra: Inner | None = None


def test_builds_nested_dataclasses_from_plain_data() -> None:
    config = from_dict(
        Outer,
        {
            "name": "job",
            "folder": "runs/1",
            "sizes": [3, 4, 5],
            "pair": ["b", 2],
            "limit": None,
            "inner": {"steps": 3, "rate": 1, "mode": "exact"},
            "extra": {"rate": 0.25},
        },
    )
    assert config == Outer(
        name="job",
        folder=Path("runs/1"),
        sizes=(3, 4, 5),
        pair=("b", 2.0),
        limit=None,
        inner=Inner(steps=3, rate=1.0, mode="exact"),
        extra=Inner(rate=0.25),
    )
    assert isinstance(config.inner.rate, float)


def test_to_dict_is_json_ready_and_round_trips() -> None:
    config = Outer(name="x", folder=Path("a/b"), sizes=(7,), extra=Inner(mode="exact"))
    data = to_dict(config)
    assert data["folder"] == "a/b" and data["sizes"] == [7] and data["extra"]["mode"] == "exact"
    assert from_dict(Outer, json.loads(json.dumps(data))) == config


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(first_last_bits=None, reconstruction=ReconstructionConfig(iters=7)),
        ClassifierConfig(
            source="weights",
            name="resnet10t",
            weights=Path("model.safetensors"),
            class_names=("cat", "dog"),
            preprocessing=PreprocessingOverrides(input_size=(1, 28, 28), mean=(0.2,), std=(0.3,)),
        ),
    ],
)
def test_library_configs_round_trip(config: Any) -> None:
    assert from_dict(type(config), json.loads(json.dumps(to_dict(config)))) == config


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "x", "inner": {"stpes": 3}}, "unknown key 'inner.stpes'; known keys of Inner"),
        ({"name": "x", "bogus": 1}, "known keys of Outer: name, folder, sizes"),
        ({}, "missing required key 'name'"),
        ({"name": 3}, "name: expected str, got int 3"),
        ({"name": "x", "limit": 2.5}, "limit: expected int, got float 2.5"),
        ({"name": "x", "enabled": 1}, "enabled: expected bool, got int 1"),
        ({"name": "x", "inner": {"rate": True}}, "inner.rate: expected float, got bool True"),
        ({"name": "x", "inner": {"mode": "slow"}}, "inner.mode: must be one of 'fast', 'exact'"),
        ({"name": "x", "sizes": [1, "2"]}, r"sizes\[1\]: expected int, got str '2'"),
        ({"name": "x", "sizes": 3}, "sizes: expected a list, got int 3"),
        ({"name": "x", "pair": ["a"]}, "pair: expected a list of 2 items, got 1"),
        ({"name": "x", "inner": None}, "inner: must not be null"),
        ({"name": "x", "inner": [1]}, "inner: expected a mapping, got list"),
        ({"name": "x", "extra": {"steps": 0}}, "extra: steps: must be >= 1, got 0"),
    ],
)
def test_bad_data_names_the_dotted_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_dict(Outer, data)


def test_post_init_errors_get_the_path_of_the_dataclass() -> None:
    with pytest.raises(ValueError, match=r"^reconstruction: iters must be >= 1"):
        from_dict(QuantConfig, {"reconstruction": {"iters": 0}})
    with pytest.raises(ValueError, match=r"^weight_bits must be an integer"):
        from_dict(QuantConfig, {"weight_bits": 12})


def test_load_config_from_yaml_and_json(tmp_path: Path) -> None:
    yaml_file = tmp_path / "quant.yaml"
    yaml_file.write_text(
        "weight_bits: 2\npreset: mse\nreconstruction:\n  weight_lr: 1e-3\n  iters: 50\n"
    )
    config = load_config(QuantConfig, yaml_file)
    assert config.weight_bits == 2 and config.preset == "mse"
    assert config.reconstruction.weight_lr == 1e-3 and config.reconstruction.iters == 50

    json_file = tmp_path / "quant.json"
    json_file.write_text(json.dumps(to_dict(config)))
    assert load_config(QuantConfig, json_file) == config


def test_load_config_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.yaml does not exist"):
        load_config(QuantConfig, tmp_path / "missing.yaml")

    broken = tmp_path / "broken.yaml"
    broken.write_text("weight_bits: [2\n")
    with pytest.raises(ValueError, match="broken.yaml: cannot parse"):
        load_config(QuantConfig, broken)

    broken_json = tmp_path / "broken.json"
    broken_json.write_text("{")
    with pytest.raises(ValueError, match="broken.json: cannot parse"):
        load_config(QuantConfig, broken_json)

    listed = tmp_path / "list.yml"
    listed.write_text("- 1\n")
    with pytest.raises(ValueError, match="list.yml: the top level must be a mapping"):
        load_config(QuantConfig, listed)

    typo = tmp_path / "typo.yaml"
    typo.write_text("reconstruction:\n  itres: 5\n")
    with pytest.raises(ValueError, match="typo.yaml: unknown key 'reconstruction.itres'"):
        load_config(QuantConfig, typo)

    with pytest.raises(ValueError, match="unknown config file type '.toml'"):
        load_config(QuantConfig, tmp_path / "config.toml")


def test_non_dataclasses_are_refused() -> None:
    with pytest.raises(TypeError, match="not a dataclass"):
        from_dict(dict, {})
    with pytest.raises(TypeError, match="expected a dataclass instance"):
        to_dict({"a": 1})
