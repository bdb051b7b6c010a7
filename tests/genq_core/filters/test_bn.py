from __future__ import annotations

import pytest
import torch
from torch import nn

from genq_core.filters import FilterCanceled, bn_distance, bn_sensitivity, has_batchnorm

from .conftest import in_distribution


def direct_distance(model: nn.Module, batch: torch.Tensor) -> float:
    """D_BN(batch) computed directly: BN-input statistics over (N, H, W), biased variance."""
    captured: list[tuple[nn.modules.batchnorm._BatchNorm, torch.Tensor]] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], _: torch.Tensor) -> None:
        assert isinstance(module, nn.modules.batchnorm._BatchNorm)
        captured.append((module, inputs[0].double()))

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    with torch.no_grad():
        model(batch)
    for handle in handles:
        handle.remove()
    total = 0.0
    for module, x in captured:
        assert module.running_mean is not None and module.running_var is not None
        dims = [0, *range(2, x.dim())]
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        sigma = torch.sqrt(var + module.eps)
        sigma_run = torch.sqrt(module.running_var.double() + module.eps)
        per_channel = (mean - module.running_mean.double()).abs() + (sigma - sigma_run).abs()
        total += float(per_channel.mean())
    return total


def brute_force(model: nn.Module, images: torch.Tensor, batches: list[list[int]]) -> torch.Tensor:
    """S_i = D(B) - D(B without i) with one forward pass per subset."""
    scores = torch.empty(images.shape[0], dtype=torch.float64)
    for batch in batches:
        whole = direct_distance(model, images[batch])
        for i in batch:
            rest = [j for j in batch if j != i]
            scores[i] = whole - direct_distance(model, images[rest])
    return scores


def mixed_images() -> torch.Tensor:
    images = in_distribution(9, seed=1)
    images[2] = images[2] * 3.0 + 1.0
    images[6] = images[6] * 0.1 - 0.5
    return images


def test_closed_form_equals_brute_force(bn_net: nn.Module) -> None:
    images = mixed_images()
    scores = bn_sensitivity(bn_net, images, batch_size=4, shuffle_seed=None)
    # batches of 4: [0..3], [4..7]; the lone last image joins the batch before it
    expected = brute_force(bn_net, images, [[0, 1, 2, 3], [4, 5, 6, 7, 8]])
    assert scores.dtype == torch.float32 and scores.shape == (9,)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-6)


def test_whole_set_distance_equals_direct_computation(bn_net: nn.Module) -> None:
    images = mixed_images()
    expected = direct_distance(bn_net, images)
    for batch_size in (2, 4, 9, 64):  # batching is for memory only
        assert bn_distance(bn_net, images, batch_size=batch_size) == pytest.approx(
            expected, rel=1e-6
        )
    near = bn_distance(bn_net, in_distribution(16, seed=2))
    far = bn_distance(bn_net, in_distribution(16, seed=2) * 2.0 + 0.5)
    assert near < far


def test_one_batch_does_not_depend_on_shuffling(bn_net: nn.Module) -> None:
    images = mixed_images()
    plain = bn_sensitivity(bn_net, images, batch_size=64, shuffle_seed=None)
    shuffled = bn_sensitivity(bn_net, images, batch_size=64, shuffle_seed=5)
    torch.testing.assert_close(plain, shuffled, rtol=1e-5, atol=1e-6)
    expected = brute_force(bn_net, images, [list(range(9))])
    torch.testing.assert_close(plain.double(), expected, rtol=1e-5, atol=1e-6)


def test_image_far_from_the_statistics_is_most_sensitive(bn_net: nn.Module) -> None:
    images = in_distribution(16, seed=2)
    images[11] = images[11] * 4.0 + 2.0
    scores = bn_sensitivity(bn_net, images, batch_size=16)
    assert int(scores.argmax()) == 11
    assert float(scores[11]) > 0
    others = torch.cat([scores[:11], scores[12:]])
    assert float(scores[11]) > 5 * float(others.abs().max())


def test_indices_score_a_subset(bn_net: nn.Module) -> None:
    images = mixed_images()
    rows = torch.tensor([8, 1, 2, 5])
    subset = bn_sensitivity(bn_net, images, shuffle_seed=None, indices=rows)
    direct = bn_sensitivity(bn_net, images[rows], shuffle_seed=None)
    torch.testing.assert_close(subset, direct)


def test_hooks_removed_and_modes_restored(bn_net: nn.Module) -> None:
    bn_net.train()
    bn_net.get_submodule("head").eval()  # mixed modes survive too
    before = {name: m.training for name, m in bn_net.named_modules()}
    first_bn = bn_net.get_submodule("features.1")
    assert isinstance(first_bn, nn.BatchNorm2d) and first_bn.running_mean is not None
    stats = first_bn.running_mean.clone()
    bn_sensitivity(bn_net, in_distribution(6, seed=3), batch_size=3)
    assert {name: m.training for name, m in bn_net.named_modules()} == before
    assert torch.equal(first_bn.running_mean, stats)  # eval mode: stats untouched
    assert all(not m._forward_pre_hooks for m in bn_net.modules())


def test_cancel_between_batches_removes_hooks(bn_net: nn.Module) -> None:
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(FilterCanceled):
        bn_sensitivity(bn_net, in_distribution(8, seed=4), batch_size=4, should_stop=should_stop)
    assert all(not m._forward_pre_hooks for m in bn_net.modules())
    assert len(calls) == 2


def test_progress_counts_images(bn_net: nn.Module) -> None:
    seen: list[tuple[str, int, int]] = []
    bn_sensitivity(
        bn_net, in_distribution(7, seed=5), batch_size=3, on_progress=lambda *a: seen.append(a)
    )
    assert seen == [("filter:distribution", 3, 7), ("filter:distribution", 7, 7)]


def test_has_batchnorm(bn_net: nn.Module, plain_mlp: nn.Module, tiny_vit: nn.Module) -> None:
    assert has_batchnorm(bn_net)
    assert not has_batchnorm(plain_mlp)
    assert not has_batchnorm(tiny_vit)
    assert not has_batchnorm(nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)))


def test_errors(bn_net: nn.Module, plain_mlp: nn.Module) -> None:
    images = in_distribution(4, seed=6)
    with pytest.raises(ValueError, match="BatchNorm"):
        bn_sensitivity(plain_mlp, images)
    with pytest.raises(ValueError, match="at least 2 images"):
        bn_sensitivity(bn_net, images[:1])
    with pytest.raises(ValueError, match="batch_size"):
        bn_sensitivity(bn_net, images, batch_size=1)
    with pytest.raises(ValueError, match="images"):
        bn_sensitivity(bn_net, images[0])
    with pytest.raises(ValueError, match="BatchNorm"):
        bn_distance(plain_mlp, images)
    with pytest.raises(ValueError, match="batch_size"):
        bn_distance(bn_net, images, batch_size=0)
    with pytest.raises(ValueError, match="images"):
        bn_distance(bn_net, images[0])
