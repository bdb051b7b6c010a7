from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from genq_core.align import AlignCanceled, AlignConfig, align_to_bn_statistics
from genq_core.baselines import bn_statistics_loss
from tests.genq_core.conftest import SHAPE, TinyBNNet, assert_untouched

FAST = AlignConfig(iters=40, lr=0.1, batch_size=4)


def _off_distribution(n: int, seed: int) -> torch.Tensor:
    """Images whose statistics differ from the model's running ones (wrong offsets and spread)."""
    return 1.5 * torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(seed)) - 0.7


def test_alignment_lowers_the_bn_statistics_loss_and_leaves_the_model(
    bn_model: TinyBNNet,
) -> None:
    state = {k: v.clone() for k, v in bn_model.state_dict().items()}
    bn_model.train()
    images = _off_distribution(6, seed=3)
    original = images.clone()

    aligned = align_to_bn_statistics(bn_model, images, FAST)

    assert aligned.shape == images.shape and aligned.dtype == torch.float32
    assert torch.equal(images, original)  # the input is not modified
    for batch in (slice(0, 4), slice(4, 6)):
        before = bn_statistics_loss(bn_model, images[batch])
        after = bn_statistics_loss(bn_model, aligned[batch])
        assert after < 0.2 * before, (before, after)
    assert_untouched(bn_model, state, training=True)


def test_alignment_keeps_each_image_in_its_class(bn_model: TinyBNNet) -> None:
    images = 0.5 * torch.randn((8, *SHAPE), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        classes = bn_model(images).argmax(1)
    config = AlignConfig(iters=40, lr=0.1, batch_size=8, ce_weight=5.0)
    aligned = align_to_bn_statistics(bn_model, images, config)
    with torch.no_grad():
        agreement = (bn_model(aligned).argmax(1) == classes).float().mean()
    assert agreement >= 0.75


def test_batches_are_aligned_independently_and_deterministically(bn_model: TinyBNNet) -> None:
    images = _off_distribution(8, seed=5)
    whole = align_to_bn_statistics(bn_model, images, FAST)
    again = align_to_bn_statistics(bn_model, images, FAST)
    assert torch.equal(whole, again)
    # a batch alone gives what it gives in the whole set, once the clamp range is the same
    unclamped = dataclasses.replace(FAST, clamp_to_input_range=False)
    whole = align_to_bn_statistics(bn_model, images, unclamped)
    first = align_to_bn_statistics(bn_model, images[:4], unclamped)
    torch.testing.assert_close(whole[:4], first)


def test_alignment_keeps_each_channel_in_the_range_the_set_spans(bn_model: TinyBNNet) -> None:
    # each channel in its own narrow range, far from the running means (1.0, -0.5, 0.3)
    gen = torch.Generator().manual_seed(7)
    unit = torch.rand((8, *SHAPE), generator=gen)
    low = torch.tensor([-0.3, 0.0, -1.0]).view(1, 3, 1, 1)
    width = torch.tensor([0.6, 1.0, 1.0]).view(1, 3, 1, 1)
    images = low + width * unit
    bounds = images.transpose(0, 1).reshape(3, -1)
    lo, hi = bounds.amin(1).view(1, 3, 1, 1), bounds.amax(1).view(1, 3, 1, 1)

    free = align_to_bn_statistics(
        bn_model, images, dataclasses.replace(FAST, clamp_to_input_range=False)
    )
    assert (free > hi + 0.1).any() or (free < lo - 0.1).any()  # the pull leaves the range

    aligned = align_to_bn_statistics(bn_model, images, FAST)
    assert ((aligned >= lo) & (aligned <= hi)).all()
    assert bn_statistics_loss(bn_model, aligned[:4]) < bn_statistics_loss(bn_model, images[:4])


def test_alignment_rejects_bad_input(bn_model: TinyBNNet) -> None:
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match="BN alignment needs BatchNorm"):
        align_to_bn_statistics(plain, torch.zeros(2, *SHAPE), FAST)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        align_to_bn_statistics(bn_model, torch.zeros(0, *SHAPE), FAST)
    with pytest.raises(ValueError, match="finite"):
        align_to_bn_statistics(bn_model, torch.full((2, *SHAPE), float("nan")), FAST)
    for field, value in (
        ("iters", 0),
        ("lr", 0.0),
        ("batch_size", 1.5),
        ("ce_weight", -1.0),
        ("clamp_to_input_range", 1),
    ):
        with pytest.raises(ValueError, match=field):
            AlignConfig(**{field: value})  # type: ignore[arg-type]


def test_alignment_progress_and_cancel(bn_model: TinyBNNet) -> None:
    config = AlignConfig(iters=3, batch_size=2)
    seen: list[tuple[str, int, int]] = []
    align_to_bn_statistics(
        bn_model, _off_distribution(3, seed=6), config, on_progress=lambda *a: seen.append(a)
    )
    assert seen == [("bn_align", step, 6) for step in range(1, 7)]
    with pytest.raises(AlignCanceled, match="batch 1/2, step 0"):
        align_to_bn_statistics(
            bn_model, _off_distribution(3, seed=6), config, should_stop=lambda: True
        )
