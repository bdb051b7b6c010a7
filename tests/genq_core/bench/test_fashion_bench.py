"""Tests for genq_core.bench.fashion_bench: the reference benchmark in a tiny configuration.

The real Fashion-MNIST files and the committed BNConvNet weights are used; the generator is a
tiny random Stable Diffusion saved to a temp folder, and the shifted target a randomly
initialised SmallResNet registered in a temp ``classifiers.json`` (so both the manifest path and
the fallback path run). Everything else is cut to a few images and steps.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from genq_core.bench import fashion_bench as fb
from genq_core.bench.classifiers import small_resnet_fmnist
from genq_core.bench.fashion_mnist import dataset_available, normalize, to_float_images
from genq_core.bench.runinfo import file_sha256
from genq_core.cli import main
from genq_core.data import repeat_in_turn
from genq_core.generate.tiny import build_tiny_pipeline

pytestmark = pytest.mark.skipif(
    not dataset_available(),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)",
)

ASSETS = Path(__file__).resolve().parents[3] / "benchmarks" / "assets"
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> fb.BenchConfig:
    """Assets: the committed BNConvNet, a random shifted SmallResNet, a tiny generator."""
    if not (ASSETS / fb.BN_CNN_WEIGHTS).is_file():
        pytest.skip(f"{ASSETS / fb.BN_CNN_WEIGHTS} is missing")
    assets = tmp_path_factory.mktemp("assets")
    shutil.copy(ASSETS / fb.BN_CNN_WEIGHTS, assets / fb.BN_CNN_WEIGHTS)
    torch.manual_seed(0)
    target = small_resnet_fmnist()
    weights = assets / "fmnist_resnet_shifted.safetensors"
    save_file({k: v.contiguous() for k, v in target.state_dict().items()}, str(weights))
    manifest = {
        "models": {
            "resnet_shifted": {
                "builder": "genq_core.bench.classifiers:small_resnet_fmnist",
                "weights": weights.name,
                "sha256": file_sha256(weights),
                "domain": "shifted",
            }
        }
    }
    (assets / fb.CLASSIFIERS_MANIFEST).write_text(json.dumps(manifest))
    generator = assets / "tiny-sd"
    build_tiny_pipeline(sample_size=32).save_pretrained(generator)
    return fb.BenchConfig(
        models=("resnet",),  # not in the manifest: falls back to bn_cnn
        settings=((4, 4, 8),),
        seeds=(0,),
        presets=("qdrop", "minmax"),
        num_calibration=20,
        iters=2,
        steps=2,
        inversion_iters=2,
        data_scarce_ks=(1,),
        data_scarce_settings=((4, 4, 8),),
        textual_inversion_steps=2,
        test_images=200,
        assets_dir=str(assets),
        generator_dir=str(generator),
    )


@pytest.fixture(scope="module")
def bench_run(
    tiny_config: fb.BenchConfig, tmp_path_factory: pytest.TempPathFactory
) -> tuple[fb.BenchResult, Path]:
    root = tmp_path_factory.mktemp("bench")
    torch.set_num_threads(1)
    result = fb.run_benchmark(
        tiny_config,
        root / "work",
        root / "out",
        benchmarks_md=root / "BENCHMARKS.md",
        command="pytest tiny",
    )
    return result, root


def test_tiny_benchmark_writes_every_row(bench_run: tuple[fb.BenchResult, Path]) -> None:
    result, root = bench_run
    report = json.loads((root / "out" / fb.RESULTS_JSON).read_text())

    # the fallback model, noted
    assert list(report["models"]) == [fb.FALLBACK_MODEL]
    assert report["models"]["bn_cnn"]["requested"] == "resnet"
    assert any("'resnet' is not available" in note for note in report["notes"])
    assert 50.0 < report["models"]["bn_cnn"]["float_top1"] <= 100.0

    # every (source, preset) ran once, with a row of its own; every source was timed
    runs = report["runs"]
    assert {(r["row"], r["preset"]) for r in runs} == {
        (s, p) for s in fb.SOURCES for p in ("qdrop", "minmax")
    }
    assert len(runs) == len(fb.SOURCES) * 2
    assert all(0.0 <= r["top1"] <= 100.0 and r["calibration_images"] >= 1 for r in runs)
    assert len(report["rows"]) == len(runs) and all(row["n"] == 1 for row in report["rows"])
    for source in fb.SOURCES:
        entry = report["sources"]["bn_cnn"][source]
        assert entry["available"], source
        assert entry["seconds_per_1000"] >= 0.0
    assert {r["calibration_images"] for r in runs if r["row"] != "generated"} == {20}

    # how close each calibration set is to the training statistics: noise is the farthest
    distances = {s: report["sources"]["bn_cnn"][s]["bn_distance"] for s in fb.SOURCES}
    assert all(isinstance(d, float) and d >= 0.0 for d in distances.values())
    assert distances["noise"] > distances["real"]
    assert distances["genq_aligned"] < 0.8 * distances["genq"]  # what alignment lowers
    sources = report["sources"]["bn_cnn"]
    assert sources["genq_aligned"]["by_seed"][0]["detail"]["bn_align"] > 0.0
    assert sources["genq_aligned"]["seconds_per_1000"] > sources["genq"]["seconds_per_1000"]
    assert all(isinstance(report["sources"]["bn_cnn"][s]["mean_energy"], float) for s in fb.SOURCES)

    # the data-scarce block on the shifted target from the manifest
    scarce = report["data_scarce"]
    assert scarce["model"] == "resnet_shifted" and scarce["domain"] == "shifted"
    assert {(r["row"], r["k"]) for r in scarce["runs"]} == {
        ("textual_inversion", 1),
        ("textual_inversion_with_k", 1),
        ("plain_prompts_with_k", 1),
        ("textual_inversion_aligned", 1),
        ("textual_inversion_with_k_aligned", 1),
        ("plain_prompts_with_k_aligned", 1),
        ("real_k", 1),
        ("plain_prompts", 0),
        ("real_full", 0),
    }
    assert len(scarce["runs"]) == 2 * len(fb.DATA_SCARCE_METHODS)  # qdrop and minmax
    by_row = {r["row"]: r["calibration_images"] for r in scarce["runs"]}
    assert by_row["real_k"] == 10
    assert by_row["textual_inversion_with_k"] == by_row["plain_prompts_with_k"] == 20
    # each aligned row aligns its row's set: as many images, closer to the target's statistics
    for aligned, method in fb.ALIGNED_ROWS.items():
        assert by_row[aligned] == by_row[method]
        before = scarce["timings"][f"{method}:1"]
        after = scarce["timings"][f"{aligned}:1"]
        assert after["bn_distance"] < before["bn_distance"], aligned
        assert after["by_seed"][0]["detail"]["bn_align"] > 0.0

    # the tables: one row per source, the time table, the data-scarce table, the command
    markdown = (root / "out" / fb.RESULTS_MD).read_text()
    assert markdown == result.markdown
    for label in fb.SOURCE_LABELS.values():
        assert markdown.count(f"| {label} |") == 4  # qdrop, minmax, time and set statistics
    for label in fb.DATA_SCARCE_LABELS.values():
        assert f"| {label} (`qdrop`) |" in markdown
    assert "Time per 1000 calibration images" in markdown
    assert "Calibration sets against the training statistics" in markdown
    assert "D_BN of each set against the target's BatchNorm statistics" in markdown
    assert "Command: `pytest tiny`" in markdown
    # the speed comparison depends on inversion's length, which the header names
    assert "Model inversion: 2 Adam steps per batch from noise." in markdown

    # the data-scarce claims: the four textual-inversion rows against both references; the sets
    # with the k images added against plain prompts with them added; the aligned rows against
    # their unaligned sets, and the aligned set with the k images against the aligned control
    claims = [c["claim"] for c in report["checks"] if c["claim"].startswith("data-scarce")]
    assert len(claims) == (4 * 2 + 2 + 2 + 1) * len(report["config"]["data_scarce_settings"])
    assert any("BN-aligned beats the same set unaligned" in c for c in claims)
    assert any("beats plain prompts with the k images added, BN-aligned" in c for c in claims)
    assert any("textual inversion with the k images added beats the k real" in c for c in claims)
    assert any("beats plain prompts with the k images added" in c for c in claims)
    section = (root / "BENCHMARKS.md").read_text()
    assert "<!-- fashion-bench:begin -->" in section and "<!-- fashion-bench:end -->" in section
    assert "| W4A4 |" in section

    # the plots
    if HAS_MATPLOTLIB:
        names = {Path(p).name for p in report["plots"]}
        assert names == {
            "accuracy_bn_cnn.png",
            "filter_grid_bn_cnn.png",
            "filter_scores_bn_cnn.png",
            "data_scarce.png",
        }
        for name in names:
            assert (root / "out" / fb.PLOTS_FOLDER / name).stat().st_size > 1000
    else:
        assert report["plots"] == []
        assert any("matplotlib" in note for note in report["notes"])


def test_rerun_through_the_cli_reuses_everything(
    bench_run: tuple[fb.BenchResult, Path],
    tiny_config: fb.BenchConfig,
    capsys: pytest.CaptureFixture[str],
) -> None:
    result, root = bench_run
    runs_file = root / "work" / fb.RUNS_FILE
    lines_before = runs_file.read_text().splitlines()
    args = [
        "bench",
        "fashion",
        "--models", "resnet",
        "--settings", "W4A4",
        "--seeds", "0",
        "--presets", "qdrop,minmax",
        "--num-calib", "20",
        "--iters", "2",
        "--steps", "2",
        "--inversion-iters", "2",
        "--energy-keep", str(tiny_config.energy_keep),
        "--distribution-keep", str(tiny_config.distribution_keep),
        "--ks", "1",
        "--data-scarce-settings", "W4A4",
        "--ti-steps", "2",
        "--ti-lr", str(tiny_config.textual_inversion_lr),
        "--bn-align-iters", str(tiny_config.bn_align_iters),
        "--data-scarce-seeds", "0",
        "--test-images", "200",
        "--assets", tiny_config.assets_dir,
        "--generator", str(tiny_config.generator_dir),
        "--work-dir", str(root / "work"),
        "--out", str(root / "cli-out"),
        "--no-benchmarks-md",
        "--threads", "1",
        "-q",
    ]  # fmt: skip
    assert main(args) == 0
    assert runs_file.read_text().splitlines() == lines_before  # nothing ran again
    again = json.loads((root / "cli-out" / fb.RESULTS_JSON).read_text())
    assert [r["top1"] for r in again["runs"]] == [r["top1"] for r in result.report["runs"]]
    assert again["command"].startswith("genq bench fashion --models resnet --settings W4A4")
    assert again["config"]["data_scarce_seeds"] == [0]
    assert "--data-scarce-seeds 0" in again["command"]
    assert f"--energy-keep {tiny_config.energy_keep}" in again["command"]
    assert f"--ti-lr {tiny_config.textual_inversion_lr}" in again["command"]
    assert f"--bn-align-iters {tiny_config.bn_align_iters}" in again["command"]
    assert again["config"]["textual_inversion_per_class"] is False
    assert "| W4A4 |" in capsys.readouterr().out

    # only some rows of the data-scarce block
    rows_out = str(root / "cli-rows")
    some = [*args[: args.index("--out") + 1], rows_out, *args[args.index("--out") + 2 :]]
    assert main([*some, "--data-scarce-rows", "plain_prompts_with_k,real_k"]) == 0
    assert runs_file.read_text().splitlines() == lines_before
    rows = json.loads((Path(rows_out) / fb.RESULTS_JSON).read_text())
    assert {r["row"] for r in rows["data_scarce"]["runs"]} == {"plain_prompts_with_k", "real_k"}
    table = (Path(rows_out) / fb.RESULTS_MD).read_text()
    shown = [label for label in fb.DATA_SCARCE_LABELS.values() if f"| {label} (`qdrop`) |" in table]
    assert shown == [fb.DATA_SCARCE_LABELS["plain_prompts_with_k"], fb.DATA_SCARCE_LABELS["real_k"]]
    assert "--data-scarce-rows plain_prompts_with_k,real_k" in rows["command"]


def test_per_class_textual_inversion_prompts_each_class_with_its_own_token(
    tiny_config: fb.BenchConfig, tmp_path: Path
) -> None:
    config = dataclasses.replace(
        tiny_config, textual_inversion_per_class=True, textual_inversion_lr=1e-3
    )
    bench = fb._Bench(config, tmp_path / "work", torch.device("cpu"))
    pool = bench.ti_pool(1, 0, "shifted")
    assert pool.labels.shape[0] == config.pool_per_class * fb.NUM_CLASSES
    (folder,) = (tmp_path / "work" / "pools").iterdir()
    records = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    for record in records:
        assert f"<genq-class-{record['class_index']}>" in record["prompt"]
        assert fb.STYLE_TOKEN not in record["prompt"]
    # the shared-token pool of the same k and seed is a different cache entry
    shared = fb._Bench(tiny_config, tmp_path / "work", torch.device("cpu"))
    assert shared.ti_pool(1, 0, "shifted").fingerprint != pool.fingerprint


def test_a_dark_target_takes_its_domain_from_the_manifest(
    tiny_config: fb.BenchConfig, tmp_path: Path
) -> None:
    assets = tmp_path / "assets"
    shutil.copytree(tiny_config.assets_dir, assets)
    manifest = json.loads((assets / fb.CLASSIFIERS_MANIFEST).read_text())
    entry = manifest["models"]["resnet_shifted"]
    manifest["models"]["resnet_dark"] = {**entry, "domain": "dark"}
    manifest["models"]["resnet_odd"] = {**entry, "domain": "rotated"}
    (assets / fb.CLASSIFIERS_MANIFEST).write_text(json.dumps(manifest))
    config = dataclasses.replace(
        tiny_config, assets_dir=str(assets), data_scarce_model="resnet_dark"
    )
    notes: list[str] = []
    target = fb._resolve_target(config, notes)
    assert (target.domain, target.describe()["domain"], notes) == ("dark", "dark", [])
    with pytest.raises(ValueError, match="models: 'resnet_dark' is the domain-shifted target"):
        fb._resolve_models(dataclasses.replace(config, models=("resnet_dark",)), [])
    with pytest.raises(ValueError, match="model 'resnet_odd' has domain 'rotated'"):
        fb._load_classifier("resnet_odd", config, [])

    # k-shot and test images are darkened (x -> x ** 2) before normalisation
    data = fb._FashionData.load(config)
    pixels = to_float_images(data.train_images[data.kshot_indices(1, 0)])
    torch.testing.assert_close(data.kshot(1, 0, "dark"), normalize(pixels**2))
    test, _ = data.test("dark")
    torch.testing.assert_close(test[:4], normalize(to_float_images(data.test_images[:4]) ** 2))
    # caches made before there were other domains keep their keys
    assert fb._domain_parts("shifted") == {"shifted": True}
    assert fb._domain_parts("original") == {"shifted": False}
    assert fb._domain_parts("dark") == {"domain": "dark"}


def test_settings_round_trip() -> None:
    for setting in fb.DEFAULT_SETTINGS:
        assert fb.parse_setting(fb.setting_name(setting)) == setting
    assert fb.setting_name((4, 4, 4)) == "W4A4-fl4"
    assert fb.parse_setting("W2A4") == (2, 4, 8)
    with pytest.raises(ValueError, match="setting"):
        fb.parse_setting("W9A4")
    with pytest.raises(ValueError, match="setting"):
        fb.parse_setting("4/4")


def test_config_checks_and_serialises() -> None:
    config = fb.BenchConfig()
    assert config.pool_per_class == 256  # 1024 / (0.5 * 0.8) / 10 classes
    assert fb.BenchConfig.from_dict(config.to_dict()) == config
    assert config.scarce_seeds == config.seeds  # None: the data-scarce block uses every seed
    scarce = fb.BenchConfig(seeds=(0, 1, 2), data_scarce_seeds=(2,))
    assert scarce.scarce_seeds == (2,)
    assert fb.BenchConfig.from_dict(scarce.to_dict()) == scarce
    for bad in ((), (1, 1), (-1,)):
        with pytest.raises(ValueError, match="data_scarce_seeds"):
            fb.BenchConfig(data_scarce_seeds=bad)
    assert config.scarce_rows == fb.DATA_SCARCE_METHODS  # None: every row
    rows = fb.BenchConfig(data_scarce_rows=("plain_prompts_with_k", "real_k"))
    assert rows.scarce_rows == ("plain_prompts_with_k", "real_k")
    assert fb.BenchConfig.from_dict(rows.to_dict()) == rows
    for bad_rows in ((), ("real_k", "real_k"), ("imagenet",)):
        with pytest.raises(ValueError, match="data_scarce_rows"):
            fb.BenchConfig(data_scarce_rows=bad_rows)
    quick = fb.BenchConfig.quick(device="cpu")
    assert quick.seeds == (0,) and len(quick.settings) == 1
    with pytest.raises(ValueError, match="sources"):
        fb.BenchConfig(sources=("real", "imagenet"))
    with pytest.raises(ValueError, match="presets"):
        fb.BenchConfig(presets=("bogus",))
    with pytest.raises(ValueError, match="settings"):
        fb.BenchConfig(settings=((1, 4, 8),))
    with pytest.raises(ValueError, match="energy_keep"):
        fb.BenchConfig(energy_keep=0.0)
    with pytest.raises(ValueError, match="textual_inversion_lr"):
        fb.BenchConfig(textual_inversion_lr=0.0)
    with pytest.raises(ValueError, match="textual_inversion_per_class"):
        fb.BenchConfig(textual_inversion_per_class=1)  # type: ignore[arg-type]
    shared = fb.BenchConfig(kshot_share=0.5)
    assert fb.BenchConfig.from_dict(shared.to_dict()) == shared
    for bad_share in (0.0, 1.0, -0.5, float("nan"), "half"):
        with pytest.raises(ValueError, match="kshot_share"):
            fb.BenchConfig(kshot_share=bad_share)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown BenchConfig keys"):
        fb.BenchConfig.from_dict({"bogus": 1})


def test_k_images_fill_their_share_of_the_set_when_asked() -> None:
    generated = fb._Calibration(
        "gen", "g", torch.arange(100, 140.0).view(40, 1, 1, 1), {"images": 40}
    )
    kshot = fb._Calibration("k", "k", torch.arange(3.0).view(3, 1, 1, 1), {"images": 3})

    def mixed(share: float | None) -> fb._Calibration:
        bench = SimpleNamespace(config=fb.BenchConfig(num_calibration=20, kshot_share=share))
        return fb._with_kshot(bench, generated, kshot, seed=0)  # type: ignore[arg-type]

    once, half = mixed(None), mixed(0.5)
    for calibration in (once, half):
        assert calibration.images is not None and calibration.images.shape[0] == 20
    assert once.images is not None and half.images is not None
    assert sorted(v for v in once.images.flatten().tolist() if v < 100) == [0, 1, 2]
    real = sorted(v for v in half.images.flatten().tolist() if v < 100)
    assert real == [0.0] * 4 + [1.0] * 3 + [2.0] * 3  # 10 slots, the k images in turn
    generated_used = sorted(v for v in half.images.flatten().tolist() if v >= 100)
    assert generated_used == [100.0 + i for i in range(10)]  # the first generated images
    assert half.info["kshot_slots"] == 10 and once.info["kshot_slots"] == 3
    assert half.fingerprint != once.fingerprint != mixed(0.25).fingerprint
    # a share smaller than the k images: each once
    assert sorted(repeat_in_turn(torch.arange(5.0), 3).tolist()) == [0, 1, 2, 3, 4]
    assert "0.5 of the set" in half.name


def test_noise_note_marks_differences_smaller_than_two_standard_errors() -> None:
    def row(mean: float, std: float, n: int = 3) -> dict[str, float]:
        return {"mean": mean, "std": std, "n": n}

    # standard error of the difference: sqrt(0.1^2/3 + 0.1^2/3) = 0.082
    assert fb._noise_note(row(1.0, 0.1), row(0.9, 0.1)).endswith("within seed noise")
    assert fb._noise_note(row(1.0, 0.1), row(0.5, 0.1)) == "; +0.50 ± 0.08 s.e."
    assert fb._noise_note(row(1.0, 0.0, n=1), row(0.9, 0.0, n=1)) == ""


def test_run_store_sees_what_another_process_finished(tmp_path: Path) -> None:
    path = tmp_path / "runs.jsonl"
    mine, theirs = fb._RunStore(path), fb._RunStore(path)
    theirs.add({"key": "a", "top1": 90.0})
    assert mine.get("a") == {"key": "a", "top1": 90.0}
    assert mine.get("b") is None
    # a line still being written is left for later, then read once it is complete
    with path.open("a") as handle:
        handle.write('{"key": "b", "to')
    assert mine.get("b") is None
    with path.open("a") as handle:
        handle.write('p1": 80.0}\n')
    assert mine.get("b") == {"key": "b", "top1": 80.0}
    assert [record["key"] for record in mine.records()] == ["a", "b"]


def test_run_store_keeps_a_record_appended_after_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "runs.jsonl"
    path.write_text('{"key": "a", "top1": 90.0}\n{"key": "torn", "to')
    store = fb._RunStore(path)
    assert len(store) == 1
    store.add({"key": "b", "top1": 80.0})
    reloaded = fb._RunStore(path)
    assert reloaded.get("a") is not None and reloaded.get("b") == {"key": "b", "top1": 80.0}
    assert reloaded.get("torn") is None and len(reloaded) == 2


def test_benchmarks_sections_are_replaced_independently(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nhand-written intro\n")
    fb.write_benchmarks_section(path, "main v1\n")
    fb.write_benchmarks_section(path, "vit v1\n", section="fashion-bench-vit")
    fb.write_benchmarks_section(path, "main v2\n")
    text = path.read_text()
    assert "hand-written intro" in text
    assert "main v2" in text and "main v1" not in text and "vit v1" in text
    assert text.count("<!-- fashion-bench-vit:begin -->") == 1
    assert "## Reference benchmark (Fashion-MNIST): fashion-bench-vit" in text
    with pytest.raises(ValueError, match="section"):
        fb.write_benchmarks_section(path, "x", section="bad name -->")


def test_a_bad_section_name_stops_the_cli_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    with pytest.raises(SystemExit) as stopped:
        main(["bench", "fashion", "--section", "dark-share0.5", "--work-dir", str(work)])
    assert stopped.value.code == 2
    assert "--section: expected letters, digits and '-', got 'dark-share0.5'" in (
        capsys.readouterr().err
    )
    assert not work.exists()


def test_cached_only_reports_what_was_run_and_runs_nothing(
    bench_run: tuple[fb.BenchResult, Path], tiny_config: fb.BenchConfig
) -> None:
    result, root = bench_run
    runs_file = root / "work" / fb.RUNS_FILE
    lines_before = runs_file.read_text().splitlines()
    # seed 1 was never run: its sets and runs are reported missing instead of being made
    config = dataclasses.replace(tiny_config, seeds=(0, 1))
    report = fb.run_benchmark(
        config, root / "work", root / "cached-out", cached_only=True, command="pytest cached"
    ).report
    assert runs_file.read_text().splitlines() == lines_before
    assert sorted(r["top1"] for r in report["runs"]) == sorted(
        r["top1"] for r in result.report["runs"]
    )
    by_seed = report["sources"]["bn_cnn"]["genq"]["by_seed"]
    assert [entry["seed"] for entry in by_seed] == [0, 1]
    assert by_seed[1]["available"] is False and "not run" in by_seed[1]["note"]
    assert report["sources"]["bn_cnn"]["genq"]["available"]  # seed 0's set
    # a cell averaged over fewer seeds than the table's names them; a complete one does not
    partial = re.compile(r"\(seeds? [0-9, ]+ only\)")
    found = partial.search(fb.markdown_tables(report))
    assert found is not None and found.group(0) == "(seed 0 only)"
    assert partial.search(fb.markdown_tables(result.report)) is None

    # a table without noise makes no claim about real data against noise
    assert any("real data beats noise" in c["claim"] for c in result.report["checks"])
    only_real = dataclasses.replace(tiny_config, sources=("real",))
    report = fb.run_benchmark(
        only_real, root / "work", root / "real-out", cached_only=True, command="pytest real"
    ).report
    assert [r["row"] for r in report["runs"] if r["block"] == "main"] == ["real", "real"]
    assert not any("noise" in c["claim"] for c in report["checks"])
