"""Tests for genq_core.bench.classifiers (models, domain shift, training, evaluation)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from timm.data import resolve_data_config
from timm.models.vision_transformer import VisionTransformer

from genq_core.bench.classifiers import (
    BUILDERS,
    CPU_EVAL_BATCH,
    RESNET_RECIPE,
    SHIFTED_RESNET_RECIPE,
    VIT_RECIPE,
    BasicBlock,
    SmallResNet,
    TrainConfig,
    darken_images,
    evaluate_top1,
    shift_images,
    small_resnet_fmnist,
    to_domain,
    train_classifier,
    vit_fmnist,
)
from genq_core.bench.fashion_mnist import CLASS_NAMES, MEAN, STD
from genq_core.classifier import ClassifierConfig, load
from genq_core.evaluate import output_sqnr
from genq_core.filters.patch import is_vit_like, patch_similarity_entropy
from genq_core.quant import QuantConfig, quantize_model
from genq_core.quant.modules import QuantAttention


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run on one intra-op thread: tiny convs are much faster so on an oversubscribed CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def test_small_resnet_forward_shape_and_size() -> None:
    model = SmallResNet().eval()
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 308_074  # ~1.2 MB of fp32 weights
    assert n_params * 4 < 1_300_000
    assert isinstance(model.layers, torch.nn.Sequential)
    assert len(model.layers) == 3
    assert isinstance(model.fc, torch.nn.Linear)
    assert model.fc.in_features == 128


def test_small_resnet_custom_shape() -> None:
    model = SmallResNet(num_classes=4, in_chans=3, widths=(8, 16, 24)).eval()
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 4)


def test_basic_block_shortcut() -> None:
    same = BasicBlock(8, 8, stride=1)
    assert isinstance(same.shortcut, torch.nn.Identity)
    down = BasicBlock(8, 16, stride=2).eval()
    assert not isinstance(down.shortcut, torch.nn.Identity)
    assert down(torch.randn(1, 8, 28, 28)).shape == (1, 16, 14, 14)


@pytest.mark.usefixtures("one_thread")
def test_train_classifier_learns_and_is_deterministic() -> None:
    images, labels = _two_patterns(n=128)
    config = TrainConfig(epochs=1, batch_size=16, lr=0.1, seed=0)
    progress: list[tuple[int, int]] = []

    def run(record: bool) -> torch.nn.Module:
        torch.manual_seed(123)
        model = SmallResNet(num_classes=2, widths=(8, 8, 8))
        callback = (lambda s, t: progress.append((s, t))) if record else None
        return train_classifier(model, images, labels, config, on_progress=callback)

    first = run(record=True)
    assert not first.training
    assert evaluate_top1(first, images, labels) > 90.0
    held_out_images, held_out_labels = _two_patterns(n=64, seed=1)
    assert evaluate_top1(first, held_out_images, held_out_labels) > 90.0
    assert progress[-1] == (8, 8)
    assert len(progress) == 8

    second = run(record=False)
    state_a, state_b = first.state_dict(), second.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def test_evaluate_top1_restores_mode_and_counts() -> None:
    model = _ConstantModel(cls=1)
    model.train()
    labels = torch.tensor([1, 1, 0, 1])
    assert evaluate_top1(model, torch.zeros(4, 1, 2, 2), labels, batch_size=3) == 75.0
    assert model.training


def test_evaluate_top1_default_batch_on_cpu_covers_every_image() -> None:
    seen: list[int] = []
    model = _ConstantModel(cls=1)
    model.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    n = 2 * CPU_EVAL_BATCH + 5
    labels = torch.zeros(n, dtype=torch.int64)
    labels[:5] = 1
    assert evaluate_top1(model, torch.zeros(n, 1, 2, 2), labels) == pytest.approx(100.0 * 5 / n)
    assert seen == [CPU_EVAL_BATCH, CPU_EVAL_BATCH, 5]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("batch_size", 0),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("momentum", 1.0),
        ("weight_decay", -1e-4),
        ("crop_padding", -1),
        ("label_smoothing", 1.0),
        ("log_every", 0),
        ("optimizer", "adam"),
        ("warmup_fraction", 0.0),
        ("warmup_fraction", 1.0),
        ("max_grad_norm", 0.0),
        ("max_grad_norm", float("inf")),
    ],
)
def test_train_config_rejects_bad_values(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_train_classifier_rejects_bad_inputs() -> None:
    model = SmallResNet(widths=(4, 4, 4))
    with pytest.raises(ValueError, match="shape"):
        train_classifier(model, torch.zeros(4, 28, 28), torch.zeros(4), TrainConfig())
    with pytest.raises(ValueError, match="labels"):
        train_classifier(model, torch.zeros(4, 1, 28, 28), torch.zeros(3), TrainConfig())


def test_train_config_dict_round_trip() -> None:
    for recipe in (RESNET_RECIPE, SHIFTED_RESNET_RECIPE, VIT_RECIPE):
        assert TrainConfig.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"epochs": 1, "lr_peak": 0.1})


def test_vit_fmnist_is_a_small_timm_vit_without_batchnorm() -> None:
    torch.manual_seed(0)
    model = vit_fmnist().eval()
    assert isinstance(model, VisionTransformer)
    assert is_vit_like(model)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 381_610  # ~1.5 MB of fp32 weights
    assert model.patch_embed.num_patches == 49
    assert model.num_prefix_tokens == 1
    with torch.no_grad():
        out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()
    data_config = resolve_data_config({}, model=model)
    assert data_config["input_size"] == (1, 28, 28)
    assert data_config["mean"] == MEAN


def test_patch_entropy_filter_scores_the_vit() -> None:
    torch.manual_seed(0)
    model = vit_fmnist()
    scores = patch_similarity_entropy(model, torch.randn(3, 1, 28, 28))
    assert scores.shape == (3,)
    assert torch.isfinite(scores).all()


def test_builders_registry_and_shapes() -> None:
    assert set(BUILDERS) == {"small_resnet_fmnist", "vit_fmnist"}
    resnet = small_resnet_fmnist(num_classes=4, in_chans=3).eval()
    assert isinstance(resnet, SmallResNet)
    assert resnet(torch.randn(2, 3, 28, 28)).shape == (2, 4)
    assert resolve_data_config({}, model=resnet)["std"] == STD * 3
    vit = vit_fmnist(num_classes=4, in_chans=3).eval()
    assert vit(torch.randn(2, 3, 28, 28)).shape == (2, 4)


@pytest.mark.parametrize("builder", ["small_resnet_fmnist", "vit_fmnist"])
def test_builder_path_loads_through_the_classifier_registry(builder: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = BUILDERS[builder]().eval()
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    loaded = load(
        ClassifierConfig(
            source="weights",
            name=f"genq_core.bench.classifiers:{builder}",
            weights=weights,
            class_names=CLASS_NAMES,
        )
    )
    assert loaded.preprocessing.input_size == (1, 28, 28)
    assert loaded.preprocessing.mean == MEAN
    assert loaded.preprocessing.std == STD
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))


def test_shift_images_is_deterministic_and_changes_images() -> None:
    images = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    first = shift_images(images)
    assert first.shape == images.shape
    assert first.dtype == images.dtype
    assert torch.equal(first, shift_images(images.clone()))
    assert torch.equal(first[2:3], shift_images(images[2:3]))  # independent of the batch
    assert float(first.min()) >= 0.0
    assert float(first.max()) <= 1.0
    assert (first - images).abs().mean() > 0.2
    # the black background becomes white
    assert torch.equal(shift_images(torch.zeros(2, 1, 28, 28)), torch.ones(2, 1, 28, 28))


def test_shift_images_rotates_counter_clockwise_and_shrinks() -> None:
    dot = torch.zeros(1, 1, 28, 28)
    dot[0, 0, 13:15, 20:22] = 1.0  # right of the centre (13.5, 13.5)
    darkest = 1.0 - shift_images(dot)[0, 0]
    row, col = (darkest == darkest.max()).nonzero().float().mean(0).tolist()
    # 7 px right of the centre -> 0.8 * 7 px at 30 degrees counter-clockwise (up and right)
    assert row == pytest.approx(13.5 - 5.6 * math.sin(math.radians(30)), abs=1.0)
    assert col == pytest.approx(13.5 + 5.6 * math.cos(math.radians(30)), abs=1.0)


def test_shift_images_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="float"):
        shift_images(torch.zeros(1, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="shape"):
        shift_images(torch.zeros(28, 28))
    with pytest.raises(ValueError, match="square"):
        shift_images(torch.zeros(1, 1, 28, 20))


def test_darken_images_squares_mid_tones_and_keeps_black_and_white() -> None:
    images = torch.tensor([0.0, 0.5, 0.8, 1.0]).reshape(1, 1, 2, 2)
    dark = darken_images(images)
    torch.testing.assert_close(dark.flatten(), torch.tensor([0.0, 0.25, 0.64, 1.0]))
    assert torch.equal(dark[0:1], darken_images(images.clone())[0:1])
    with pytest.raises(ValueError, match="float"):
        darken_images(torch.zeros(1, 1, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="shape"):
        darken_images(torch.zeros(2, 2))


def test_to_domain_names_each_benchmark_domain() -> None:
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    assert to_domain(images, "original") is images
    assert torch.equal(to_domain(images, "shifted"), shift_images(images))
    assert torch.equal(to_domain(images, "dark"), darken_images(images))
    with pytest.raises(
        ValueError, match=r"domain must be one of \['dark', 'original', 'shifted'\]"
    ):
        to_domain(images, "rotated")


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    ("builder", "recipe", "domain"),
    [
        ("small_resnet_fmnist", RESNET_RECIPE, "original"),
        ("vit_fmnist", VIT_RECIPE, "original"),
        ("small_resnet_fmnist", SHIFTED_RESNET_RECIPE, "shifted"),
        ("small_resnet_fmnist", RESNET_RECIPE, "dark"),
    ],
    ids=["resnet", "vit", "resnet_shifted", "resnet_dark"],
)
def test_one_step_of_each_benchmark_recipe(builder: str, recipe: TrainConfig, domain: str) -> None:
    pixels = to_domain(torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0)), domain)
    images = (pixels - MEAN[0]) / STD[0]
    labels = torch.arange(8) % 10
    config = dataclasses.replace(recipe, epochs=1, batch_size=8)

    def run() -> torch.nn.Module:
        torch.manual_seed(0)
        return train_classifier(BUILDERS[builder](), images, labels, config)

    torch.manual_seed(0)
    initial = BUILDERS[builder]().state_dict()
    trained = run()
    assert not trained.training
    state = trained.state_dict()
    assert any(not torch.equal(initial[k], state[k]) for k in state)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    again = run().state_dict()
    assert all(torch.equal(state[k], again[k]) for k in state)


def test_quantize_vit_w8a8_minmax() -> None:
    torch.manual_seed(0)
    model = vit_fmnist().eval()
    images = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    config = QuantConfig(preset="minmax", weight_bits=8, act_bits=8)
    qmodel = quantize_model(model, config, images)
    assert sum(isinstance(m, QuantAttention) for m in qmodel.modules()) == 5
    assert not any(isinstance(m, QuantAttention) for m in model.modules())  # caller's model kept
    assert output_sqnr(model, qmodel, images) > 20.0


class _ConstantModel(torch.nn.Module):
    """Always predicts class ``cls`` out of 2, for float [N, ...] input."""

    def __init__(self, cls: int) -> None:
        super().__init__()
        self.cls = cls
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 2)
        logits[:, self.cls] = 1.0
        return logits


def _two_patterns(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy images [n, 1, 28, 28] of two textures: horizontal vs vertical stripes.

    Texture survives global average pooling, the 2px crop and the horizontal flip.
    Labels int64 [n] alternate 0, 1, 0, ...
    """
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    stripes = (torch.arange(28) // 2 % 2).to(torch.float32) * 2.0 - 1.0  # [28] of +-1
    horizontal = stripes.view(28, 1).expand(28, 28)
    vertical = stripes.view(1, 28).expand(28, 28)
    images = 0.5 * torch.randn(n, 1, 28, 28, generator=gen)
    images[labels == 0, 0] += horizontal
    images[labels == 1, 0] += vertical
    return images, labels
