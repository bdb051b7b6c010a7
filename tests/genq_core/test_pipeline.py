from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load as load_tensors

from genq_core.bench.fashion_mnist import CLASS_NAMES
from genq_core.classifier import load
from genq_core.cli import main
from genq_core.data import load_labelled_image_folder
from genq_core.generate.tiny import build_tiny_pipeline
from genq_core.manifest import read_manifest
from genq_core.pipeline import (
    GenQConfig,
    load_genq_config,
    quantizer_calibration,
    run_genq,
    split_holdout,
)
from genq_core.progress import Canceled
from genq_core.quant import ReconstructionConfig
from genq_core.storage import LocalStorage

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = ROOT / "benchmarks" / "assets" / "bn_cnn_fmnist.safetensors"
CLASSES = list(CLASS_NAMES)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_sd")
    build_tiny_pipeline(sample_size=16, seed=0).save_pretrained(folder)
    return folder


def _config(tiny_sd: Path, **sections: Any) -> dict[str, Any]:
    """A plain-data config: the benchmark's BN CNN, the tiny generator, a fast quantizer."""
    data: dict[str, Any] = {
        "classifier": {
            "source": "builder",
            "name": "genq_core.bench.classifiers:BNConvNet",
            "weights": str(WEIGHTS),
            "class_names": CLASSES,
            "preprocessing": {"input_size": [1, 28, 28], "mean": [0.286], "std": [0.353]},
        },
        "generator": {"source": str(tiny_sd)},
        "generation": {"num_per_class": 5, "steps": 2, "batch_size": 8},
        "filters": {"energy_keep": 0.5, "distribution_keep": 0.6, "batch_size": 8},
        "quant": {"weight_bits": 4, "act_bits": 4, "preset": "minmax"},
    }
    data.update(sections)
    return data


def _build(data: dict[str, Any], tmp_path: Path) -> GenQConfig:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return load_genq_config(path)


def _write_images(folder: Path, classes: list[str], count: int, size: int = 32) -> None:
    rng = np.random.default_rng(0)
    for name in classes:
        (folder / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.png")


def test_genq_source_writes_every_artifact(tiny_sd: Path, tmp_path: Path) -> None:
    stages: set[str] = set()
    result = run_genq(
        _build(_config(tiny_sd), tmp_path),
        tmp_path / "out",
        on_progress=lambda stage, done, total: stages.add(stage),
    )
    out = tmp_path / "out"
    # every artifact is listed with the sha256 of what was written
    listed = json.loads((out / "artifacts.json").read_text())["artifacts"]
    assert {a["key"] for a in listed} >= {
        "synthetic/manifest.jsonl",
        "model/model.safetensors",
        "model/encodings.json",
        "config.json",
        "report.json",
        "report.md",
    }
    for artifact in listed:
        data = (out / artifact["key"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == artifact["sha256"]
        assert len(data) == artifact["size"]
    # the manifest has every image with its filter scores and decision
    records = read_manifest(LocalStorage(out), "synthetic/manifest.jsonl")
    assert len(records) == 5 * len(CLASSES)
    assert all((out / r.key).is_file() for r in records)
    assert all("energy" in r.scores for r in records)
    kept = [r for r in records if r.kept_final]
    assert 0 < len(kept) < len(records)
    assert all(r.kept == {"energy": True, "distribution": True} for r in kept)
    # the report: source timing, filter counts, evaluation on the held-out images
    report = json.loads((out / "report.json").read_text())
    assert report["source"]["made"] == 5 * len(CLASSES)
    assert report["calibration_images"] + report["holdout_images"] == len(kept)
    assert 0.0 <= report["evaluation"]["agreement"] <= 100.0
    per_filter = {f["name"]: f for f in report["filters"]["filters"]}
    assert per_filter["energy"]["per_class"]["coat"] == {"in": 5, "kept": 3}
    assert per_filter["distribution"]["method"] == "bn_sensitivity"
    assert report["filters"]["num_kept"] == len(kept)
    assert result.calibration.shape[1:] == (1, 28, 28)
    assert result.quantized is not None
    assert {"generate", "calibrate"} <= stages
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["config"]["quant"]["preset"] == "minmax"
    assert resolved["versions"]["torch"] == torch.__version__


def test_data_scarce_mode_learns_and_uses_the_style_token(tiny_sd: Path, tmp_path: Path) -> None:
    kshot = tmp_path / "kshot"
    _write_images(kshot, ["coat", "shirt"], count=2)
    data = _config(
        tiny_sd,
        data_scarce={"kshot_dir": str(kshot), "inversion": {"steps": 2, "batch_size": 2}},
        calibration={"source": "generated"},
        quant=None,
    )
    result = run_genq(_build(data, tmp_path), tmp_path / "out")
    tokens = load_tensors((tmp_path / "out" / "tokens" / "tokens.safetensors").read_bytes())
    assert list(tokens) == ["<genq-style>"]
    records = read_manifest(LocalStorage(tmp_path / "out"), "synthetic/manifest.jsonl")
    assert all("<genq-style>" in r.prompt for r in records)
    assert all(r.kept_final for r in records)  # the unfiltered source keeps everything
    assert result.quantized is None
    assert not (tmp_path / "out" / "model").exists()


@pytest.mark.parametrize("source", ["noise", "inversion", "real"])
def test_baseline_sources_calibrate_the_same_quantizer(
    tiny_sd: Path, tmp_path: Path, source: str
) -> None:
    calibration: dict[str, Any] = {"source": source, "num_images": 24}
    if source == "inversion":
        calibration["model_inversion"] = {"iters": 3, "batch_size": 12}
    if source == "real":
        _write_images(tmp_path / "real", ["bag", "sandal"], count=6)
        calibration = {"source": "real", "real_dir": str(tmp_path / "real")}
    result = run_genq(_build(_config(tiny_sd, calibration=calibration), tmp_path), tmp_path / "out")
    stored = load_tensors((tmp_path / "out" / "calibration" / "images.safetensors").read_bytes())
    assert stored["images"].shape[0] == result.report["source"]["made"]
    assert result.report["source"]["name"] == source
    assert result.report["source"]["seconds_per_1000"] > 0
    if source == "real":
        assert sorted(stored["labels"].unique().tolist()) == [5, 8]  # sandal, bag
    assert not (tmp_path / "out" / "synthetic").exists()


def test_eval_folder_gives_float_and_quantized_accuracy(tiny_sd: Path, tmp_path: Path) -> None:
    _write_images(tmp_path / "eval", ["trouser", "sneaker"], count=3)
    data = _config(
        tiny_sd,
        calibration={"source": "noise", "num_images": 16},
        evaluation={"eval_dir": str(tmp_path / "eval")},
    )
    result = run_genq(_build(data, tmp_path), tmp_path / "out")
    evaluation = result.report["evaluation"]
    assert set(evaluation["float"]) == {"top1", "top5"}
    assert 0.0 <= evaluation["quantized"]["top1"] <= 100.0
    assert "6 labelled images" in evaluation["on"]


def test_cancel_stops_before_writing_a_report(tiny_sd: Path, tmp_path: Path) -> None:
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(Canceled):
        run_genq(_build(_config(tiny_sd), tmp_path), tmp_path / "out", should_stop=should_stop)
    assert not (tmp_path / "out" / "report.json").exists()
    assert not (tmp_path / "out" / "synthetic" / "manifest.jsonl").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"filters": {"energy_kep": 0.5}}, "filters.energy_kep"),
        ({"generator": {}}, "generator.source"),
        ({"calibration": {"source": "real"}}, "real_dir"),
        ({"calibration": {"source": "webcam"}}, "calibration.source"),
        ({"quant": {"weight_bits": 17}}, "weight_bits"),
        (
            {"data_scarce": {"kshot_dir": "x"}, "calibration": {"source": "noise"}},
            "data_scarce",
        ),
    ],
)
def test_bad_configs_name_the_key(
    tiny_sd: Path, tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    data = _config(tiny_sd)
    data.update(change)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        _build(data, tmp_path)


def test_bad_class_folder_is_named(tiny_sd: Path, tmp_path: Path) -> None:
    _write_images(tmp_path / "real", ["bag", "handbag"], count=1)
    data = _config(tiny_sd, calibration={"source": "real", "real_dir": str(tmp_path / "real")})
    with pytest.raises(ValueError, match="handbag"):
        run_genq(_build(data, tmp_path), tmp_path / "out")


def test_cli_run_and_its_errors(
    tiny_sd: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_config(tiny_sd, calibration={"source": "noise", "num_images": 8})))
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "-q"]) == 0
    assert "GenQ report" in capsys.readouterr().out
    assert (tmp_path / "out" / "report.md").is_file()
    path.write_text(json.dumps({"classifier": {"source": "timm", "name": "x"}, "colour": 1}))
    assert main(["run", str(path), "--out", str(tmp_path / "out2")]) == 2
    assert "colour" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]) == 2


def test_vit_without_batchnorm_uses_patch_entropy(tiny_sd: Path, tmp_path: Path) -> None:
    def vit() -> torch.nn.Module:
        return timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=16,
            patch_size=4,
            embed_dim=32,
            depth=2,
            num_heads=2,
            num_classes=len(CLASSES),
        )

    data = _config(tiny_sd)
    data["classifier"] = {
        "source": "builder",
        "class_names": CLASSES,
        "preprocessing": {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5] * 3},
    }
    result = run_genq(_build(data, tmp_path), tmp_path / "out", builder=vit)
    filters = result.report["filters"]
    methods = {f["name"]: f["method"] for f in filters["filters"]}
    assert methods["distribution"] == "patch_entropy"
    assert any("patch" in note for note in filters["notes"])


def test_example_config_runs(tiny_sd: Path, tmp_path: Path) -> None:
    config = load_genq_config(ROOT / "examples" / "fashion_tiny.yaml")
    assert config.calibration.source == "genq"
    cheap = dataclasses.replace(
        config,
        generator=dataclasses.replace(config.generator, source=str(tiny_sd)),
        generation=dataclasses.replace(config.generation, num_per_class=4, steps=2),
        quant=dataclasses.replace(config.quant, reconstruction=ReconstructionConfig.cheap())
        if config.quant
        else None,
    )
    result = run_genq(cheap, tmp_path / "out")
    assert result.report["quant"] == {"weight_bits": 4, "act_bits": 4, "preset": "qdrop"}


def test_split_holdout_takes_the_classes_in_turn_and_holds_out_each_class_tail(
    tiny_sd: Path, tmp_path: Path
) -> None:
    config = _build(_config(tiny_sd, evaluation={"holdout_fraction": 0.25}), tmp_path)
    labels = torch.tensor([0] * 4 + [1] * 4 + [2] * 2)  # class by class, as generated
    images = torch.arange(10, dtype=torch.float32).reshape(10, 1, 1, 1)
    calibration, holdout = split_holdout(images, labels, config)
    # the last image of each class is held out; the rest alternate between the classes
    assert holdout is not None and holdout.flatten().tolist() == [3.0, 7.0, 9.0]
    assert calibration.flatten().tolist() == [0.0, 4.0, 8.0, 1.0, 5.0, 2.0, 6.0]
    # without labels, no reordering
    flat, _ = split_holdout(images, None, config)
    assert flat.flatten().tolist() == [float(i) for i in range(7)]


def test_quantizer_calibration_puts_the_kshot_images_first_and_keeps_the_cap(
    tiny_sd: Path, tmp_path: Path
) -> None:
    kshot = tmp_path / "kshot"
    _write_images(kshot, ["coat", "shirt"], count=2)
    data = _config(tiny_sd, data_scarce={"kshot_dir": str(kshot)})
    data["quant"]["max_calibration_images"] = 6
    config = _build(data, tmp_path)
    classifier = load(config.classifier)
    generated = torch.full((5, 1, 28, 28), 7.0)

    images, count = quantizer_calibration(generated, classifier, config)
    assert count == 4 and images.shape == (6, 1, 28, 28)
    assert not torch.any(images[:4] == 7.0) and torch.all(images[4:] == 7.0)
    # class by class in turn: coat, shirt, coat, shirt
    real, _, _ = load_labelled_image_folder(kshot, classifier.preprocessing, ["coat", "shirt"])
    assert torch.equal(images[:4], real[[0, 2, 1, 3]])

    # switched off, or outside the data-scarce mode: the generated images alone
    assert config.data_scarce is not None
    off = dataclasses.replace(
        config,
        data_scarce=dataclasses.replace(config.data_scarce, calibrate_with_kshot=False),
    )
    assert quantizer_calibration(generated, classifier, off)[1] == 0
    plain = dataclasses.replace(config, data_scarce=None)
    images, count = quantizer_calibration(generated, classifier, plain)
    assert count == 0 and torch.equal(images, generated)

    # by default the k-shot images fill at least half of the set, repeated in the same order
    # (above, 4 of 6 were more than half: each was used once)
    assert config.data_scarce.kshot_share == 0.5 and config.quant is not None
    uncapped = dataclasses.replace(
        config, quant=dataclasses.replace(config.quant, max_calibration_images=None)
    )
    many = torch.full((14, 1, 28, 28), 7.0)
    images, count = quantizer_calibration(many, classifier, uncapped)
    # the set keeps its size with each k-shot image once (4 + 14); half of it are k-shot images
    assert count == 9 and images.shape[0] == 18 and torch.all(images[9:] == 7.0)
    assert torch.equal(images[:9], real[[0, 2, 1, 3, 0, 2, 1, 3, 0]])
    once = dataclasses.replace(
        uncapped, data_scarce=dataclasses.replace(config.data_scarce, kshot_share=None)
    )
    images, count = quantizer_calibration(many, classifier, once)
    assert count == 4 and images.shape[0] == 18 and torch.equal(images[:4], real[[0, 2, 1, 3]])
    for bad in (0.0, 1.0, True):
        with pytest.raises(ValueError, match="kshot_share"):
            dataclasses.replace(config.data_scarce, kshot_share=bad)
