from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from genq_core.filters import (
    ClipModel,
    FilterCanceled,
    FilterConfig,
    apply_filters,
    keep_per_class,
)

from .conftest import in_distribution

# ---- keep_per_class ---------------------------------------------------------------------------


def test_quotas_round_up_and_keep_one_per_class() -> None:
    labels = torch.tensor([0] * 10 + [1] * 3 + [2])
    scores = torch.arange(14, dtype=torch.float32)
    keep = keep_per_class(scores, labels, keep_ratio=0.5, higher_is_better=False)
    assert keep[:10].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    assert keep[10:13].tolist() == [True, True, False]  # ceil(1.5) = 2
    assert keep[13]  # a class of one keeps its image
    high = keep_per_class(scores, labels, keep_ratio=0.5, higher_is_better=True)
    assert high[:10].nonzero().flatten().tolist() == [5, 6, 7, 8, 9]


def test_quota_ignores_float_noise() -> None:
    # 0.7 * 10 = 7.000000000000001 in floating point; the quota is still 7
    keep = keep_per_class(torch.zeros(10), torch.zeros(10, dtype=torch.long), 0.7, False)
    assert int(keep.sum()) == 7


def test_ties_keep_lower_indices_and_nan_ranks_last() -> None:
    labels = torch.zeros(6, dtype=torch.long)
    scores = torch.tensor([1.0, math.nan, 0.0, 0.0, 0.0, math.nan])
    keep = keep_per_class(scores, labels, keep_ratio=0.5, higher_is_better=False)
    assert keep.tolist() == [False, False, True, True, True, False]
    keep = keep_per_class(scores, labels, keep_ratio=0.5, higher_is_better=True)
    assert keep.tolist() == [True, False, True, True, False, False]


def test_keep_per_class_errors() -> None:
    with pytest.raises(ValueError, match="keep_ratio"):
        keep_per_class(torch.zeros(2), torch.zeros(2, dtype=torch.long), 0.0, False)
    with pytest.raises(ValueError, match=r"\[N\]"):
        keep_per_class(torch.zeros(2), torch.zeros(3, dtype=torch.long), 0.5, False)


# ---- FilterConfig -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("order", ("energy", "bogus")),
        ("order", ("energy", "energy")),
        ("order", ["energy"]),
        ("energy_keep", 0.0),
        ("distribution_keep", 1.5),
        ("clip_keep", float("nan")),
        ("temperature", -1.0),
        ("label_agreement", 1),
        ("clip_model", ""),
        ("clip_pretrained", 3),
        ("batch_size", 1),
        ("seed", 1.5),
    ],
)
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        FilterConfig(**{field: value})  # type: ignore[arg-type]


# ---- apply_filters ----------------------------------------------------------------------------


def labelled_set(n_per_class: int = 10, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    images = in_distribution(n_per_class * classes, seed=7)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return images, labels


def test_default_chain_on_a_batchnorm_model(bn_net: nn.Module) -> None:
    images, labels = labelled_set()
    report = apply_filters(
        bn_net, images, labels, FilterConfig(batch_size=8), class_names=["a", "b", "c"]
    )
    energy, distribution = report.results
    assert (energy.name, energy.method) == ("energy", "energy")
    assert (distribution.name, distribution.method) == ("distribution", "bn_sensitivity")
    # 10 per class -> energy keeps 5 -> distribution keeps ceil(0.8 * 5) = 4
    assert report.class_counts("energy") == {0: (10, 5), 1: (10, 5), 2: (10, 5)}
    assert report.class_counts("distribution") == {0: (5, 4), 1: (5, 4), 2: (5, 4)}
    assert torch.equal(distribution.entered, energy.kept)
    assert torch.equal(report.final, distribution.kept)
    assert bool(torch.isnan(distribution.scores[~energy.kept]).all())
    assert not bool(torch.isnan(distribution.scores[energy.kept]).any())
    assert report.notes == ()
    # energy keeps each class's lowest energies
    for cls in range(3):
        members = labels == cls
        kept_max = energy.scores[members & energy.kept].max()
        dropped_min = energy.scores[members & ~energy.kept].min()
        assert float(kept_max) <= float(dropped_min)


def test_report_serialises(bn_net: nn.Module) -> None:
    images, labels = labelled_set(4)
    report = apply_filters(bn_net, images, labels, FilterConfig(batch_size=4))
    summary = report.to_dict(include_images=True)
    json.dumps(summary, allow_nan=False)
    assert summary["num_kept"] == int(report.final.sum()) == 3 * 2
    assert summary["filters"][0]["per_class"]["1"] == {"in": 4, "kept": 2}
    assert summary["config"]["order"] == ["energy", "distribution"]
    dropped = int((~report.kept["energy"]).nonzero()[0])
    scores, kept = report.per_image(dropped)
    assert set(scores) == {"energy"} and kept == {"energy": False}
    assert summary["images"][dropped]["kept_final"] is False
    text = report.markdown()
    assert "| energy | energy | 0.5 | 12 | 6 |" in text
    assert "| distribution | bn_sensitivity | 0.8 | 6 | 6 |" in text


def test_vit_uses_patch_entropy_with_a_note(tiny_vit: nn.Module) -> None:
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    config = FilterConfig(order=("distribution",), distribution_keep=0.5)
    report = apply_filters(tiny_vit, images, labels, config)
    assert report.results[0].method == "patch_entropy"
    assert report.results[0].higher_is_better is True
    assert int(report.final.sum()) == 4
    assert report.notes == ("distribution: model has no BatchNorm; used patch-similarity entropy",)


def test_inapplicable_distribution_filter_keeps_all_and_says_so(plain_mlp: nn.Module) -> None:
    images, labels = labelled_set(4)
    report = apply_filters(plain_mlp, images, labels, FilterConfig())
    distribution = report.results[1]
    assert distribution.method == "none"
    assert torch.equal(distribution.kept, distribution.entered)
    assert any("not applicable" in note for note in report.notes)
    assert "Notes:" in report.markdown()


def test_order_can_be_reversed_or_empty(bn_net: nn.Module) -> None:
    images, labels = labelled_set(4)
    report = apply_filters(bn_net, images, labels, FilterConfig(order=("distribution", "energy")))
    assert [r.name for r in report.results] == ["distribution", "energy"]
    assert bool(report.results[0].entered.all())
    empty = apply_filters(bn_net, images, labels, FilterConfig(order=()))
    assert bool(empty.final.all()) and empty.notes == ("no filter configured: every image kept",)


def test_label_agreement_runs_first_and_shares_logits(bn_net: nn.Module) -> None:
    images, labels = labelled_set(6)
    with torch.no_grad():
        predicted = bn_net(images).argmax(dim=1)
    forwarded = []
    handle = bn_net.register_forward_hook(lambda m, i, o: forwarded.append(i[0].shape[0]))
    config = FilterConfig(order=("energy",), label_agreement=True, batch_size=64)
    report = apply_filters(bn_net, images, labels, config)
    handle.remove()
    assert sum(forwarded) == 18  # one pass over the images feeds both filters
    agreement = report.results[0]
    assert agreement.name == "label_agreement"
    assert torch.equal(agreement.kept, predicted == labels)
    for cls, (entered, _) in report.class_counts("energy").items():
        assert entered == int(((predicted == labels) & (labels == cls)).sum())
    missing = {cls for cls in range(3) if not bool(((predicted == labels) & (labels == cls)).any())}
    assert any("now empty" in note for note in report.notes) == bool(missing)


def test_non_finite_images_are_dropped_with_a_note(bn_net: nn.Module) -> None:
    images, labels = labelled_set(4)
    images[5, 0, 0, 0] = math.nan
    report = apply_filters(bn_net, images, labels, FilterConfig(order=("energy",)))
    assert not bool(report.results[0].entered[5]) and not bool(report.final[5])
    assert report.notes[0] == "1 images with non-finite pixels dropped first"
    assert report.class_counts("energy")[1] == (3, 2)


def test_clip_filter(bn_net: nn.Module, tiny_clip: ClipModel) -> None:
    images, labels = labelled_set(4)
    pixels = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    config = FilterConfig(order=(), clip=True, clip_keep=0.5)
    clip = tiny_clip
    report = apply_filters(
        bn_net, images, labels, config, clip_images=pixels, class_names=["a", "b", "c"], clip=clip
    )
    result = report.results[0]
    assert (result.name, result.higher_is_better) == ("clip", True)
    assert report.class_counts("clip") == {0: (4, 2), 1: (4, 2), 2: (4, 2)}
    assert any("random weights" in note for note in report.notes)
    with pytest.raises(ValueError, match="clip_images"):
        apply_filters(bn_net, images, labels, config, class_names=["a", "b", "c"], clip=clip)
    with pytest.raises(ValueError, match="prompts"):
        apply_filters(bn_net, images, labels, config, clip_images=pixels, clip=clip)


def test_progress_and_cancel(bn_net: nn.Module) -> None:
    images, labels = labelled_set(4)
    stages: set[str] = set()
    apply_filters(
        bn_net,
        images,
        labels,
        FilterConfig(batch_size=4),
        on_progress=lambda stage, done, total: stages.add(stage),
    )
    assert stages == {"filter:logits", "filter:distribution"}
    with pytest.raises(FilterCanceled):
        apply_filters(bn_net, images, labels, FilterConfig(), should_stop=lambda: True)


def test_input_errors(bn_net: nn.Module) -> None:
    images, labels = labelled_set(2)
    with pytest.raises(ValueError, match="labels"):
        apply_filters(bn_net, images, labels[:-1], FilterConfig())
    with pytest.raises(ValueError, match="labels"):
        apply_filters(bn_net, images, labels.float(), FilterConfig())
    with pytest.raises(ValueError, match="no name"):
        apply_filters(bn_net, images, labels, FilterConfig(), class_names=["a"])
    with pytest.raises(ValueError, match="FilterConfig"):
        apply_filters(bn_net, images, labels, {"order": ()})  # type: ignore[arg-type]
