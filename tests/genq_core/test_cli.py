from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from genq_core.classifier import load_classifier
from genq_core.cli import main
from genq_core.quant import load_quantized

ARCH = "resnet10t"


def _write_images(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:03d}.png")


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=3).eval()
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    _write_images(tmp_path / "calib", 12, seed=0)
    for c, name in enumerate(["cat", "dog", "fox"]):
        _write_images(tmp_path / "eval" / name, 4, seed=10 + c)
    return tmp_path


def _args(ws: Path, *extra: str) -> list[str]:
    return [
        "quantize",
        "--model",
        str(ws / "model.safetensors"),
        "--arch",
        ARCH,
        "--calib",
        str(ws / "calib"),
        "--input-size",
        "3,32,32",
        "--output",
        str(ws / "out"),
        "--quiet",
        *extra,
    ]


def test_quantize_with_report_and_reloadable_model(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        _args(workspace, "--eval", str(workspace / "eval"), "-w", "8", "-a", "8", "--preset", "mse")
    )
    assert code == 0
    report = json.loads((workspace / "out" / "report.json").read_text())
    assert report["calibration"]["images"] == 12
    assert report["eval"]["images"] == 12
    assert set(report["eval"]["float"]) == {"top1", "top5"}
    assert report["eval"]["agreement"] >= 75.0  # 8-bit keeps most predictions
    assert report["calibration_set"]["output_sqnr_db"] > 15.0
    assert "| quantized |" in (workspace / "out" / "report.md").read_text()
    assert "| float |" in capsys.readouterr().out
    model = load_classifier(workspace / "model.safetensors", ARCH)
    reloaded = load_quantized(model, workspace / "out" / "model")
    assert reloaded.config.preset == "mse"


def test_quantize_learned_preset_from_tensor_file_with_onnx(workspace: Path) -> None:
    torch.save({"images": torch.randn(8, 3, 32, 32)}, workspace / "calib.pt")
    args = _args(workspace, "-w", "8", "-a", "8", "--preset", "qdrop", "--iters", "5", "--onnx")
    args[args.index("--calib") + 1] = str(workspace / "calib.pt")
    assert main(args) == 0
    assert (workspace / "out" / "model.onnx").is_file()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("--model", "missing.safetensors"), "does not exist"),
        (("--arch", "no_such_net"), "unknown timm architecture"),
        (("--arch", "resnet18"), "does not fit architecture"),
        (("--calib", "nowhere"), "does not exist"),
        (("-w", "17"), "weight_bits"),
    ],
)
def test_bad_input_is_a_clear_error(
    workspace: Path, capsys: pytest.CaptureFixture[str], change: tuple[str, str], message: str
) -> None:
    args = _args(workspace)
    flag, value = change
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_corrupt_image_named_and_pickle_refused(
    workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (workspace / "calib" / "broken.png").write_bytes(b"not a png")
    assert main(_args(workspace)) == 2
    assert "broken.png is not a readable image" in capsys.readouterr().err
    args = _args(workspace)
    del args[args.index("--arch") : args.index("--arch") + 2]
    assert main(args) == 2
    assert "--trust-pickle" in capsys.readouterr().err


def test_serve_options_of_the_embedded_mode_are_refused_without_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", "--workers", "2"]) == 2
    assert "--embedded" in capsys.readouterr().err
