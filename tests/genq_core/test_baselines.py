from __future__ import annotations

import pytest
import torch
from torch import nn

from genq_core.baselines import (
    ModelInversionCanceled,
    ModelInversionConfig,
    SourceTiming,
    bn_statistics_loss,
    gaussian_noise,
    model_inversion,
    timed,
)
from tests.genq_core.conftest import SHAPE, TinyBNNet, assert_untouched

FAST = ModelInversionConfig(iters=40, lr=0.1, batch_size=4, seed=0)


# ---- Gaussian noise ---------------------------------------------------------------------------


def test_noise_is_deterministic_per_seed() -> None:
    first = gaussian_noise(5, SHAPE, seed=7)
    assert first.shape == (5, *SHAPE) and first.dtype == torch.float32
    assert torch.equal(first, gaussian_noise(5, SHAPE, seed=7))
    assert not torch.equal(first, gaussian_noise(5, SHAPE, seed=8))


def test_noise_takes_per_channel_moments() -> None:
    noise = gaussian_noise(400, SHAPE, seed=0, mean=(1.0, 0.0, -1.0), std=(0.5, 1.0, 2.0))
    per_channel = noise.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(per_channel.mean(1), torch.tensor([1.0, 0.0, -1.0]), atol=0.05)
    assert torch.allclose(per_channel.std(1), torch.tensor([0.5, 1.0, 2.0]), rtol=0.05)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must"),
        ({"shape": (3, 0, 8)}, "shape"),
        ({"mean": (0.0, 0.0)}, "mean needs 1 or 3"),
        ({"std": 0.0}, "std must"),
    ],
)
def test_noise_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    arguments = {"n": 2, "shape": SHAPE, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        gaussian_noise(**arguments)


# ---- model inversion --------------------------------------------------------------------------


def test_model_inversion_lowers_the_bn_statistics_loss(bn_model: TinyBNNet) -> None:
    state = {k: v.clone() for k, v in bn_model.state_dict().items()}
    bn_model.train()
    start = torch.randn((6, *SHAPE), generator=torch.Generator().manual_seed(FAST.seed))

    images, labels = model_inversion(bn_model, 6, SHAPE, 4, FAST)

    assert images.shape == (6, *SHAPE) and labels.shape == (6,)
    assert labels.dtype == torch.int64 and int(labels.min()) >= 0 and int(labels.max()) < 4
    for batch in (slice(0, 4), slice(4, 6)):
        before = bn_statistics_loss(bn_model, start[batch])
        after = bn_statistics_loss(bn_model, images[batch])
        assert after < 0.1 * before, (before, after)
    assert_untouched(bn_model, state, training=True)


def test_model_inversion_is_deterministic_and_pulls_towards_targets(bn_model: TinyBNNet) -> None:
    config = ModelInversionConfig(iters=40, lr=0.1, batch_size=8, ce_weight=5.0, seed=2)
    images, labels = model_inversion(bn_model, 8, SHAPE, 4, config)
    again, again_labels = model_inversion(bn_model, 8, SHAPE, 4, config)
    assert torch.equal(images, again) and torch.equal(labels, again_labels)
    with torch.no_grad():
        agreement = (bn_model(images).argmax(1) == labels).float().mean()
    assert agreement >= 0.75


def test_model_inversion_total_variation_smooths(bn_model: TinyBNNet) -> None:
    def roughness(x: torch.Tensor) -> float:
        return float((x[..., 1:] - x[..., :-1]).abs().mean())

    plain, _ = model_inversion(bn_model, 4, SHAPE, 4, FAST)
    smooth, _ = model_inversion(
        bn_model, 4, SHAPE, 4, ModelInversionConfig(iters=40, lr=0.1, batch_size=4, tv_weight=5.0)
    )
    assert roughness(smooth) < roughness(plain)


def test_model_inversion_needs_batchnorm() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match="BatchNorm"):
        model_inversion(model, 2, SHAPE, 2, FAST)
    untracked = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="running statistics"):
        bn_statistics_loss(untracked, torch.zeros(2, *SHAPE))


def test_model_inversion_progress_and_cancel(bn_model: TinyBNNet) -> None:
    config = ModelInversionConfig(iters=3, batch_size=2)
    seen: list[tuple[str, int, int]] = []
    model_inversion(bn_model, 3, SHAPE, 4, config, on_progress=lambda *a: seen.append(a))
    assert seen == [("model_inversion", i, 6) for i in range(1, 7)]

    polls = iter([False] * 4 + [True])
    with pytest.raises(ModelInversionCanceled, match="batch 2/2, step 1"):
        model_inversion(bn_model, 3, SHAPE, 4, config, should_stop=lambda: next(polls))
    assert all(not m._forward_pre_hooks for m in bn_model.modules())


@pytest.mark.parametrize(
    ("field", "value"),
    [("iters", 0), ("lr", 0.0), ("batch_size", 0), ("bn_weight", 0.0), ("ce_weight", -1.0)],
)
def test_model_inversion_config_rejects_bad_values(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        ModelInversionConfig(**{field: value})  # type: ignore[arg-type]


# ---- timing -----------------------------------------------------------------------------------


def test_timed_reports_seconds_per_1000_images() -> None:
    result, timing = timed("noise", lambda: gaussian_noise(50, SHAPE, seed=0))
    assert result.shape[0] == 50
    assert timing.source == "noise" and timing.images == 50 and timing.seconds >= 0
    assert timing.seconds_per_1000 == pytest.approx(20 * timing.seconds)
    assert timing.to_dict()["seconds_per_1000"] == timing.seconds_per_1000

    _, pair_timing = timed("pair", lambda: (torch.zeros(3, 1), torch.zeros(3)))
    assert pair_timing.images == 3
    _, given = timed("listed", lambda: ["a", "b"], images=10)
    assert given.images == 10
    assert SourceTiming("x", 500, 2.0).seconds_per_1000 == 4.0


def test_timed_needs_a_countable_result() -> None:
    with pytest.raises(ValueError, match="cannot count"):
        timed("opaque", lambda: object())
    with pytest.raises(ValueError, match="no images"):
        timed("empty", lambda: torch.zeros(0, 3))
