"""Selecting the calibration set: per-class quotas and the filter chain.

:func:`apply_filters` runs the configured filters one after another, each on the survivors of
the one before, and returns a :class:`FilterReport` that records every filter's scores, masks,
per-class counts and anything the caller should know (a filter that did not apply, random CLIP
weights). Nothing is dropped silently.

Chain order: label agreement (if on; a hard yes/no filter), CLIP (if on), then ``order``
(default energy, then distribution). Images whose pixels are not finite (NaN/inf, e.g. a failed
fp16 generation) are dropped before any filter, with a note.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from genq_core.filters._common import FilterCanceled, check_images
from genq_core.filters.bn import bn_sensitivity, has_batchnorm
from genq_core.filters.clip import ClipImages, ClipModel, clip_scores, load_clip
from genq_core.filters.energy import classifier_logits, energy_from_logits
from genq_core.filters.patch import is_vit_like, patch_similarity_entropy
from genq_core.progress import ProgressFn, StopFn, check_stop

__all__ = [
    "ORDERED_FILTERS",
    "FilterConfig",
    "FilterReport",
    "FilterResult",
    "apply_filters",
    "keep_per_class",
]

ORDERED_FILTERS = ("energy", "distribution")
"""Names allowed in :attr:`FilterConfig.order`."""


def keep_per_class(
    scores: torch.Tensor, labels: torch.Tensor, keep_ratio: float, higher_is_better: bool
) -> torch.Tensor:
    """Keep the best ``keep_ratio`` of every class.

    Class ``c`` with ``n_c`` images keeps ``k_c = max(1, ceil(keep_ratio * n_c))`` of them
    (rounded up, so small classes never vanish and at least ``keep_ratio`` of the set survives).
    Ranking is by score (descending when ``higher_is_better``); NaN scores rank below every
    number; equal scores keep the lower index first, so the result is deterministic.

    Args:
        scores: float ``[N]``.
        labels: integer ``[N]`` class of every image.
        keep_ratio: in ``(0, 1]``.
        higher_is_better: whether a high score is a good image.

    Returns:
        bool ``[N]`` on the CPU.
    """
    if scores.dim() != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"scores and labels must both be [N], got {tuple(scores.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    scores, labels = scores.detach().cpu().double(), labels.detach().cpu()
    keep = torch.zeros(scores.shape[0], dtype=torch.bool)
    for cls in torch.unique(labels):
        members = (labels == cls).nonzero().flatten()
        quota = max(1, math.ceil(round(keep_ratio * members.numel(), 9)))
        key = -scores[members] if higher_is_better else scores[members]
        missing = torch.isnan(key)
        order = torch.argsort(torch.where(missing, math.inf, key), stable=True)
        order = order[torch.argsort(missing[order].int(), stable=True)]  # NaN last
        keep[members[order[:quota]]] = True
    return keep


@dataclass(frozen=True)
class FilterConfig:
    """Which filters select the calibration set, and how much each keeps.

    Attributes:
        order: the ranking filters, run in this order: ``"energy"`` (lowest free energy under the
            float classifier) and ``"distribution"`` (BN-statistics sensitivity for BatchNorm
            models, patch-similarity entropy for ViTs). ``()`` runs neither.
        energy_keep: fraction of each class the energy filter keeps, in ``(0, 1]``.
        temperature: the energy's temperature ``T`` > 0.
        distribution_keep: fraction of each class the distribution filter keeps.
        label_agreement: first drop images whose top-1 class differs from their label.
        clip: then keep the images CLIP finds most like their prompt (needs the raw images and
            prompts, see :func:`apply_filters`).
        clip_model: open_clip architecture, ``local-dir:`` folder or ``hf-hub:`` id.
        clip_pretrained: open_clip pretrained tag or weights file (``None``: random weights).
        clip_keep: fraction of each class the CLIP filter keeps.
        batch_size: images per forward pass, >= 2 (BN sensitivity compares within batches).
        seed: seeds how the BN filter mixes images into batches.
    """

    order: tuple[str, ...] = ("energy", "distribution")
    energy_keep: float = 0.5
    temperature: float = 1.0
    distribution_keep: float = 0.8
    label_agreement: bool = False
    clip: bool = False
    clip_model: str = "ViT-B-32"
    clip_pretrained: str | None = "openai"
    clip_keep: float = 0.8
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        _check(isinstance(self.order, tuple), "order", self.order, "must be a tuple of names")
        for name in self.order:
            _check(name in ORDERED_FILTERS, "order", self.order, f"may only hold {ORDERED_FILTERS}")
        _check(len(set(self.order)) == len(self.order), "order", self.order, "has duplicates")
        for name in ("energy_keep", "distribution_keep", "clip_keep"):
            value = getattr(self, name)
            ok = _is_number(value) and 0 < value <= 1
            _check(ok, name, value, "must be a number in (0, 1]")
        ok = _is_number(self.temperature) and self.temperature > 0
        _check(ok, "temperature", self.temperature, "must be a number > 0")
        for name in ("label_agreement", "clip"):
            value = getattr(self, name)
            _check(isinstance(value, bool), name, value, "must be true or false")
        _check(
            isinstance(self.clip_model, str) and bool(self.clip_model),
            "clip_model",
            self.clip_model,
            "must be a non-empty string",
        )
        _check(
            self.clip_pretrained is None or isinstance(self.clip_pretrained, str),
            "clip_pretrained",
            self.clip_pretrained,
            "must be a string or null",
        )
        ok = _is_int(self.batch_size) and self.batch_size >= 2
        _check(ok, "batch_size", self.batch_size, "must be an integer >= 2")
        _check(_is_int(self.seed), "seed", self.seed, "must be an integer")


@dataclass(frozen=True, eq=False)
class FilterResult:
    """What one filter of the chain did.

    Attributes:
        name: ``"label_agreement"``, ``"clip"``, ``"energy"`` or ``"distribution"``.
        method: how it scored: ``"label_agreement"``, ``"clip"``, ``"energy"``,
            ``"bn_sensitivity"``, ``"patch_entropy"``, or ``"none"`` when it did not apply.
        keep_ratio: the per-class fraction kept (``None`` for yes/no and skipped filters).
        higher_is_better: the score's direction (``None`` when there are no scores).
        scores: float ``[N]``; NaN for images it did not score.
        entered: bool ``[N]``, the images it saw (the previous filter's survivors).
        kept: bool ``[N]``, the images it passed on (a subset of ``entered``).
    """

    name: str
    method: str
    keep_ratio: float | None
    higher_is_better: bool | None
    scores: torch.Tensor
    entered: torch.Tensor
    kept: torch.Tensor


@dataclass(frozen=True, eq=False)
class FilterReport:
    """The outcome of :func:`apply_filters`.

    Attributes:
        labels: integer ``[N]`` class of every image.
        results: one :class:`FilterResult` per filter, in the order they ran.
        final: bool ``[N]``, the calibration set.
        notes: what the reader must know: skipped filters, substitutes, random CLIP weights.
        config: the configuration that produced it.
        class_names: names of the classes, when the caller gave them.
    """

    labels: torch.Tensor
    results: tuple[FilterResult, ...]
    final: torch.Tensor
    notes: tuple[str, ...]
    config: FilterConfig
    class_names: tuple[str, ...] | None = None

    @property
    def scores(self) -> dict[str, torch.Tensor]:
        """Filter name -> float ``[N]`` scores (NaN where not scored)."""
        return {result.name: result.scores for result in self.results}

    @property
    def kept(self) -> dict[str, torch.Tensor]:
        """Filter name -> bool ``[N]``, the images that filter passed on."""
        return {result.name: result.kept for result in self.results}

    @property
    def classes(self) -> list[int]:
        """Every class index: all of ``class_names`` if given, else the labels present."""
        if self.class_names is not None:
            return list(range(len(self.class_names)))
        return [int(c) for c in torch.unique(self.labels)]

    def class_name(self, cls: int) -> str:
        """The name of class ``cls`` (its index as text without ``class_names``)."""
        return self.class_names[cls] if self.class_names is not None else str(cls)

    def class_counts(self, name: str) -> dict[int, tuple[int, int]]:
        """Class -> ``(entered, kept)`` counts of the filter called ``name``."""
        result = self._result(name)
        return {
            cls: (
                int((result.entered & (self.labels == cls)).sum()),
                int((result.kept & (self.labels == cls)).sum()),
            )
            for cls in self.classes
        }

    def final_counts(self) -> dict[int, tuple[int, int]]:
        """Class -> ``(generated, in the calibration set)``."""
        return {
            cls: (int((self.labels == cls).sum()), int((self.final & (self.labels == cls)).sum()))
            for cls in self.classes
        }

    def per_image(self, index: int) -> tuple[dict[str, float], dict[str, bool]]:
        """Image ``index``'s scores and verdicts, for a manifest record.

        Returns:
            ``(scores, kept)``: filter name -> score for the filters that scored it, and filter
            name -> passed for the filters it entered.
        """
        scores: dict[str, float] = {}
        kept: dict[str, bool] = {}
        for result in self.results:
            if not bool(result.entered[index]):
                continue
            kept[result.name] = bool(result.kept[index])
            value = float(result.scores[index])
            if not math.isnan(value):
                scores[result.name] = value
        return scores, kept

    def to_dict(self, include_images: bool = False) -> dict[str, Any]:
        """JSON-ready summary (NaN -> ``None``); ``include_images`` adds per-image entries."""
        filters = []
        for result in self.results:
            counts = self.class_counts(result.name)
            valid = result.scores[result.entered & ~torch.isnan(result.scores)]
            filters.append(
                {
                    "name": result.name,
                    "method": result.method,
                    "keep_ratio": result.keep_ratio,
                    "higher_is_better": result.higher_is_better,
                    "in": int(result.entered.sum()),
                    "kept": int(result.kept.sum()),
                    "score_min": float(valid.min()) if valid.numel() else None,
                    "score_mean": float(valid.mean()) if valid.numel() else None,
                    "score_max": float(valid.max()) if valid.numel() else None,
                    "per_class": {
                        self.class_name(cls): {"in": entered, "kept": kept}
                        for cls, (entered, kept) in counts.items()
                    },
                }
            )
        summary: dict[str, Any] = {
            "num_images": int(self.labels.numel()),
            "num_kept": int(self.final.sum()),
            "config": _json_ready(dataclasses.asdict(self.config)),
            "filters": filters,
            "final_per_class": {
                self.class_name(cls): {"generated": total, "kept": kept}
                for cls, (total, kept) in self.final_counts().items()
            },
            "notes": list(self.notes),
        }
        if include_images:
            images = []
            for index in range(self.labels.numel()):
                scores, kept = self.per_image(index)
                images.append(
                    {
                        "index": index,
                        "label": int(self.labels[index]),
                        "scores": scores,
                        "kept": kept,
                        "kept_final": bool(self.final[index]),
                    }
                )
            summary["images"] = images
        return summary

    def markdown(self) -> str:
        """A human-readable report: the chain, per-class counts, notes."""
        lines = [
            "## Calibration-set filtering",
            "",
            f"{int(self.final.sum())} of {self.labels.numel()} images kept.",
            "",
            "| filter | method | keep ratio | in | kept |",
            "|---|---|---|---|---|",
        ]
        for result in self.results:
            ratio = "-" if result.keep_ratio is None else f"{result.keep_ratio:g}"
            lines.append(
                f"| {result.name} | {result.method} | {ratio} | {int(result.entered.sum())} "
                f"| {int(result.kept.sum())} |"
            )
        header = ["class", "generated", *(f"after {r.name}" for r in self.results)]
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        per_filter = [self.class_counts(result.name) for result in self.results]
        for cls, (total, _) in self.final_counts().items():
            cells = [self.class_name(cls), str(total), *(str(c[cls][1]) for c in per_filter)]
            lines.append("| " + " | ".join(cells) + " |")
        if self.notes:
            lines += ["", "Notes:", *(f"- {note}" for note in self.notes)]
        return "\n".join(lines) + "\n"

    def _result(self, name: str) -> FilterResult:
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(f"no filter {name!r} in this report (ran: {[r.name for r in self.results]})")


def apply_filters(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: FilterConfig,
    *,
    clip_images: ClipImages | None = None,
    prompts: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    clip: ClipModel | None = None,
    device: str | torch.device = "cpu",
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> FilterReport:
    """Run the filter chain of ``config`` and return what every filter kept and why.

    Args:
        model: the unfolded full-precision classifier (BatchNorm not folded); not modified.
        images: ``[N, C, H, W]`` images preprocessed for ``model``; may stay on the CPU.
        labels: integer ``[N]``, the class each image was generated for.
        config: which filters, in which order, keeping how much.
        clip_images: for the CLIP filter: the same ``N`` images as pixels (PIL images, or a
            ``[N, C, H, W]`` tensor in ``[0, 1]``), since CLIP has its own preprocessing.
        prompts: for the CLIP filter: one text per image (e.g. its generation prompt); defaults
            to ``"a photo of a {class name}"`` when ``class_names`` are given.
        class_names: names of the classes, indexed by label; used by the report and the prompts.
        clip: an already loaded CLIP model; otherwise built from ``config.clip_model``.
        device: where the models run.
        on_progress: ``on_progress(stage, done, total)`` in images, stages ``"filter:<name>"``.
        should_stop: polled between batches; True raises :class:`FilterCanceled`.

    Raises:
        ValueError: inconsistent inputs (named), or the CLIP filter without images or prompts.
        FilterCanceled: ``should_stop()`` returned True.
    """
    # 1. check inputs
    if not isinstance(config, FilterConfig):
        raise ValueError(f"config must be a FilterConfig, got {type(config).__name__}")
    check_images(images)
    count = images.shape[0]
    if not isinstance(labels, torch.Tensor) or labels.shape != (count,):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a [N] = [{count}] tensor like the images, got {shape}")
    if labels.is_floating_point() or labels.dtype == torch.bool or int(labels.min()) < 0:
        raise ValueError("labels must be non-negative integer class indices")
    labels = labels.detach().cpu().long()
    names = tuple(class_names) if class_names is not None else None
    if names is not None and int(labels.max()) >= len(names):
        raise ValueError(f"label {int(labels.max())} has no name among {len(names)} class_names")
    if config.clip:
        prompts = _clip_prompts(count, clip_images, prompts, names, labels)

    # 2. drop images that are not finite
    notes: list[str] = []
    finite = [torch.isfinite(chunk.flatten(1)).all(dim=1) for chunk in images.detach().split(256)]
    survivors = torch.cat(finite).cpu()
    if not bool(survivors.all()):
        notes.append(f"{int((~survivors).sum())} images with non-finite pixels dropped first")

    # 3. the chain: each filter scores the survivors of the previous one
    chain = [
        *(["label_agreement"] if config.label_agreement else []),
        *(["clip"] if config.clip else []),
        *config.order,
    ]
    if not chain:
        notes.append("no filter configured: every image kept")
    logits = _LogitCache(model, images, config.batch_size, device, on_progress, should_stop)
    results: list[FilterResult] = []
    for name in chain:
        check_stop(should_stop, f"filter {name}", FilterCanceled)
        entered = survivors.clone()
        rows = entered.nonzero().flatten()
        scores = torch.full((count,), math.nan)
        if rows.numel() == 0:
            notes.append(f"{name}: no images left to filter")
            results.append(FilterResult(name, "none", None, None, scores, entered, entered))
            continue
        if name == "label_agreement":
            agree = logits.get(rows).argmax(dim=1) == labels[rows]
            kept = torch.zeros(count, dtype=torch.bool)
            kept[rows[agree]] = True
            result = FilterResult(name, name, None, None, scores, entered, kept)
            notes += _emptied_classes(name, entered, kept, labels, names)
        elif name == "clip":
            assert prompts is not None and clip_images is not None
            if clip is None:
                clip = load_clip(config.clip_model, config.clip_pretrained, device)
            if not clip.has_weights:
                notes.append(f"clip: {clip.name} has random weights; its ranking is meaningless")
            scores[rows] = clip_scores(
                clip_images,
                prompts,
                clip=clip,
                batch_size=config.batch_size,
                indices=rows,
                on_progress=on_progress,
                should_stop=should_stop,
            )
            result = _ranked(name, name, scores, entered, labels, config.clip_keep, True)
        elif name == "energy":
            scores[rows] = energy_from_logits(logits.get(rows), config.temperature)
            result = _ranked(name, name, scores, entered, labels, config.energy_keep, False)
        else:
            result = _distribution(
                model, images, labels, config, entered, device, notes, on_progress, should_stop
            )
        results.append(result)
        survivors = result.kept

    # 4. the report
    return FilterReport(
        labels=labels,
        results=tuple(results),
        final=survivors,
        notes=tuple(notes),
        config=config,
        class_names=names,
    )


def _distribution(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: FilterConfig,
    entered: torch.Tensor,
    device: str | torch.device,
    notes: list[str],
    on_progress: ProgressFn | None,
    should_stop: StopFn | None,
) -> FilterResult:
    """The distribution filter: BN sensitivity, else patch entropy, else a noted pass-through."""
    rows = entered.nonzero().flatten()
    scores = torch.full((entered.shape[0],), math.nan)
    keep = config.distribution_keep
    if has_batchnorm(model):
        if rows.numel() < 2:
            notes.append("distribution: fewer than 2 images left; BN sensitivity skipped, kept all")
            return FilterResult("distribution", "none", None, None, scores, entered, entered)
        scores[rows] = bn_sensitivity(
            model,
            images,
            config.batch_size,
            device,
            shuffle_seed=config.seed,
            indices=rows,
            on_progress=on_progress,
            should_stop=should_stop,
        )
        return _ranked("distribution", "bn_sensitivity", scores, entered, labels, keep, False)
    if is_vit_like(model):
        notes.append("distribution: model has no BatchNorm; used patch-similarity entropy")
        scores[rows] = patch_similarity_entropy(
            model,
            images,
            config.batch_size,
            device,
            indices=rows,
            on_progress=on_progress,
            should_stop=should_stop,
        )
        return _ranked("distribution", "patch_entropy", scores, entered, labels, keep, True)
    notes.append("distribution: not applicable (no BatchNorm, not a transformer); kept all")
    return FilterResult("distribution", "none", None, None, scores, entered, entered)


def _ranked(
    name: str,
    method: str,
    scores: torch.Tensor,
    entered: torch.Tensor,
    labels: torch.Tensor,
    keep_ratio: float,
    higher_is_better: bool,
) -> FilterResult:
    rows = entered.nonzero().flatten()
    kept = torch.zeros_like(entered)
    chosen = keep_per_class(scores[rows], labels[rows], keep_ratio, higher_is_better)
    kept[rows[chosen]] = True
    return FilterResult(name, method, keep_ratio, higher_is_better, scores, entered, kept)


class _LogitCache:
    """The classifier's logits, computed once per image however many filters need them."""

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        batch_size: int,
        device: str | torch.device,
        on_progress: ProgressFn | None,
        should_stop: StopFn | None,
    ) -> None:
        self.model, self.images, self.batch_size, self.device = model, images, batch_size, device
        self.on_progress, self.should_stop = on_progress, should_stop
        self.logits: torch.Tensor | None = None
        self.done = torch.zeros(images.shape[0], dtype=torch.bool)

    def get(self, rows: torch.Tensor) -> torch.Tensor:
        missing = rows[~self.done[rows]]
        if missing.numel():
            fresh = classifier_logits(
                self.model,
                self.images,
                self.batch_size,
                self.device,
                indices=missing,
                stage="filter:logits",
                on_progress=self.on_progress,
                should_stop=self.should_stop,
            )
            if self.logits is None:
                self.logits = torch.full((self.images.shape[0], fresh.shape[1]), math.nan)
            self.logits[missing] = fresh
            self.done[missing] = True
        assert self.logits is not None
        return self.logits[rows]


def _clip_prompts(
    count: int,
    clip_images: ClipImages | None,
    prompts: Sequence[str] | None,
    names: tuple[str, ...] | None,
    labels: torch.Tensor,
) -> list[str]:
    if clip_images is None:
        raise ValueError("the clip filter needs clip_images (the generated pixels)")
    if len(clip_images) != count:
        raise ValueError(f"clip_images has {len(clip_images)} images for {count} images")
    if prompts is None:
        if names is None:
            raise ValueError("the clip filter needs prompts, or class_names to build them")
        return [f"a photo of a {names[int(label)]}" for label in labels]
    if len(prompts) != count:
        raise ValueError(f"prompts has {len(prompts)} entries for {count} images")
    return list(prompts)


def _emptied_classes(
    name: str,
    entered: torch.Tensor,
    kept: torch.Tensor,
    labels: torch.Tensor,
    names: tuple[str, ...] | None,
) -> list[str]:
    emptied = [
        int(cls)
        for cls in torch.unique(labels[entered])
        if not bool((kept & (labels == cls)).any())
    ]
    if not emptied:
        return []
    shown = [names[cls] if names is not None else str(cls) for cls in emptied]
    return [f"{name}: no image of class {', '.join(shown)} passed; those classes are now empty"]


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(item) for item in value]
    return value


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, name: str, value: object, requirement: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {requirement}, got {value!r}")
