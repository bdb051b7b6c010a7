"""``genq bench fashion``: GenQ's reference benchmark on Fashion-MNIST.

Every calibration source goes through the same quantizer (:func:`genq_core.quant.quantize_model`)
at every bit setting, preset and seed, and every quantized model is evaluated on the real 10k
Fashion-MNIST test set:

* ``real``: real images from the classifier's own part of the training split;
* ``genq``: images from the benchmark's Stable Diffusion, then the energy and distribution filters;
* ``generated``: the same generator without filters;
* ``energy_only`` / ``bn_only``: one filter alone, keeping the same fraction as the whole chain;
* ``inversion``: model inversion of the BatchNorm statistics (models with BatchNorm only);
* ``noise``: Gaussian noise in the classifier's normalised input space.

The data-scarce block quantizes a domain-shifted target (a classifier trained on its data in
another :data:`~genq_core.bench.classifiers.DOMAINS` entry: ``resnet_shifted`` on
:func:`~genq_core.bench.classifiers.shift_images`, ``resnet_dark`` on
:func:`~genq_core.bench.classifiers.darken_images`) with GenQ images generated after textual
inversion on k real images per class of that domain, with GenQ images from plain prompts, and with
the k real images per class alone, and evaluates it on the test set in that domain.

Everything expensive is cached under the work directory: the generated pools once per seed
(shared by every model), each calibration set once per (model, source, seed), and the result of
every quantization run as one JSON line, so an interrupted benchmark continues where it stopped
and a re-run with more settings runs only what is new. Cache entries are named by a fingerprint
of everything they depend on (weights, generator, settings), so stale ones are never reused.
Several processes may share one work directory (e.g. one per source, or one per seed order): the
caches are written atomically and each run first looks for the others' finished runs.

Outputs: ``fashion_bench.json`` (every run and the mean and standard deviation of each row),
``fashion_bench.md`` (the tables), PNG plots under ``plots/`` when matplotlib is installed, and
optionally a section of BENCHMARKS.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import genq_core
from genq_core.align import AlignConfig, align_to_bn_statistics
from genq_core.baselines import ModelInversionConfig, gaussian_noise, model_inversion
from genq_core.bench.classifiers import BUILDERS, DOMAINS, BNConvNet, evaluate_top1, to_domain
from genq_core.bench.fashion_mnist import (
    CLASS_NAMES,
    MEAN,
    NUM_CLASSES,
    STD,
    TrainSplit,
    load_split,
    normalize,
    split_train_indices,
    to_float_images,
)
from genq_core.bench.runinfo import cpu_name, file_sha256
from genq_core.data import Preprocessing, repeat_in_turn
from genq_core.filters import (
    FilterConfig,
    FilterReport,
    apply_filters,
    bn_distance,
    energy_scores,
    has_batchnorm,
)
from genq_core.generate import (
    DEFAULT_ADJECTIVES,
    DEFAULT_TEMPLATES,
    GenerationConfig,
    build_specs,
    generate_images,
    load_generator,
    load_images,
)
from genq_core.inversion import (
    TextualInversionConfig,
    apply_tokens,
    class_tokens,
    learn_tokens,
)
from genq_core.quant import PRESETS, QuantConfig, ReconstructionConfig, quantize_model
from genq_core.storage import LocalStorage

__all__ = [
    "ALIGNED_ROWS",
    "DATA_SCARCE_METHODS",
    "DEFAULT_SETTINGS",
    "FALLBACK_MODEL",
    "SOURCES",
    "BenchConfig",
    "BenchResult",
    "check_section_name",
    "markdown_tables",
    "parse_setting",
    "run_benchmark",
    "setting_name",
    "write_benchmarks_section",
]

logger = logging.getLogger(__name__)

Setting = tuple[int, int, int]
"""``(weight_bits, act_bits, first_last_bits)``."""

SOURCES: tuple[str, ...] = (
    "real",
    "genq",
    "genq_aligned",
    "generated",
    "energy_only",
    "bn_only",
    "inversion",
    "noise",
)
"""Calibration sources of the main table, in table order."""

SOURCE_LABELS: dict[str, str] = {
    "real": "real data",
    "genq": "GenQ (generator + energy + distribution filters)",
    "genq_aligned": "GenQ + BN alignment",
    "generated": "generator, no filter",
    "energy_only": "energy filter only",
    "bn_only": "distribution filter only (BN statistics; patch entropy without BN)",
    "inversion": "model inversion (BN statistics)",
    "noise": "Gaussian noise",
}

SOURCE_TIMED: dict[str, str] = {
    "real": "nothing to make (existing data)",
    "genq": "generation of the pool + both filters",
    "genq_aligned": "generation of the pool + both filters + alignment",
    "generated": "generation",
    "energy_only": "generation of the pool + energy filter",
    "bn_only": "generation of the pool + distribution filter",
    "inversion": "model inversion",
    "noise": "sampling",
}

DATA_SCARCE_METHODS: tuple[str, ...] = (
    "textual_inversion",
    "textual_inversion_with_k",
    "plain_prompts",
    "plain_prompts_with_k",
    "textual_inversion_aligned",
    "textual_inversion_with_k_aligned",
    "plain_prompts_with_k_aligned",
    "real_k",
    "real_full",
)
"""Rows of the data-scarce table: GenQ after textual inversion on the k images, the same set with
the k images themselves put in it, GenQ with plain prompts, the plain-prompt set with the k images
put in it (the control that tells what the token adds once the k images are in), the three
``*_aligned`` sets after BN alignment to the target (what a job with ``quant.bn_align_iters`` does;
only for a target with BatchNorm), the k real images per class alone, and (reference) the usual
number of real images."""

ALIGNED_ROWS: dict[str, str] = {
    "textual_inversion_aligned": "textual_inversion",
    "textual_inversion_with_k_aligned": "textual_inversion_with_k",
    "plain_prompts_with_k_aligned": "plain_prompts_with_k",
}
"""Each BN-aligned data-scarce row and the row whose set it aligns."""

KSHOT_METHODS: tuple[str, ...] = (
    "textual_inversion",
    "textual_inversion_with_k",
    "plain_prompts_with_k",
    "textual_inversion_aligned",
    "textual_inversion_with_k_aligned",
    "plain_prompts_with_k_aligned",
    "real_k",
)
"""The data-scarce rows that depend on k (the others are drawn once per seed)."""

DATA_SCARCE_LABELS: dict[str, str] = {
    "textual_inversion": "GenQ + textual inversion on the k images",
    "textual_inversion_with_k": "GenQ + textual inversion, the k images added to the set",
    "plain_prompts": "GenQ, plain prompts (no k images)",
    "plain_prompts_with_k": "GenQ, plain prompts, the k images added to the set",
    "textual_inversion_aligned": "GenQ + textual inversion, BN-aligned",
    "textual_inversion_with_k_aligned": "GenQ + textual inversion, the k images added, BN-aligned",
    "plain_prompts_with_k_aligned": "GenQ, plain prompts, the k images added, BN-aligned",
    "real_k": "the k real images per class alone",
    "real_full": "real data, full calibration set (reference)",
}

DEFAULT_SETTINGS: tuple[Setting, ...] = (
    (8, 8, 8),
    (4, 4, 8),
    (2, 4, 8),
    (3, 3, 8),
    (2, 3, 8),
    (4, 4, 4),
)
"""W8A8, W4A4, W2A4 (first/last layer 8-bit) and harder settings that separate the sources on a
small Fashion-MNIST network: W3A3, W2A3, and W4A4 with 4-bit first and last layers."""

FALLBACK_MODEL = "bn_cnn"
"""The model used when a requested one is missing: :class:`BNConvNet` with the committed
``bn_cnn_fmnist.safetensors`` (trained by ``benchmarks/quant_engine.py``)."""

BN_CNN_WEIGHTS = "bn_cnn_fmnist.safetensors"
CLASSIFIERS_MANIFEST = "classifiers.json"
GENERATOR_FOLDER = "fashion-sd"
BUILDER_MODULE = "genq_core.bench.classifiers"

# Textual-inversion prompts put the learned token where the generator's training captions had an
# adjective ("a photo of a {adjective} {cls}"), and stay within its 16-token text encoder.
DATA_SCARCE_TEMPLATES: tuple[str, ...] = (
    "a photo of a {token} {cls}",
    "a {token} photo of a {cls}",
    "a photo of the {token} {cls}",
)
STYLE_TOKEN = "<fmnist-style>"

SECTION = "fashion-bench"
SECTION_TITLE = "Reference benchmark (Fashion-MNIST)"
RESULTS_JSON = "fashion_bench.json"
RESULTS_MD = "fashion_bench.md"
PLOTS_FOLDER = "plots"
RUNS_FILE = "runs.jsonl"

# a setting "clearly" separates sources when real data beats noise by this many points
CLEAR_MARGIN = 2.0
_LOG_EVERY_S = 30.0
_SETTING_PATTERN = re.compile(r"W(\d)A(\d)(?:-fl(\d))?")


@dataclass(frozen=True)
class BenchConfig:
    """Everything that decides the benchmark's numbers.

    Attributes:
        models: classifier names: entries of ``classifiers.json`` in ``assets_dir`` (``resnet``,
            ``vit``) or ``bn_cnn``. A missing one is replaced by :data:`FALLBACK_MODEL`.
        settings: ``(weight_bits, act_bits, first_last_bits)`` of every column.
        sources: calibration sources (rows), a subset of :data:`SOURCES`.
        seeds: one run per seed; each seed makes its own calibration sets.
        presets: quantizer presets; the first is the headline (``qdrop``), the others are extra
            tables (``minmax``: range calibration only).
        num_calibration: calibration images per run.
        iters: reconstruction steps per block of the learned presets.
        guidance_scale: classifier-free guidance of the generator.
        steps: DDIM steps per image (10 classify as well as 25 on the shipped generator:
            ``benchmarks/fashion/generator_steps.py``).
        energy_keep: fraction of each class the energy filter keeps.
        distribution_keep: fraction of each class the distribution filter then keeps. The pool
            is oversampled so that about ``num_calibration`` images survive both filters; the
            single-filter sources keep ``energy_keep * distribution_keep`` of the same pool.
        generation_batch_size: images per pipeline call.
        inversion_iters: Adam steps per batch of model inversion.
        data_scarce_model: the domain-shifted target (``resnet_shifted`` or ``resnet_dark``),
            ``None`` to skip the data-scarce block.
        data_scarce_ks: real images per class given to the data-scarce block.
        data_scarce_settings: bit settings of the data-scarce block.
        data_scarce_seeds: seeds of the data-scarce block (``None``: the same as ``seeds``).
        data_scarce_rows: rows of the data-scarce block to run (``None``: every row of
            :data:`DATA_SCARCE_METHODS`).
        bn_align_iters: steps of BN alignment of the ``genq_aligned`` source and the
            ``*_aligned`` data-scarce rows (:func:`genq_core.align.align_to_bn_statistics`, its
            default learning rate).
        textual_inversion_steps: steps of textual inversion in the data-scarce block.
        textual_inversion_lr: learning rate of the learned token rows.
        textual_inversion_per_class: also learn one token per class (it takes the style token's
            place in that class's prompts) instead of one shared style token only.
        kshot_share: in the data-scarce rows that add the k real images to a generated set, the
            share of the calibration set they fill at least, repeated in turn as often as that
            takes (``None``: each k image once, the rest generated).
        test_images: evaluate on the first N test images only (``None``: all 10k).
        assets_dir: folder with ``classifiers.json``, the weights and the generator.
        generator_dir: the generator's ``save_pretrained`` folder (default
            ``assets_dir/fashion-sd``).
        device: ``cpu`` or ``cuda``; everything runs there.
    """

    models: tuple[str, ...] = ("resnet", "vit")
    settings: tuple[Setting, ...] = DEFAULT_SETTINGS
    sources: tuple[str, ...] = SOURCES
    seeds: tuple[int, ...] = (0, 1, 2)
    presets: tuple[str, ...] = ("qdrop", "minmax")
    num_calibration: int = 1024
    iters: int = 500
    guidance_scale: float = 5.0
    steps: int = 10
    energy_keep: float = 0.5
    distribution_keep: float = 0.8
    generation_batch_size: int = 32
    inversion_iters: int = 500
    data_scarce_model: str | None = "resnet_shifted"
    data_scarce_ks: tuple[int, ...] = (1, 5, 10)
    data_scarce_settings: tuple[Setting, ...] = ((4, 4, 8), (2, 4, 8))
    data_scarce_seeds: tuple[int, ...] | None = None
    data_scarce_rows: tuple[str, ...] | None = None
    bn_align_iters: int = 50
    textual_inversion_steps: int = 500
    textual_inversion_lr: float = 5e-3
    textual_inversion_per_class: bool = False
    kshot_share: float | None = None
    test_images: int | None = None
    assets_dir: str = "benchmarks/assets"
    generator_dir: str | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("models", "settings", "sources", "seeds", "presets", "data_scarce_ks"):
            value = getattr(self, name)
            _check(isinstance(value, tuple), name, value, "must be a tuple")
            _check(len(set(value)) == len(value), name, value, "has duplicates")
        for name in ("models", "settings", "sources", "seeds", "presets"):
            _check(len(getattr(self, name)) > 0, name, getattr(self, name), "must not be empty")
        for name in self.models:
            _check(isinstance(name, str) and bool(name), "models", self.models, "need names")
        for setting in (*self.settings, *self.data_scarce_settings):
            _check_setting(setting)
        unknown = [s for s in self.sources if s not in SOURCES]
        _check(not unknown, "sources", self.sources, f"may only hold {SOURCES}")
        unknown = [p for p in self.presets if p not in PRESETS]
        _check(not unknown, "presets", self.presets, f"may only hold {sorted(PRESETS)}")
        for seed in self.seeds:
            _check(_is_int(seed) and seed >= 0, "seeds", self.seeds, "must be integers >= 0")
        if self.data_scarce_seeds is not None:
            value = self.data_scarce_seeds
            _check_subset_tuple(value, "data_scarce_seeds")
            for seed in value:
                ok = _is_int(seed) and seed >= 0
                _check(ok, "data_scarce_seeds", value, "must be integers >= 0")
        if self.data_scarce_rows is not None:
            rows = self.data_scarce_rows
            _check_subset_tuple(rows, "data_scarce_rows")
            unknown = [r for r in rows if r not in DATA_SCARCE_METHODS]
            _check(not unknown, "data_scarce_rows", rows, f"may only hold {DATA_SCARCE_METHODS}")
        for name in (
            "num_calibration",
            "iters",
            "steps",
            "generation_batch_size",
            "inversion_iters",
            "bn_align_iters",
            "textual_inversion_steps",
        ):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 1, name, value, "must be an integer >= 1")
        for name in ("energy_keep", "distribution_keep"):
            value = getattr(self, name)
            _check(_is_number(value) and 0 < value <= 1, name, value, "must be in (0, 1]")
        value = self.textual_inversion_lr
        ok = _is_number(value) and 0 < value < math.inf
        _check(ok, "textual_inversion_lr", value, "must be a finite number > 0")
        value = self.textual_inversion_per_class
        _check(isinstance(value, bool), "textual_inversion_per_class", value, "must be a bool")
        if self.kshot_share is not None:
            ok = _is_number(self.kshot_share) and 0 < self.kshot_share < 1
            _check(ok, "kshot_share", self.kshot_share, "must be in (0, 1) or None")
        ok = _is_number(self.guidance_scale) and 0 <= self.guidance_scale < math.inf
        _check(ok, "guidance_scale", self.guidance_scale, "must be a finite number >= 0")
        for k in self.data_scarce_ks:
            _check(_is_int(k) and k >= 1, "data_scarce_ks", self.data_scarce_ks, "must be >= 1")
        if self.test_images is not None:
            ok = _is_int(self.test_images) and self.test_images >= 1
            _check(ok, "test_images", self.test_images, "must be an integer >= 1 or None")
        try:
            torch.device(self.device)
        except RuntimeError as err:
            raise ValueError(f"device: {err}") from err

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        """A reduced run for a few CPU minutes: tiny counts, few steps, one setting, one seed."""
        values: dict[str, Any] = {
            "models": ("resnet",),
            "settings": ((4, 4, 8),),
            "seeds": (0,),
            "num_calibration": 64,
            "iters": 20,
            "steps": 10,
            "inversion_iters": 20,
            "bn_align_iters": 5,
            "data_scarce_ks": (1, 5),
            "data_scarce_settings": ((4, 4, 8),),
            "textual_inversion_steps": 20,
            "test_images": 2000,
        }
        values.update(overrides)
        return cls(**values)

    @property
    def kept_fraction(self) -> float:
        """The fraction of the pool that reaches the calibration set through both filters."""
        return self.energy_keep * self.distribution_keep

    @property
    def scarce_seeds(self) -> tuple[int, ...]:
        """The seeds of the data-scarce block."""
        return self.seeds if self.data_scarce_seeds is None else self.data_scarce_seeds

    @property
    def scarce_rows(self) -> tuple[str, ...]:
        """The rows of the data-scarce block that run."""
        return DATA_SCARCE_METHODS if self.data_scarce_rows is None else self.data_scarce_rows

    @property
    def pool_per_class(self) -> int:
        """Images generated per class, so that ~``num_calibration`` survive both filters."""
        return math.ceil(self.num_calibration / self.kept_fraction / NUM_CLASSES)

    @property
    def generator_path(self) -> Path:
        return Path(self.generator_dir or Path(self.assets_dir) / GENERATOR_FOLDER)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples become lists); inverse of :meth:`from_dict`."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchConfig:
        """Build from :meth:`to_dict`'s output; unknown keys raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown BenchConfig keys: {unknown}")
        values = dict(data)
        for name in (
            "models",
            "sources",
            "seeds",
            "presets",
            "data_scarce_ks",
            "data_scarce_seeds",
            "data_scarce_rows",
        ):
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        for name in ("settings", "data_scarce_settings"):
            if isinstance(values.get(name), list):
                values[name] = tuple(tuple(s) for s in values[name])
        return cls(**values)


@dataclass
class BenchResult:
    """What :func:`run_benchmark` wrote.

    Attributes:
        report: the results JSON (every run, the row statistics, timings, checks).
        markdown: the tables.
        files: every file written (JSON, markdown, plots).
    """

    report: dict[str, Any]
    markdown: str
    files: list[Path] = field(default_factory=list)


def setting_name(setting: Setting) -> str:
    """``(4, 4, 8)`` -> ``"W4A4"``; first/last bits other than 8 are added: ``"W4A4-fl4"``."""
    weight_bits, act_bits, first_last_bits = setting
    suffix = "" if first_last_bits == 8 else f"-fl{first_last_bits}"
    return f"W{weight_bits}A{act_bits}{suffix}"


def parse_setting(text: str) -> Setting:
    """Inverse of :func:`setting_name`: ``"W2A4"`` -> ``(2, 4, 8)``, ``"W4A4-fl4"`` -> ``(4, 4, 4)``.

    Raises:
        ValueError: not of that form, or bits outside 2..8.
    """
    match = _SETTING_PATTERN.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"setting: expected W<bits>A<bits> or W<bits>A<bits>-fl<bits>, got {text!r}"
        )
    setting = (int(match[1]), int(match[2]), int(match[3] or 8))
    _check_setting(setting)
    return setting


def run_benchmark(
    config: BenchConfig,
    work_dir: str | Path,
    out_dir: str | Path,
    *,
    benchmarks_md: str | Path | None = None,
    command: str = "genq bench fashion",
    section: str = SECTION,
    cached_only: bool = False,
) -> BenchResult:
    """Run the benchmark (or its missing parts) and write its results.

    Args:
        config: what to run.
        work_dir: the cache: generated pools, calibration sets, finished runs. Reusing it skips
            everything already done with the same inputs.
        out_dir: where ``fashion_bench.json``, ``fashion_bench.md`` and ``plots/`` go.
        benchmarks_md: a BENCHMARKS.md whose ``fashion-bench`` section is replaced by the
            tables (added if missing); ``None`` leaves it alone.
        command: the command line echoed with the tables.
        section: the section of ``benchmarks_md`` to replace (another name keeps a second table,
            e.g. of other models, next to the main one).
        cached_only: report what ``work_dir`` holds and run nothing: missing calibration sets
            show as unavailable ("not run") and missing runs as empty cells. For assembling the
            results of several invocations that shared ``work_dir`` (e.g. one per seed).

    Raises:
        ValueError: a bad config or a weights file whose checksum differs from its manifest.
        FileNotFoundError: Fashion-MNIST, the fallback classifier or the generator missing.
    """
    # 1. check inputs; data, classifiers, caches
    if not isinstance(config, BenchConfig):
        raise ValueError(f"config must be a BenchConfig, got {type(config).__name__}")
    started = time.perf_counter()
    device = torch.device(config.device)
    bench = _Bench(config, Path(work_dir), device, cached_only=cached_only)
    notes: list[str] = []
    models = _resolve_models(config, notes)
    target = _resolve_target(config, notes) if config.data_scarce_model else None
    bench.plan(models, target)

    # 2. the main table: each model, each seed, each source, then every setting and preset
    models_info: dict[str, Any] = {}
    sources_info: dict[str, Any] = {}
    filter_scores: dict[str, dict[str, torch.Tensor]] = {}
    for classifier in models:
        float_top1 = bench.float_top1(classifier)
        models_info[classifier.name] = {**classifier.describe(), "float_top1": float_top1}
        logger.info("%s: float top-1 %.2f%%", classifier.name, float_top1)
        per_source: dict[str, list[dict[str, Any]]] = {source: [] for source in config.sources}
        for seed in config.seeds:
            for source in config.sources:
                calibration = bench.calibration(classifier, source, seed)
                if calibration.images is None:
                    per_source[source].append({"seed": seed, **calibration.info})
                    continue
                set_stats = bench.set_statistics(classifier, calibration.images)
                per_source[source].append({"seed": seed, **calibration.info, **set_stats})
                for setting in config.settings:
                    for preset in config.presets:
                        bench.run(
                            classifier,
                            calibration,
                            setting,
                            preset,
                            seed,
                            float_top1,
                            block="main",
                            row=source,
                        )
        sources_info[classifier.name] = {
            source: _source_summary(entries) for source, entries in per_source.items()
        }
        if any(s in config.sources for s in ("genq", "energy_only", "bn_only")):
            filter_scores[classifier.name] = bench.filter_scores(classifier, config.seeds[0])

    # 3. the data-scarce block on the shifted target
    data_scarce: dict[str, Any] | None = None
    if target is not None:
        data_scarce = _data_scarce(bench, target)

    # 4. report: JSON, markdown, plots, BENCHMARKS.md
    runs = bench.runs_done()
    report: dict[str, Any] = {
        "benchmark": "fashion",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "command": command,
        "machine": _machine(device),
        "versions": _versions(),
        "config": config.to_dict(),
        "models": models_info,
        "sources": sources_info,
        "runs": [r for r in runs if r["block"] == "main"],
        "rows": _rows([r for r in runs if r["block"] == "main"]),
        "data_scarce": data_scarce,
        "notes": notes,
        "seconds": 0.0,
    }
    report["checks"] = _checks(report)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    plot_files, plot_notes = _plots(report, bench, filter_scores, out / PLOTS_FOLDER)
    report["plots"] = [str(p.relative_to(out)) for p in plot_files]
    notes.extend(plot_notes)
    report["seconds"] = time.perf_counter() - started
    markdown = markdown_tables(report)
    _write_text(out / RESULTS_JSON, json.dumps(report, indent=2, allow_nan=False) + "\n")
    _write_text(out / RESULTS_MD, markdown)
    files += [out / RESULTS_JSON, out / RESULTS_MD, *plot_files]
    if benchmarks_md is not None:
        write_benchmarks_section(Path(benchmarks_md), markdown, plot_files, section=section)
    logger.info("benchmark done in %.0f s; wrote %s", report["seconds"], out)
    return BenchResult(report, markdown, files)


def markdown_tables(report: dict[str, Any]) -> str:
    """The human-readable tables of a :func:`run_benchmark` report."""
    config = BenchConfig.from_dict(report["config"])
    settings = [setting_name(s) for s in config.settings]
    rows = {
        (r["model"], r["preset"], r["setting"], r["row"]): r
        for r in report["rows"]
        if r["block"] == "main"
    }
    test = "the 10k test set" if config.test_images is None else f"{config.test_images} test images"
    header = (
        f"Top-1 (%) on {test}, mean ± std over seeds {list(config.seeds)}; "
        f"{config.num_calibration} calibration images per run; {config.iters} reconstruction steps "
        f"per block; first/last layer bits as named (W4A4 = first/last 8-bit, -fl4 = 4-bit). "
        f"Generated pool: {config.pool_per_class} images per class (guidance "
        f"{config.guidance_scale:g}, {config.steps} DDIM steps), filters keep "
        f"{config.energy_keep:g} (energy) then {config.distribution_keep:g} (distribution) per "
        f"class; each filter alone keeps {config.kept_fraction:g} of the same pool."
    )
    if "genq_aligned" in config.sources:
        header += (
            f" GenQ + BN alignment: the GenQ set after {config.bn_align_iters} steps of BN "
            "alignment (`genq_core.align`)."
        )
    if "inversion" in config.sources:
        header += f" Model inversion: {config.inversion_iters} Adam steps per batch from noise."
    lines = [header]
    for model, info in report["models"].items():
        for preset in config.presets:
            lines += [
                "",
                f"### {model}: `{preset}` (float top-1 {info['float_top1']:.2f}%)",
                "",
                "| source | " + " | ".join(settings) + " |",
                "|---|" + "---|" * len(settings),
                "| float (not quantized) | "
                + " | ".join(f"{info['float_top1']:.2f}" for _ in settings)
                + " |",
            ]
            for source in config.sources:
                available = report["sources"][model][source]["available"]
                cells = [
                    _cell(rows.get((model, preset, s, source)), config.seeds)
                    if available
                    else "n/a"
                    for s in settings
                ]
                lines.append(f"| {SOURCE_LABELS[source]} | " + " | ".join(cells) + " |")
            if "real" in config.sources and "noise" in config.sources:
                gaps = []
                for s in settings:
                    real = rows.get((model, preset, s, "real"))
                    noise = rows.get((model, preset, s, "noise"))
                    gaps.append(
                        ""
                        if real is None or noise is None
                        else f"{real['mean'] - noise['mean']:+.2f}"
                    )
                lines.append("| *real minus noise* | " + " | ".join(gaps) + " |")
        unavailable = [
            f"{source}: {entry['note']}"
            for source, entry in report["sources"][model].items()
            if not entry["available"]
        ]
        if unavailable:
            lines += ["", f"n/a for {model}: " + "; ".join(unavailable) + "."]

    models = list(report["models"])
    lines += [
        "",
        "### Time per 1000 calibration images (s, mean over seeds)",
        "",
        "| source | what is timed | " + " | ".join(models) + " |",
        "|---|---|" + "---|" * len(models),
    ]
    for source in config.sources:
        cells = []
        for model in models:
            entry = report["sources"][model][source]
            if not entry["available"]:
                cells.append("n/a")
            elif source == "real":
                cells.append("—")
            else:
                cells.append(f"{entry['seconds_per_1000']:.1f}")
        lines.append(
            f"| {SOURCE_LABELS[source]} | {SOURCE_TIMED[source]} | " + " | ".join(cells) + " |"
        )

    lines += ["", *_set_statistics_markdown(report, config)]
    if report.get("data_scarce"):
        lines += ["", *_data_scarce_markdown(report["data_scarce"], config)]
    if report.get("checks"):
        lines += ["", "### Targets of issue 4 (computed from the numbers above)", ""]
        for check in report["checks"]:
            verdict = {True: "holds", False: "**does not hold**", None: "not measured"}[
                check["holds"]
            ]
            lines.append(f"- {check['claim']}: {verdict} ({check['detail']})")
    if report.get("notes"):
        lines += ["", "Notes:", *(f"- {note}" for note in report["notes"])]
    lines += [
        "",
        f"Command: `{report['command']}` ({report['date']}; {report['machine']}; "
        f"genq {report['versions']['genq']}, torch {report['versions']['torch']}; "
        f"{report['seconds'] / 60:.0f} min in this invocation, cached parts not counted).",
    ]
    return "\n".join(lines) + "\n"


def check_section_name(section: str) -> str:
    """``section`` if it can name a BENCHMARKS.md section: letters, digits and ``-``.

    Raises:
        ValueError: it cannot; the message names it.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", section):
        raise ValueError(f"section: expected letters, digits and '-', got {section!r}")
    return section


def write_benchmarks_section(
    path: Path, markdown: str, plots: Sequence[Path] = (), section: str = SECTION
) -> None:
    """Replace the ``section`` (default ``fashion-bench``) of ``path`` (a BENCHMARKS.md).

    The section sits between ``<!-- fashion-bench:begin -->`` and ``<!-- fashion-bench:end -->``;
    it is appended under its own heading when missing. Plots are linked relative to ``path``.

    Raises:
        ValueError: ``section`` is not made of letters, digits and ``-``.
    """
    check_section_name(section)
    body = markdown
    if plots:
        links = []
        for plot in plots:
            target = os.path.relpath(plot, path.parent)
            links.append(f"[{plot.name}]({target})")
        body += "\nPlots: " + ", ".join(links) + ".\n"
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    block = f"{begin}\n{body}{end}"
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        title = SECTION_TITLE if section == SECTION else f"{SECTION_TITLE}: {section}"
        text = text.rstrip("\n") + f"\n\n## {title}\n\n{block}\n"
    _write_text(path, text)


# ---------------------------------------------------------------------------------------------
# classifiers


@dataclass
class _Classifier:
    """A float classifier of the benchmark, on the benchmark's device, in eval mode."""

    name: str
    requested: str
    model: nn.Module
    domain: str
    sha256: str
    source: str
    note: str | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "weights": self.source,
            "weights_sha256": self.sha256,
            "params": sum(p.numel() for p in self.model.parameters()),
            "domain": self.domain,
            "batchnorm": has_batchnorm(self.model),
            "note": self.note,
        }


def _resolve_models(config: BenchConfig, notes: list[str]) -> list[_Classifier]:
    """The requested classifiers, each replaced by the fallback when missing (noted once)."""
    resolved: dict[str, _Classifier] = {}
    for name in config.models:
        classifier = _load_classifier(name, config, notes)
        if classifier.domain != "original":
            raise ValueError(
                f"models: {name!r} is the domain-shifted target; name it as data_scarce_model"
            )
        resolved.setdefault(classifier.name, classifier)
    return list(resolved.values())


def _resolve_target(config: BenchConfig, notes: list[str]) -> _Classifier:
    assert config.data_scarce_model is not None
    target = _load_classifier(config.data_scarce_model, config, notes)
    if target.domain == "original":
        notes.append(
            f"data-scarce block: {target.name} is not a domain-shifted classifier, so the block "
            "runs on the original domain (k-shot and test images unshifted)"
        )
    return target


def _load_classifier(name: str, config: BenchConfig, notes: list[str]) -> _Classifier:
    """``bn_cnn`` or an entry of ``classifiers.json``; the fallback when that is missing."""
    assets = Path(config.assets_dir)
    device = torch.device(config.device)
    if name == FALLBACK_MODEL:
        return _load_bn_cnn(assets, name, device)
    manifest = assets / CLASSIFIERS_MANIFEST
    entries = json.loads(manifest.read_text()).get("models", {}) if manifest.is_file() else {}
    entry = entries.get(name)
    weights = assets / entry["weights"] if entry else None
    if entry is None or weights is None or not weights.is_file():
        why = (
            f"{manifest} does not exist"
            if not manifest.is_file()
            else f"{manifest} has no model {name!r} (it has {sorted(entries)})"
            if entry is None
            else f"its weights {weights} do not exist"
        )
        message = (
            f"model {name!r} is not available ({why}); using {FALLBACK_MODEL} (BNConvNet, "
            f"{assets / BN_CNN_WEIGHTS}) instead. Train it with "
            f"`python benchmarks/fashion/train_classifiers.py --only {name}`."
        )
        logger.warning(message)
        notes.append(message)
        fallback = _load_bn_cnn(assets, name, device)
        fallback.note = message
        return fallback
    module, _, builder_name = str(entry["builder"]).partition(":")
    if module != BUILDER_MODULE or builder_name not in BUILDERS:
        raise ValueError(
            f"{manifest}: model {name!r} has builder {entry['builder']!r}; expected "
            f"{BUILDER_MODULE}:<one of {sorted(BUILDERS)}>"
        )
    digest = file_sha256(weights)
    if entry.get("sha256") and entry["sha256"] != digest:
        raise ValueError(
            f"{weights}: sha256 {digest} differs from {manifest} ({entry['sha256']}); the weights "
            "changed after the manifest was written (retrain or restore them)"
        )
    torch.manual_seed(0)
    model = BUILDERS[builder_name]()
    model.load_state_dict(load_file(str(weights)))
    return _Classifier(
        name=name,
        requested=name,
        model=model.to(device).eval(),
        domain=_manifest_domain(name, entry, manifest),
        sha256=digest,
        source=str(weights),
    )


def _load_bn_cnn(assets: Path, requested: str, device: torch.device) -> _Classifier:
    weights = assets / BN_CNN_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights} does not exist; train it with `python benchmarks/quant_engine.py --quick`"
        )
    torch.manual_seed(0)
    model = BNConvNet()
    model.load_state_dict(load_file(str(weights)))
    return _Classifier(
        name=FALLBACK_MODEL,
        requested=requested,
        model=model.to(device).eval(),
        domain="original",
        sha256=file_sha256(weights),
        source=str(weights),
    )


# ---------------------------------------------------------------------------------------------
# calibration sets, pools and runs


@dataclass
class _Calibration:
    """One calibration set, or why a source is not available for a model.

    Attributes:
        name: ``model/source/seed`` for logs.
        fingerprint: hash of everything the images depend on.
        images: normalised ``[N, 1, 28, 28]``; ``None`` when the source is not available.
        info: ``available``, ``images``, ``seconds``, ``seconds_per_1000``, ``detail``, ``note``.
    """

    name: str
    fingerprint: str
    images: torch.Tensor | None
    info: dict[str, Any]


@dataclass
class _Pool:
    """Generated images of one seed (and k-shot set), preprocessed for the classifiers.

    Attributes:
        images: normalised ``[N, 1, 28, 28]``, class by class.
        labels: ``[N]`` prompted class.
        seconds: generation + preprocessing (+ textual inversion) wall time.
        detail: seconds by part.
        fingerprint: hash of everything the images depend on.
    """

    images: torch.Tensor
    labels: torch.Tensor
    seconds: float
    detail: dict[str, float]
    fingerprint: str


class _NotCached(LookupError):
    """A pool a ``cached_only`` bench would have to generate."""


class _Bench:
    """The benchmark's state: data, caches, finished runs, progress."""

    def __init__(
        self, config: BenchConfig, work_dir: Path, device: torch.device, cached_only: bool = False
    ) -> None:
        self.config = config
        self.cached_only = cached_only
        self.work = work_dir
        self.device = device
        self.work.mkdir(parents=True, exist_ok=True)
        self.store = _RunStore(self.work / RUNS_FILE)
        self.progress = _RunProgress()
        self.data = _FashionData.load(config)
        self._pools: dict[str, _Pool] = {}
        self._generator_fingerprint: str | None = None

    # -- plan and progress

    def plan(self, models: list[_Classifier], target: _Classifier | None) -> None:
        """Count the quantization runs still to do, for the ETA."""
        config = self.config
        per_preset = {preset: 0 for preset in config.presets}
        for classifier in models:
            sources = [
                s
                for s in config.sources
                if not (s == "inversion" and not has_batchnorm(classifier.model))
            ]
            for preset in config.presets:
                per_preset[preset] += len(sources) * len(config.seeds) * len(config.settings)
        if target is not None:
            rows = [
                row
                for row in config.scarce_rows
                if row not in ALIGNED_ROWS or has_batchnorm(target.model)
            ]
            kshot_rows = sum(row in KSHOT_METHODS for row in rows)
            methods = len(rows) - kshot_rows + kshot_rows * len(config.data_scarce_ks)
            for preset in config.presets:
                per_preset[preset] += (
                    methods * len(config.scarce_seeds) * len(config.data_scarce_settings)
                )
        self.progress.start(per_preset)
        logger.info(
            "plan: %d quantization runs (%s); %d already done in %s",
            sum(per_preset.values()),
            ", ".join(f"{n} {p}" for p, n in per_preset.items()),
            len(self.store),
            self.work,
        )

    # -- float accuracy

    def float_top1(self, classifier: _Classifier) -> float:
        images, labels = self.data.test(classifier.domain)
        return evaluate_top1(classifier.model, images, labels)

    # -- one quantization run

    def run(
        self,
        classifier: _Classifier,
        calibration: _Calibration,
        setting: Setting,
        preset: str,
        seed: int,
        float_top1: float,
        *,
        block: str,
        row: str,
        k: int = 0,
    ) -> dict[str, Any] | None:
        """Quantize ``classifier`` on ``calibration`` and evaluate it (skipped when done).

        ``None`` when the run is not in the store and the bench is ``cached_only``.
        """
        config = self.config
        assert calibration.images is not None
        reconstruction = ReconstructionConfig(iters=config.iters)
        key = "|".join(
            [
                block,
                classifier.name,
                classifier.sha256[:16],
                setting_name(setting),
                preset,
                row,
                f"k{k}",
                f"seed{seed}",
                f"iters{config.iters}",
                f"rec{_fingerprint(dataclasses.asdict(reconstruction))[:12]}",
                f"cal{calibration.fingerprint}",
                f"test{config.test_images}",
            ]
        )
        done = self.store.get(key)
        if done is not None:
            self.progress.skipped(preset)
            return done
        if self.cached_only:
            return None
        weight_bits, act_bits, first_last_bits = setting
        quant = QuantConfig(
            weight_bits=weight_bits,
            act_bits=act_bits,
            first_last_bits=first_last_bits,
            preset=preset,
            max_calibration_images=config.num_calibration,
            seed=seed,
            reconstruction=reconstruction,
        )
        clock = time.perf_counter()
        qmodel = quantize_model(
            classifier.model,
            quant,
            calibration.images,
            device=self.device,
            on_progress=_StageLog(f"{classifier.name} {setting_name(setting)} {preset} {row}"),
        )
        seconds = time.perf_counter() - clock
        images, labels = self.data.test(classifier.domain)
        top1 = evaluate_top1(qmodel, images, labels)
        evaluate_seconds = time.perf_counter() - clock - seconds
        record = {
            "key": key,
            "block": block,
            "model": classifier.name,
            "setting": setting_name(setting),
            "preset": preset,
            "row": row,
            "k": k,
            "seed": seed,
            "top1": top1,
            "float_top1": float_top1,
            "delta": top1 - float_top1,
            "calibration_images": int(min(calibration.images.shape[0], config.num_calibration)),
            "quantize_seconds": seconds,
            "evaluate_seconds": evaluate_seconds,
        }
        self.store.add(record)
        self.progress.finished(preset, seconds + evaluate_seconds)
        logger.info(
            "[%s] %s %s %-6s %-18s seed %d: top-1 %.2f%% (%+.2f), quantized in %.0f s",
            self.progress.status(),
            classifier.name,
            setting_name(setting),
            preset,
            row if not k else f"{row} k={k}",
            seed,
            top1,
            top1 - float_top1,
            seconds,
        )
        return record

    def runs_done(self) -> list[dict[str, Any]]:
        """The records of this config's runs (the store may hold others too)."""
        return self.store.records()

    def set_statistics(self, classifier: _Classifier, images: torch.Tensor) -> dict[str, Any]:
        """How close a calibration set is to the training data, by the filters' own measures.

        ``bn_distance``: ``D_BN`` of the whole set (``None`` without BN); ``mean_energy``: mean
        free energy under the float classifier. Both lower = closer.
        """
        images = images[: self.config.num_calibration]
        model = classifier.model
        distance = bn_distance(model, images, device=self.device) if has_batchnorm(model) else None
        energy = energy_scores(model, images, device=self.device)
        return {"bn_distance": distance, "mean_energy": float(energy.mean())}

    # -- calibration sets of the main table

    def calibration(self, classifier: _Classifier, source: str, seed: int) -> _Calibration:
        """The calibration set of ``source`` for ``classifier`` and ``seed``, made once."""
        config = self.config
        name = f"{classifier.name}/{source}/seed{seed}"
        parts: dict[str, Any] = {
            "model": classifier.sha256,
            "source": source,
            "seed": seed,
            "n": config.num_calibration,
        }
        if source in ("genq", "generated", "energy_only", "bn_only"):
            try:
                parts["pool"] = self.main_pool(seed).fingerprint
            except _NotCached as missing:
                return _Calibration(name, "", None, _unavailable(f"{missing} was not run"))
            parts["keep"] = [config.energy_keep, config.distribution_keep]
        if source == "inversion":
            parts["iters"] = config.inversion_iters
        if source == "inversion" and not has_batchnorm(classifier.model):
            note = f"{classifier.name} has no BatchNorm statistics to invert"
            return _Calibration(name, _fingerprint(parts), None, _unavailable(note))
        if source == "genq_aligned":
            genq = self.calibration(classifier, "genq", seed)
            return self.aligned(classifier, genq, f"{source}-seed{seed}", name, key="genq")
        return self._cached(
            f"calibration/{classifier.name}/{source}-seed{seed}",
            name,
            parts,
            lambda: self._make_calibration(classifier, source, seed),
        )

    def _make_calibration(
        self, classifier: _Classifier, source: str, seed: int
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        config = self.config
        n = config.num_calibration
        clock = time.perf_counter()
        if source == "real":
            images = self.data.real(n, seed, classifier.domain)
            return images, _timing(time.perf_counter() - clock, images.shape[0], {})
        if source == "noise":
            images = gaussian_noise(n, (1, 28, 28), seed=seed)
            return images, _timing(time.perf_counter() - clock, n, {})
        if source == "inversion":
            images, _ = model_inversion(
                classifier.model,
                n,
                (1, 28, 28),
                NUM_CLASSES,
                ModelInversionConfig(iters=config.inversion_iters, seed=seed),
                device=self.device,
                on_progress=_StageLog(f"{classifier.name} model inversion seed {seed}"),
            )
            seconds = time.perf_counter() - clock
            return images.cpu(), _timing(seconds, n, {"inversion": seconds})
        pool = self.main_pool(seed)
        return self._from_pool(classifier, pool, source, seed, keep_scores=True)

    def aligned(
        self,
        classifier: _Classifier,
        calibration: _Calibration,
        stem: str,
        name: str,
        key: str = "set",
    ) -> _Calibration:
        """``calibration`` after ``config.bn_align_iters`` steps of BN alignment to
        ``classifier``, made once (cached as ``calibration/<classifier>/<stem>``; ``key`` names
        the aligned set in the fingerprint). Unavailable without BatchNorm."""
        if not has_batchnorm(classifier.model):
            note = f"{classifier.name} has no BatchNorm statistics to align to"
            return _Calibration(name, "", None, _unavailable(note))
        if calibration.images is None:
            return _Calibration(name, "", None, calibration.info)
        align = AlignConfig(iters=self.config.bn_align_iters)
        parts = {key: calibration.fingerprint, "align": dataclasses.asdict(align)}
        return self._cached(
            f"calibration/{classifier.name}/{stem}",
            name,
            parts,
            lambda: self._align(classifier, calibration, align),
        )

    def _align(
        self, classifier: _Classifier, calibration: _Calibration, align: AlignConfig
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """A set after BN alignment; its time is the set's plus the alignment's."""
        assert calibration.images is not None
        clock = time.perf_counter()
        images = align_to_bn_statistics(
            classifier.model,
            calibration.images,
            align,
            device=self.device,
            on_progress=_StageLog(f"{classifier.name} BN alignment"),
        )
        seconds = time.perf_counter() - clock
        # the set's parts scaled to the images aligned (GenQ's sets may hold more than are used)
        share = images.shape[0] / max(int(calibration.info["images"]), 1)
        detail = {part: value * share for part, value in calibration.info["detail"].items()}
        detail["bn_align"] = seconds
        return images, _timing(sum(detail.values()), images.shape[0], detail)

    def _from_pool(
        self,
        classifier: _Classifier,
        pool: _Pool,
        source: str,
        seed: int,
        keep_scores: bool = False,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """A generated source's images out of ``pool``, with the time they cost.

        With ``keep_scores``, the GenQ filter scores are kept for the plots.
        """
        config = self.config
        if source == "generated":
            per_class = math.ceil(config.kept_fraction * config.pool_per_class)
            keep = _first_per_class(pool.labels, per_class)
            used = int(keep.sum())
            kept = pool.images[keep]
            detail = {"generate": pool.detail["generate"] / pool.images.shape[0] * used}
        else:
            filters = {
                "genq": FilterConfig(
                    energy_keep=config.energy_keep,
                    distribution_keep=config.distribution_keep,
                    seed=seed,
                ),
                "energy_only": FilterConfig(
                    order=("energy",), energy_keep=config.kept_fraction, seed=seed
                ),
                "bn_only": FilterConfig(
                    order=("distribution",), distribution_keep=config.kept_fraction, seed=seed
                ),
            }[source]
            clock = time.perf_counter()
            report = apply_filters(
                classifier.model,
                pool.images,
                pool.labels,
                filters,
                class_names=CLASS_NAMES,
                device=self.device,
            )
            filter_seconds = time.perf_counter() - clock
            kept = pool.images[report.final]
            detail = {"generate": pool.detail["generate"], "filter": filter_seconds}
            if source == "genq" and keep_scores:
                self._save_filter_scores(classifier, seed, pool, report)
        for part, seconds in pool.detail.items():
            if part != "generate":
                detail[part] = seconds
        order = torch.randperm(kept.shape[0], generator=torch.Generator().manual_seed(seed))
        images = kept[order][: config.num_calibration]
        return images, _timing(sum(detail.values()), kept.shape[0], detail)

    # -- generated pools

    def main_pool(self, seed: int) -> _Pool:
        """Plain-prompt images of ``seed``: generated once, shared by every model."""
        parts = self._generation_parts(seed)
        return self._pool(
            f"main-seed{seed}",
            parts,
            lambda storage: self._generate(storage, seed, None, f"pool seed {seed}"),
        )

    def ti_pool(self, k: int, seed: int, domain: str) -> _Pool:
        """Images generated after textual inversion on k real images per class."""
        config = self.config
        parts = {
            **self._generation_parts(seed),
            "k": k,
            **_domain_parts(domain),
            "ti_steps": config.textual_inversion_steps,
            "templates": DATA_SCARCE_TEMPLATES,
        }
        # named only when not at their first defaults, so pools made before they existed still match
        if config.textual_inversion_lr != 5e-3:
            parts["ti_lr"] = config.textual_inversion_lr
        if config.textual_inversion_per_class:
            parts["ti_per_class"] = True

        def make(storage: LocalStorage) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
            images = self.data.kshot_pil(k, seed, domain)
            labels = [c for c in range(NUM_CLASSES) for _ in range(k)]
            return self._generate(storage, seed, (images, labels), f"pool k={k} seed {seed}")

        return self._pool(f"ti-k{k}-{domain}-seed{seed}", parts, make)

    def _generation_parts(self, seed: int) -> dict[str, Any]:
        config = self.config
        if self._generator_fingerprint is None:
            self._generator_fingerprint = _folder_digest(config.generator_path)
        return {
            "generator": self._generator_fingerprint,
            "per_class": config.pool_per_class,
            "guidance": config.guidance_scale,
            "steps": config.steps,
            "seed": seed,
        }

    def _pool(
        self,
        name: str,
        parts: dict[str, Any],
        make: Callable[[LocalStorage], tuple[torch.Tensor, torch.Tensor, dict[str, float]]],
    ) -> _Pool:
        fingerprint = _fingerprint(parts)
        folder = self.work / "pools" / f"{name}-{fingerprint[:12]}"
        if folder.name in self._pools:
            return self._pools[folder.name]
        cache = folder / "pool.safetensors"
        if cache.is_file():
            tensors, meta = _read_cache(cache)
            detail = meta["detail"]
        elif self.cached_only:
            raise _NotCached(f"pool {name}")
        else:
            logger.info(
                "generating pool %s (%d images per class)", name, self.config.pool_per_class
            )
            images, labels, detail = make(LocalStorage(folder))
            tensors = {"images": images, "labels": labels}
            _write_cache(cache, tensors, {"detail": detail, "parts": parts})
        pool = _Pool(
            images=tensors["images"],
            labels=tensors["labels"],
            seconds=float(sum(detail.values())),
            detail={k: float(v) for k, v in detail.items()},
            fingerprint=fingerprint,
        )
        self._pools[folder.name] = pool
        return pool

    def _generate(
        self,
        storage: LocalStorage,
        seed: int,
        style: tuple[list[Image.Image], list[int]] | None,
        label: str,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Generate a pool into ``storage`` (PNGs + manifest) and preprocess it.

        With ``style`` (the k-shot images and their labels), a style token is first learned on
        them by textual inversion and every prompt uses it.
        """
        config = self.config
        detail: dict[str, float] = {}
        # a fresh pipeline every time: textual inversion adds tokens to the one it is given
        pipe: Any = load_generator(config.generator_path, self.device, scheduler="ddim")
        style_token = None
        per_class: dict[str, str] = {}
        templates = DEFAULT_TEMPLATES
        if style is not None:
            clock = time.perf_counter()
            kshot_images, kshot_labels = style
            inversion = TextualInversionConfig(
                steps=config.textual_inversion_steps,
                lr=config.textual_inversion_lr,
                style_token=STYLE_TOKEN,
                per_class_tokens=config.textual_inversion_per_class,
                captions=DATA_SCARCE_TEMPLATES,
                seed=seed,
            )
            tokens = learn_tokens(
                pipe,
                kshot_images,
                kshot_labels,
                CLASS_NAMES,
                inversion,
                device=self.device,
                on_progress=_StageLog(f"{label}: textual inversion"),
            )
            apply_tokens(pipe, tokens)
            style_token, templates = STYLE_TOKEN, DATA_SCARCE_TEMPLATES
            per_class = class_tokens(CLASS_NAMES, inversion)
            detail["textual_inversion"] = time.perf_counter() - clock
        generation = GenerationConfig(
            num_per_class=config.pool_per_class,
            templates=templates,
            adjectives=DEFAULT_ADJECTIVES,
            seed=seed,
            guidance_scale=config.guidance_scale,
            steps=config.steps,
            scheduler="ddim",
            batch_size=config.generation_batch_size,
        )
        specs = build_specs(
            CLASS_NAMES,
            generation.num_per_class,
            generation.templates,
            generation.adjectives,
            generation.seed,
            style_token=style_token,
            class_tokens=per_class or None,
        )
        clock = time.perf_counter()
        records = generate_images(
            pipe, specs, generation, storage, "", on_progress=_StageLog(label)
        )
        images = load_images(storage, records, _generated_preprocessing(pipe))
        detail["generate"] = time.perf_counter() - clock
        labels = torch.tensor([record.class_index for record in records], dtype=torch.long)
        return images, labels, detail

    # -- filter scores for the plots

    def _save_filter_scores(
        self, classifier: _Classifier, seed: int, pool: _Pool, report: FilterReport
    ) -> None:
        count = pool.images.shape[0]
        tensors = {
            "energy": report.scores.get("energy", torch.full((count,), math.nan)),
            "distribution": report.scores.get("distribution", torch.full((count,), math.nan)),
            "energy_kept": report.kept.get("energy", torch.ones(count, dtype=torch.bool)),
            "final": report.final,
            "real_energy": energy_scores(
                classifier.model,
                self.data.real(self.config.num_calibration, seed, classifier.domain),
                device=self.device,
            ),
        }
        path = self._filter_scores_path(classifier, seed, pool)
        _write_cache(path, {k: v.contiguous() for k, v in tensors.items()}, {})

    def filter_scores(self, classifier: _Classifier, seed: int) -> dict[str, torch.Tensor]:
        """The GenQ filter scores of ``seed``'s pool for ``classifier`` (plots), with the pool."""
        try:
            pool = self.main_pool(seed)
        except _NotCached:
            return {}
        path = self._filter_scores_path(classifier, seed, pool)
        if not path.is_file():
            return {}
        tensors, _ = _read_cache(path)
        return {**tensors, "images": pool.images, "labels": pool.labels}

    def _filter_scores_path(self, classifier: _Classifier, seed: int, pool: _Pool) -> Path:
        parts = {"model": classifier.sha256, "pool": pool.fingerprint, "seed": seed}
        parts["keep"] = [self.config.energy_keep, self.config.distribution_keep]
        name = f"filters-seed{seed}-{_fingerprint(parts)[:12]}.safetensors"
        return self.work / "calibration" / classifier.name / name

    # -- cache

    def _cached(
        self,
        stem: str,
        name: str,
        parts: dict[str, Any],
        make: Callable[[], tuple[torch.Tensor, dict[str, Any]]],
    ) -> _Calibration:
        fingerprint = _fingerprint(parts)
        path = self.work / f"{stem}-{fingerprint[:12]}.safetensors"
        if path.is_file():
            tensors, info = _read_cache(path)
            return _Calibration(name, fingerprint, tensors["images"], info)
        if self.cached_only:
            return _Calibration(name, fingerprint, None, _unavailable(f"{name} was not run"))
        logger.info("making calibration set %s", name)
        images, info = make()
        info = {"available": True, "note": None, **info}
        _write_cache(path, {"images": images.contiguous()}, info)
        logger.info(
            "%s: %d images, %.1f s per 1000", name, info["images"], info["seconds_per_1000"]
        )
        return _Calibration(name, fingerprint, images, info)


def _data_scarce(bench: _Bench, target: _Classifier) -> dict[str, Any]:
    """The data-scarce block: every method, k, seed, setting and preset on the target."""
    config = bench.config
    float_top1 = bench.float_top1(target)
    logger.info("data-scarce target %s: float top-1 %.2f%%", target.name, float_top1)
    sources: dict[str, list[dict[str, Any]]] = {}

    def run_all(calibration: _Calibration, method: str, k: int, seed: int) -> None:
        if method not in config.scarce_rows:
            return
        entries = sources.setdefault(f"{method}:{k}", [])
        if calibration.images is None:  # not available, or (cached_only) not made yet
            entries.append({"seed": seed, **calibration.info})
            return
        set_stats = bench.set_statistics(target, calibration.images)
        entries.append({"seed": seed, **calibration.info, **set_stats})
        for setting in config.data_scarce_settings:
            for preset in config.presets:
                bench.run(
                    target,
                    calibration,
                    setting,
                    preset,
                    seed,
                    float_top1,
                    block="data_scarce",
                    row=method,
                    k=k,
                )

    for seed in config.scarce_seeds:
        # k-independent rows: plain prompts through GenQ, and the full real calibration set
        plain = bench.calibration(target, "genq", seed)
        run_all(plain, "plain_prompts", 0, seed)
        run_all(bench.calibration(target, "real", seed), "real_full", 0, seed)
        for k in config.data_scarce_ks:
            kshot = _kshot_calibration(bench, target, k, seed)
            run_all(kshot, "real_k", k, seed)
            sets: dict[str, _Calibration] = {}
            if any(row.startswith("textual_inversion") for row in config.scarce_rows):
                ti = _ti_calibration(bench, target, k, seed)
                sets["textual_inversion"] = ti
                sets["textual_inversion_with_k"] = _with_kshot(bench, ti, kshot, seed)
            sets["plain_prompts_with_k"] = _with_kshot(bench, plain, kshot, seed)
            for method, calibration in sets.items():
                run_all(calibration, method, k, seed)
            for aligned, method in ALIGNED_ROWS.items():
                if aligned in config.scarce_rows:
                    stem = f"{aligned}_k{k}-seed{seed}"
                    name = f"{sets[method].name}, BN-aligned"
                    run_all(bench.aligned(target, sets[method], stem, name), aligned, k, seed)
    runs = [r for r in bench.runs_done() if r["block"] == "data_scarce"]
    return {
        "model": target.name,
        "requested": target.requested,
        "domain": target.domain,
        "float_top1": float_top1,
        "classifier": target.describe(),
        "timings": {key: _source_summary(entries) for key, entries in sources.items()},
        "runs": runs,
        "rows": _rows(runs),
    }


def _kshot_calibration(bench: _Bench, target: _Classifier, k: int, seed: int) -> _Calibration:
    parts = {"model": target.sha256, "k": k, "seed": seed, **_domain_parts(target.domain)}

    def make() -> tuple[torch.Tensor, dict[str, Any]]:
        images = bench.data.kshot(k, seed, target.domain)
        return images, _timing(0.0, images.shape[0], {})

    return bench._cached(
        f"calibration/{target.name}/real_k{k}-seed{seed}", f"{target.name}/real k={k}", parts, make
    )


def _ti_calibration(bench: _Bench, target: _Classifier, k: int, seed: int) -> _Calibration:
    config = bench.config
    try:
        pool = bench.ti_pool(k, seed, target.domain)
    except _NotCached as missing:
        name = f"{target.name}/textual inversion k={k}/seed{seed}"
        return _Calibration(name, "", None, _unavailable(f"{missing} was not run"))
    parts = {
        "model": target.sha256,
        "pool": pool.fingerprint,
        "seed": seed,
        "n": config.num_calibration,
        "keep": [config.energy_keep, config.distribution_keep],
    }
    return bench._cached(
        f"calibration/{target.name}/ti_k{k}-seed{seed}",
        f"{target.name}/textual inversion k={k}/seed{seed}",
        parts,
        lambda: bench._from_pool(target, pool, "genq", seed),
    )


def _with_kshot(
    bench: _Bench, generated: _Calibration, kshot: _Calibration, seed: int
) -> _Calibration:
    """A generated set with the k real images in it, shuffled by ``seed``: the k images once and
    as many generated images as the calibration size leaves room for, or (``kshot_share``) the k
    images repeated in turn over that share of the calibration size and generated images in the
    rest. Its time is the generated set's (the k images cost nothing to make)."""
    name = f"{generated.name} + the k images"
    if generated.images is None or kshot.images is None:
        return _Calibration(
            name, "", None, generated.info if generated.images is None else kshot.info
        )
    n = bench.config.num_calibration
    share = bench.config.kshot_share
    real = kshot.images if share is None else repeat_in_turn(kshot.images, round(share * n))
    room = max(n - real.shape[0], 0)
    images = torch.cat([real, generated.images[:room]])[:n]
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    # the key is still "ti" (the first set it named) so that cached runs keep their fingerprints
    parts: dict[str, Any] = {"ti": generated.fingerprint, "kshot": kshot.fingerprint, "n": n}
    if share is not None:
        parts["share"] = share
        name += f" ({share:g} of the set)"
    info = {**generated.info, "images": int(images.shape[0]), "kshot_slots": int(real.shape[0])}
    return _Calibration(name, _fingerprint(parts), images[order], info)


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class _FashionData:
    """Fashion-MNIST as the benchmark uses it.

    Attributes:
        train_images: uint8 ``[60000, 28, 28]``; train_labels: ``[60000]``.
        split: the fixed split (seed 0): classifier part, generator part, k-shot pool.
        test_images: uint8 ``[N, 28, 28]`` (the first ``test_images`` of the test set).
        test_labels: ``[N]``.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    split: TrainSplit
    test_images: torch.Tensor
    test_labels: torch.Tensor
    _test: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def load(cls, config: BenchConfig) -> _FashionData:
        train_images, train_labels = load_split("train")
        test_images, test_labels = load_split("test")
        if config.test_images is not None:
            test_images = test_images[: config.test_images]
            test_labels = test_labels[: config.test_images]
        split = split_train_indices(train_labels, seed=0)
        return cls(train_images, train_labels, split, test_images, test_labels)

    def test(self, domain: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised test images ``[N, 1, 28, 28]`` in ``domain``, and labels."""
        if domain not in self._test:
            self._test[domain] = _to_input(to_float_images(self.test_images), domain)
        return self._test[domain], self.test_labels

    def real(self, n: int, seed: int, domain: str) -> torch.Tensor:
        """``n`` seeded random images of the classifier part, normalised."""
        part = self.split.classifier
        order = torch.randperm(part.numel(), generator=torch.Generator().manual_seed(seed))
        chosen = part[order[:n]]
        return _to_input(to_float_images(self.train_images[chosen]), domain)

    def kshot_indices(self, k: int, seed: int) -> torch.Tensor:
        """``k`` images per class from the k-shot pool, class by class; nested in ``k``."""
        pool = self.split.kshot
        labels = self.train_labels[pool]
        generator = torch.Generator().manual_seed(seed)
        chosen = []
        for cls in range(NUM_CLASSES):
            members = pool[labels == cls]
            if members.numel() < k:
                raise ValueError(f"data_scarce_ks: k={k} exceeds the {members.numel()}-image pool")
            chosen.append(members[torch.randperm(members.numel(), generator=generator)][:k])
        return torch.cat(chosen)

    def kshot(self, k: int, seed: int, domain: str) -> torch.Tensor:
        """The k-shot images in ``domain`` as classifier input ``[10 k, 1, 28, 28]``."""
        chosen = self.kshot_indices(k, seed)
        return _to_input(to_float_images(self.train_images[chosen]), domain)

    def kshot_pil(self, k: int, seed: int, domain: str) -> list[Image.Image]:
        """The k-shot images as the generator sees images: 32x32 (2 px border), grayscale."""
        chosen = self.kshot_indices(k, seed)
        pixels = torch.nn.functional.pad(to_float_images(self.train_images[chosen]), (2, 2, 2, 2))
        pixels = to_domain(pixels, domain)
        gray = (pixels[:, 0] * 255).round().clamp(0, 255).to(torch.uint8)
        return [Image.fromarray(image.numpy()) for image in gray]


def _to_input(pixels: torch.Tensor, domain: str) -> torch.Tensor:
    return normalize(to_domain(pixels, domain))


def _domain_parts(domain: str) -> dict[str, Any]:
    """A domain in cache keys; the two first domains keep the key they had before there were
    others, so that caches made then still match."""
    return (
        {"shifted": domain == "shifted"}
        if domain in ("original", "shifted")
        else {"domain": domain}
    )


def _manifest_domain(name: str, entry: dict[str, Any], manifest: Path) -> str:
    domain = str(entry.get("domain", "original"))
    if domain not in DOMAINS:
        raise ValueError(
            f"{manifest}: model {name!r} has domain {domain!r}; expected one of {sorted(DOMAINS)}"
        )
    return domain


def _generated_preprocessing(pipe: Any) -> Preprocessing:
    """Grayscale, centre-crop 28 from the generator's resolution, Fashion-MNIST normalisation."""
    resolution = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    if resolution < 28:
        raise ValueError(f"the generator makes {resolution}px images; the classifiers need 28")
    return Preprocessing(
        input_size=(1, 28, 28),
        mean=MEAN,
        std=STD,
        interpolation="bilinear",
        crop_pct=28 / resolution,
    )


def _first_per_class(labels: torch.Tensor, per_class: int) -> torch.Tensor:
    keep = torch.zeros(labels.shape[0], dtype=torch.bool)
    for cls in labels.unique():
        keep[(labels == cls).nonzero().flatten()[:per_class]] = True
    return keep


# ---------------------------------------------------------------------------------------------
# statistics and checks


def _rows(runs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation of top-1 over seeds, per (block, model, preset, setting, row, k)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for run in runs:
        key = (run["block"], run["model"], run["preset"], run["setting"], run["row"], run["k"])
        groups.setdefault(key, []).append(run)
    rows = []
    for (block, model, preset, setting, row, k), members in groups.items():
        values = [m["top1"] for m in members]
        rows.append(
            {
                "block": block,
                "model": model,
                "preset": preset,
                "setting": setting,
                "row": row,
                "k": k,
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "n": len(values),
                "seeds": sorted(m["seed"] for m in members),
                "delta": statistics.fmean(m["delta"] for m in members),
            }
        )
    return rows


def _source_summary(entries: list[dict[str, Any]]) -> dict[str, Any]:
    available = [e for e in entries if e.get("available", True)]
    if not available:
        note = entries[0].get("note") if entries else "not run"
        return {"available": False, "note": note, "by_seed": entries}
    per_1000 = [e["seconds_per_1000"] for e in available]
    distances = [e["bn_distance"] for e in available if e.get("bn_distance") is not None]
    energies = [e["mean_energy"] for e in available if e.get("mean_energy") is not None]
    return {
        "available": True,
        "note": None,
        "seconds_per_1000": statistics.fmean(per_1000),
        "seconds_per_1000_std": statistics.stdev(per_1000) if len(per_1000) > 1 else 0.0,
        "images": statistics.fmean(e["images"] for e in available),
        "bn_distance": statistics.fmean(distances) if distances else None,
        "mean_energy": statistics.fmean(energies) if energies else None,
        "by_seed": entries,
    }


def _checks(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 4's targets, each computed from the row means (with the headline preset)."""
    config = BenchConfig.from_dict(report["config"])
    preset = config.presets[0]
    full_rows = {
        (r["model"], r["setting"], r["row"]): r
        for r in report["rows"]
        if r["preset"] == preset and r["block"] == "main"
    }
    rows = {key: row["mean"] for key, row in full_rows.items()}
    checks: list[dict[str, Any]] = []

    def claim(text: str, holds: bool | None, detail: str) -> None:
        checks.append({"claim": text, "holds": holds, "detail": detail})

    def versus(first: dict[str, Any], second: dict[str, Any]) -> str:
        return f"{first['mean']:.2f} vs {second['mean']:.2f}{_noise_note(first, second)}"

    for model in report["models"]:
        settings = [setting_name(s) for s in config.settings]
        clear = [
            s
            for s in settings
            if (model, s, "real") in rows
            and (model, s, "noise") in rows
            and rows[(model, s, "real")] - rows[(model, s, "noise")] >= CLEAR_MARGIN
        ]
        hardest = min(clear, key=lambda s: rows[(model, s, "real")]) if clear else None
        if any((model, s, "real") in rows and (model, s, "noise") in rows for s in settings):
            claim(
                f"{model}: a setting where real data beats noise by >= {CLEAR_MARGIN:g} points",
                bool(clear),
                f"clear at {clear}; hardest such setting {hardest}" if clear else "none",
            )
        for setting in dict.fromkeys(s for s in ("W4A4", hardest, "W2A4") if s in settings):
            for method, name in (("genq", "GenQ"), ("genq_aligned", "GenQ + BN alignment")):
                ours = rows.get((model, setting, method))
                if ours is None:
                    continue
                real = rows.get((model, setting, "real"))
                if real is not None:
                    claim(
                        f"{model} {setting} {preset}: {name} >= 99% of real data",
                        ours >= 0.99 * real,
                        f"{name} {ours:.2f} vs real {real:.2f}",
                    )
                others = ("generated", "energy_only", "bn_only", "inversion", "noise")
                for other in (*(["genq"] if method != "genq" else []), *others):
                    value = rows.get((model, setting, other))
                    if value is not None:
                        claim(
                            f"{model} {setting} {preset}: {name} beats {SOURCE_LABELS[other]}",
                            ours > value,
                            versus(
                                full_rows[(model, setting, method)],
                                full_rows[(model, setting, other)],
                            ),
                        )
        sources = report["sources"].get(model, {})
        inversion_time = sources.get("inversion", {})
        for method, name in (("genq", "GenQ"), ("genq_aligned", "GenQ + BN alignment")):
            ours_time = sources.get(method, {})
            if ours_time.get("available") and inversion_time.get("available"):
                ratio = inversion_time["seconds_per_1000"] / max(
                    ours_time["seconds_per_1000"], 1e-9
                )
                claim(
                    f"{model}: {name} makes 1000 calibration images >= 5x faster than model "
                    "inversion",
                    ratio >= 5.0,
                    f"{ours_time['seconds_per_1000']:.0f} s vs "
                    f"{inversion_time['seconds_per_1000']:.0f} s per 1000 ({ratio:.1f}x)",
                )
    scarce = report.get("data_scarce")
    if scarce:
        scarce_rows = {
            (r["setting"], r["row"], r["k"]): r for r in scarce["rows"] if r["preset"] == preset
        }
        k = 5 if 5 in config.data_scarce_ks else max(config.data_scarce_ks)
        references = (
            ("plain_prompts", 0, "plain prompts"),
            ("real_k", k, "the k real images alone"),
        )
        # with the k images in both sets, only the token differs: the control that credits it
        with_k_control = (("plain_prompts_with_k", k, "plain prompts with the k images added"),)
        # after BN alignment: against the aligned control and the same set unaligned
        aligned_control = (
            (
                "plain_prompts_with_k_aligned",
                k,
                "plain prompts with the k images added, BN-aligned",
            ),
            ("textual_inversion_with_k", k, "the same set unaligned"),
        )
        for setting in (setting_name(s) for s in config.data_scarce_settings):
            for method, label, method_references in (
                ("textual_inversion", "textual inversion", references),
                (
                    "textual_inversion_with_k",
                    "textual inversion with the k images added",
                    references + with_k_control,
                ),
                (
                    "textual_inversion_aligned",
                    "textual inversion, BN-aligned",
                    (*references, ("textual_inversion", k, "the same set unaligned")),
                ),
                (
                    "textual_inversion_with_k_aligned",
                    "textual inversion with the k images added, BN-aligned",
                    references + with_k_control + aligned_control,
                ),
            ):
                ours = scarce_rows.get((setting, method, k))
                if ours is None:
                    continue
                for reference, reference_k, reference_label in method_references:
                    theirs = scarce_rows.get((setting, reference, reference_k))
                    if theirs is not None:
                        claim(
                            f"data-scarce {setting} {preset} k={k}: {label} beats "
                            f"{reference_label}",
                            ours["mean"] > theirs["mean"],
                            versus(ours, theirs),
                        )
    return checks


def _noise_note(first: dict[str, Any], second: dict[str, Any]) -> str:
    """``"; within seed noise"`` when two rows' means differ by less than twice the standard error
    of their difference (seed-to-seed standard deviations); ``""`` otherwise or with one seed."""
    if first["n"] < 2 or second["n"] < 2:
        return ""
    error = math.sqrt(first["std"] ** 2 / first["n"] + second["std"] ** 2 / second["n"])
    difference = first["mean"] - second["mean"]
    if abs(difference) < 2.0 * error:
        return f"; {difference:+.2f} ± {error:.2f} s.e.: within seed noise"
    return f"; {difference:+.2f} ± {error:.2f} s.e."


def _set_statistics_markdown(report: dict[str, Any], config: BenchConfig) -> list[str]:
    models = list(report["models"])
    lines = [
        "### Calibration sets against the training statistics (mean over seeds)",
        "",
        "D_BN: distance of the whole set's BatchNorm-input statistics from the classifier's "
        "running statistics (what the distribution filter lowers); energy: mean free energy "
        "under the float classifier (what the energy filter lowers). Lower = closer to the "
        "training data for both.",
        "",
        "| source | " + " | ".join(f"{m} D_BN | {m} energy" for m in models) + " |",
        "|---|" + "---|---|" * len(models),
    ]
    for source in config.sources:
        cells = []
        for model in models:
            entry = report["sources"][model][source]
            for name in ("bn_distance", "mean_energy"):
                value = entry.get(name) if entry["available"] else None
                cells.append("n/a" if value is None else f"{value:.3f}")
        lines.append(f"| {SOURCE_LABELS[source]} | " + " | ".join(cells) + " |")
    return lines


def _data_scarce_markdown(scarce: dict[str, Any], config: BenchConfig) -> list[str]:
    ks = config.data_scarce_ks
    rows = {(r["preset"], r["setting"], r["row"], r["k"]): r for r in scarce["rows"]}
    domain = (
        scarce["domain"]
        if scarce["domain"] != "original"
        else "original (no shifted target available)"
    )
    tokens = (
        "one token per class"
        if config.textual_inversion_per_class
        else "one style token shared by all classes"
    )
    lines = [
        f"### Data-scarce: {scarce['model']} ({domain} domain; float top-1 "
        f"{scarce['float_top1']:.2f}% on its test set)",
        "",
        "k real images per class come from the split's k-shot pool (seeded, nested in k); textual "
        f"inversion learns {tokens} on them ({config.textual_inversion_steps} steps, "
        f"lr {config.textual_inversion_lr:g}); "
        "GenQ rows use the same pool size and filters as the main table. Top-1 (%), mean ± std "
        f"over seeds {list(config.scarce_seeds)}.",
    ]
    if config.kshot_share is not None:
        lines[-1] += (
            f" In the rows with the k images added, they fill {config.kshot_share:g} of the "
            "calibration set (repeated in turn), generated images the rest."
        )
    for setting in (setting_name(s) for s in config.data_scarce_settings):
        lines += [
            "",
            f"| {setting} | " + " | ".join(f"k={k}" for k in ks) + " |",
            "|---|" + "---|" * len(ks),
        ]
        for preset in config.presets:
            for method in (m for m in DATA_SCARCE_METHODS if m in config.scarce_rows):
                cells = []
                for k in ks:
                    key = (
                        preset,
                        setting,
                        method,
                        k if method in KSHOT_METHODS else 0,
                    )
                    cells.append(_cell(rows.get(key), config.scarce_seeds))
                lines.append(
                    f"| {DATA_SCARCE_LABELS[method]} (`{preset}`) | " + " | ".join(cells) + " |"
                )
    timings = scarce["timings"]
    distances = {
        method: [
            timings.get(f"{method}:{k if method in KSHOT_METHODS else 0}", {}).get("bn_distance")
            for k in ks
        ]
        for method in DATA_SCARCE_METHODS
        if method in config.scarce_rows
    }
    if any(d is not None for row in distances.values() for d in row):
        lines += [
            "",
            "D_BN of each set against the target's BatchNorm statistics (mean over seeds; lower = "
            "closer to its training data):",
            "",
            "| set | " + " | ".join(f"k={k}" for k in ks) + " |",
            "|---|" + "---|" * len(ks),
        ]
        for method, row in distances.items():
            if any(d is not None for d in row):
                cells = ["" if d is None else f"{d:.3f}" for d in row]
                lines.append(f"| {DATA_SCARCE_LABELS[method]} | " + " | ".join(cells) + " |")
    ti = [timings.get(f"textual_inversion:{k}") for k in ks]
    if all(t is not None and t["available"] for t in ti):
        lines += [
            "",
            "Time per 1000 calibration images with textual inversion (inversion + generation + "
            "filters): "
            + ", ".join(
                f"k={k}: {t['seconds_per_1000']:.0f} s" for k, t in zip(ks, ti, strict=True)
            )
            + ".",
        ]
    return lines


def _cell(row: dict[str, Any] | None, seeds: Sequence[int]) -> str:
    """Mean ± std of a row; names its seeds when they are not all of ``seeds`` (a table
    assembled before every run finished)."""
    if row is None:
        return ""
    text = f"{row['mean']:.2f}" if row["n"] == 1 else f"{row['mean']:.2f} ± {row['std']:.2f}"
    if sorted(row["seeds"]) != sorted(seeds):
        done = ", ".join(str(seed) for seed in row["seeds"])
        text += f" (seed{'s' if row['n'] > 1 else ''} {done} only)"
    return text


# ---------------------------------------------------------------------------------------------
# plots


def _plots(
    report: dict[str, Any],
    bench: _Bench,
    filter_scores: dict[str, dict[str, torch.Tensor]],
    folder: Path,
) -> tuple[list[Path], list[str]]:
    """The PNG plots; none (with a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        note = "plots skipped: matplotlib is not installed (pip install 'genq[bench]')"
        logger.warning(note)
        return [], [note]
    folder.mkdir(parents=True, exist_ok=True)
    config = bench.config
    files: list[Path] = []
    for model in report["models"]:
        path = folder / f"accuracy_{model}.png"
        _plot_accuracy(plt, report, model, config, path)
        files.append(path)
        scores = filter_scores.get(model)
        if scores:
            path = folder / f"filter_grid_{model}.png"
            _plot_grid(plt, scores, f"{model}, seed {config.seeds[0]}", path)
            files.append(path)
            path = folder / f"filter_scores_{model}.png"
            _plot_scores(plt, scores, model, path)
            files.append(path)
    if report.get("data_scarce"):
        path = folder / "data_scarce.png"
        _plot_data_scarce(plt, report["data_scarce"], config, path)
        files.append(path)
    return [path for path in files if path.is_file()], []


def _plot_accuracy(
    plt: Any, report: dict[str, Any], model: str, config: BenchConfig, path: Path
) -> None:
    """Grouped bars: top-1 by setting (groups) and source (bars), one panel per preset."""
    settings = [setting_name(s) for s in config.settings]
    sources = [s for s in config.sources if report["sources"][model][s]["available"]]
    if not sources:
        return
    rows = {
        (r["preset"], r["setting"], r["row"]): r
        for r in report["rows"]
        if r["model"] == model and r["block"] == "main"
    }
    float_top1 = report["models"][model]["float_top1"]
    fig, axes = plt.subplots(
        len(config.presets),
        1,
        figsize=(max(6, 1.6 * len(settings) + 3), 3.6 * len(config.presets)),
        squeeze=False,
    )
    width = 0.8 / len(sources)
    for ax, preset in zip(axes[:, 0], config.presets, strict=True):
        lowest = float_top1
        for i, source in enumerate(sources):
            means = [
                rows[(preset, s, source)]["mean"] if (preset, s, source) in rows else math.nan
                for s in settings
            ]
            stds = [
                rows[(preset, s, source)]["std"] if (preset, s, source) in rows else 0.0
                for s in settings
            ]
            positions = [j - 0.4 + width * (i + 0.5) for j in range(len(settings))]
            ax.bar(positions, means, width, yerr=stds, capsize=2, label=source)
            lowest = min([lowest, *(m for m in means if not math.isnan(m))])
        ax.axhline(float_top1, color="black", linestyle="--", linewidth=1, label="float")
        ax.set_xticks(range(len(settings)))
        ax.set_xticklabels(settings)
        ax.set_ylim(max(0.0, lowest - 5.0), min(100.0, float_top1 + 2.0))
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{model}: {preset}")
    axes[0, 0].legend(fontsize="small", ncol=4, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_grid(
    plt: Any, scores: dict[str, torch.Tensor], title: str, path: Path, per_side: int = 8
) -> None:
    """Per class: generated images GenQ kept (left) and dropped (right)."""
    images = (scores["images"][:, 0] * STD[0] + MEAN[0]).clamp(0, 1)
    labels, final = scores["labels"], scores["final"].bool()
    side = images.shape[-1]
    gap = side // 2
    mosaic = torch.ones(NUM_CLASSES * (side + 2), 2 * per_side * (side + 2) + gap)
    for cls in range(NUM_CLASSES):
        for block, mask in enumerate((final, ~final)):
            members = ((labels == cls) & mask).nonzero().flatten()[:per_side]
            for j, index in enumerate(members.tolist()):
                top = cls * (side + 2) + 1
                left = block * (per_side * (side + 2) + gap) + j * (side + 2) + 1
                mosaic[top : top + side, left : left + side] = images[index]
    fig, ax = plt.subplots(figsize=(2 * per_side * 0.55 + 1.5, NUM_CLASSES * 0.55 + 0.8))
    ax.imshow(mosaic.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([cls * (side + 2) + side / 2 for cls in range(NUM_CLASSES)])
    ax.set_yticklabels(CLASS_NAMES)
    half = per_side * (side + 2)
    ax.set_xticks([half / 2, half + gap + half / 2])
    ax.set_xticklabels(["kept by GenQ", "dropped by GenQ"])
    ax.tick_params(length=0)
    ax.set_title(f"{title}: generated images, kept vs dropped")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_scores(plt: Any, scores: dict[str, torch.Tensor], model: str, path: Path) -> None:
    """Histograms of the energy (with real images for reference) and distribution scores."""
    energy, distribution = scores["energy"], scores["distribution"]
    energy_kept, final = scores["energy_kept"].bool(), scores["final"].bool()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    finite = ~torch.isnan(energy)
    axes[0].hist(energy[finite].numpy(), bins=40, alpha=0.5, density=True, label="generated")
    axes[0].hist(energy[energy_kept].numpy(), bins=40, alpha=0.5, density=True, label="kept")
    axes[0].hist(scores["real_energy"].numpy(), bins=40, alpha=0.5, density=True, label="real")
    axes[0].set_xlabel("energy (lower = more in-distribution)")
    axes[0].set_title(f"{model}: energy filter")
    axes[0].legend(fontsize="small")
    entered = ~torch.isnan(distribution)
    if bool(entered.any()):
        axes[1].hist(
            distribution[entered].numpy(), bins=40, alpha=0.5, density=True, label="entered"
        )
        axes[1].hist(distribution[final].numpy(), bins=40, alpha=0.5, density=True, label="kept")
        axes[1].legend(fontsize="small")
    axes[1].set_xlabel("distribution score (BN sensitivity: low kept; patch entropy: high kept)")
    axes[1].set_title(f"{model}: distribution filter")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_data_scarce(plt: Any, scarce: dict[str, Any], config: BenchConfig, path: Path) -> None:
    """Top-1 vs k for each data-scarce method (headline preset), one panel per setting."""
    preset = config.presets[0]
    ks = list(config.data_scarce_ks)
    rows = {(r["setting"], r["row"], r["k"]): r for r in scarce["rows"] if r["preset"] == preset}
    settings = [setting_name(s) for s in config.data_scarce_settings]
    fig, axes = plt.subplots(
        1, len(settings), figsize=(5 * len(settings), 4.8), squeeze=False, layout="constrained"
    )
    for ax, setting in zip(axes[0], settings, strict=True):
        for method in KSHOT_METHODS:
            found = [(k, rows[(setting, method, k)]) for k in ks if (setting, method, k) in rows]
            if found:
                ax.errorbar(
                    [k for k, _ in found],
                    [r["mean"] for _, r in found],
                    yerr=[r["std"] for _, r in found],
                    marker="o",
                    capsize=3,
                    label=DATA_SCARCE_LABELS[method],
                )
        for method, style in (("plain_prompts", "--"), ("real_full", ":")):
            row = rows.get((setting, method, 0))
            if row is not None:
                ax.axhline(
                    row["mean"],
                    linestyle=style,
                    color="gray" if method == "real_full" else "tab:green",
                    label=DATA_SCARCE_LABELS[method],
                )
        ax.axhline(scarce["float_top1"], color="black", linewidth=1, label="float")
        ax.set_xticks(ks)
        ax.set_xlabel("k real images per class")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{scarce['model']} {setting} {preset}")
    # below the panels, where it hides no point
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize="small")
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# helpers


class _RunStore:
    """Finished runs, one JSON line each, appended as they finish (a torn line is ignored).

    Several processes may share one store: a key not known yet is looked up again in what the
    others appended since, so a run one of them finished is not run twice.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._records: dict[str, dict[str, Any]] = {}
        self._read_up_to = 0
        self.used: dict[str, dict[str, Any]] = {}
        self._read_new_lines()

    def _read_new_lines(self) -> None:
        """Reads the complete lines appended since the last read (a line still being written waits)."""
        if not self.path.is_file():
            return
        with self.path.open("rb") as handle:
            handle.seek(self._read_up_to)
            data = handle.read()
        end = data.rfind(b"\n") + 1
        self._read_up_to += end
        for line in data[:end].splitlines():
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(record, dict) and "key" in record:
                self._records[record["key"]] = record

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: str) -> dict[str, Any] | None:
        if key not in self._records:
            self._read_new_lines()
        record = self._records.get(key)
        if record is not None:
            self.used[key] = record
        return record

    def add(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, allow_nan=False) + "\n"
        with self.path.open("a+b") as handle:
            # a line torn by a process that died mid-write must not swallow this one
            if handle.seek(0, os.SEEK_END) > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    line = "\n" + line
            handle.write(line.encode())
            handle.flush()
            os.fsync(handle.fileno())
        self._records[record["key"]] = record
        self.used[record["key"]] = record

    def records(self) -> list[dict[str, Any]]:
        return list(self.used.values())


class _RunProgress:
    """Counts quantization runs and estimates the time left from the mean time per preset."""

    def __init__(self) -> None:
        self.total: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.seconds: dict[str, list[float]] = {}

    def start(self, per_preset: dict[str, int]) -> None:
        self.total = dict(per_preset)
        self.done = dict.fromkeys(per_preset, 0)
        self.seconds = {preset: [] for preset in per_preset}

    def skipped(self, preset: str) -> None:
        """A run found in the work directory."""
        self.done[preset] = self.done.get(preset, 0) + 1

    def finished(self, preset: str, seconds: float) -> None:
        self.done[preset] = self.done.get(preset, 0) + 1
        self.seconds.setdefault(preset, []).append(seconds)

    def status(self) -> str:
        """``"run 12 of <= 80, ~1h05m of runs left"``: runs done or found, and the time left."""
        count = sum(self.done.values())
        measured = [s for values in self.seconds.values() for s in values]
        fallback = statistics.fmean(measured) if measured else 0.0
        left = 0.0
        for preset, total in self.total.items():
            values = self.seconds.get(preset) or []
            mean = statistics.fmean(values) if values else fallback
            left += max(0, total - self.done.get(preset, 0)) * mean
        return f"run {count} of <= {sum(self.total.values())}, ~{_duration(left)} of runs left"


class _StageLog:
    """``on_progress(stage, done, total)`` that logs every ~30 s with the time left."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.started: dict[str, float] = {}
        self.last = time.perf_counter()

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        first = self.started.setdefault(stage, now)
        if now - self.last < _LOG_EVERY_S and done < total:
            return
        if done >= total and now - first < _LOG_EVERY_S:
            return
        self.last = now
        left = (now - first) / max(done, 1) * (total - done)
        logger.info("%s: %s %d/%d, ~%s left", self.what, stage, done, total, _duration(left))


def _unavailable(note: str) -> dict[str, Any]:
    return {"available": False, "note": note}


def _timing(seconds: float, images: int, detail: dict[str, float]) -> dict[str, Any]:
    return {
        "images": int(images),
        "seconds": float(seconds),
        "seconds_per_1000": 1000.0 * float(seconds) / max(int(images), 1),
        "detail": {k: float(v) for k, v in detail.items()},
    }


def _fingerprint(parts: dict[str, Any]) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _folder_digest(folder: Path) -> str:
    """sha256 over every file of a folder (names and contents), e.g. the generator."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"generator folder {folder} does not exist; train it with "
            "`python benchmarks/fashion/train_generator.py` or pass generator_dir"
        )
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _write_cache(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Tensors plus JSON metadata in one safetensors file, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
        str(temporary),
        metadata={"meta": json.dumps(meta)},
    )
    os.replace(temporary, path)


def _read_cache(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    return tensors, json.loads(metadata.get("meta", "{}"))


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes}m" if seconds >= 60 else f"{seconds:.0f}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _machine(device: torch.device) -> str:
    cpu = cpu_name()
    text = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)"
    if device.type == "cuda":
        return f"{text}, {torch.cuda.get_device_name(device)}"
    return f"{text}, CPU only"


def _versions() -> dict[str, str]:
    import diffusers

    return {
        "genq": genq_core.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }


def _check_setting(setting: object) -> None:
    ok = (
        isinstance(setting, tuple)
        and len(setting) == 3
        and all(_is_int(b) and 2 <= b <= 8 for b in setting)
    )
    _check(ok, "settings", setting, "each must be (weight_bits, act_bits, first_last_bits) in 2..8")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_subset_tuple(value: Any, name: str) -> None:
    """``value`` is a non-empty tuple without duplicates (an optional field that picks a subset)."""
    _check(
        isinstance(value, tuple) and len(value) > 0,
        name,
        value,
        "must be a non-empty tuple or None",
    )
    _check(len(set(value)) == len(value), name, value, "has duplicates")


def _check(ok: bool, name: str, value: object, requirement: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {requirement}, got {value!r}")
