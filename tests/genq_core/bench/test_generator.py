"""Tests for genq_core.bench.generator: the benchmark's small Stable Diffusion and its training.

Everything runs at tiny sizes on a synthetic Fashion-MNIST-shaped data set (IDX files written to a
temp dir), a handful of steps each.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gzip
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline

from genq_core.bench import fashion_mnist as fm
from genq_core.bench import generator as gen
from genq_core.bench.classifiers import BNConvNet
from genq_core.generate.pipeline import load_generator
from genq_core.generate.prompts import DEFAULT_ADJECTIVES, DEFAULT_TEMPLATES, build_specs

PER_CLASS = 28  # 20 go to the k-shot pool, 4 to the classifier part, 4 to the generator part

TINY = gen.GeneratorTrainConfig(
    vae_channels=(8, 8, 16),
    norm_num_groups=4,
    vae_batch_size=8,
    vae_steps=4,
    text_hidden_size=16,
    text_layers=1,
    text_heads=2,
    unet_channels=(16, 32),
    unet_layers_per_block=1,
    unet_attention_heads=2,
    unet_batch_size=8,
    unet_steps=4,
    warmup_steps=2,
    checkpoint_every=2,
    log_every=2,
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny convolutions run much faster on one intra-op thread on a busy CPU."""
    with _one_thread():
        yield


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic IDX files: a class-dependent bright bar plus noise, ``PER_CLASS`` per class."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10, dtype=np.uint8), PER_CLASS)
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(labels.size, 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, 2 + 2 * label : 5 + 2 * label, 4:24] = 230
    for prefix, array in (("train-images-idx3", images), ("train-labels-idx1", labels)):
        (root / f"{prefix}-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(array)))
    return root


@pytest.fixture(scope="module")
def data(fmnist_root: Path) -> gen.GeneratorData:
    return gen.load_generator_data(fmnist_root)


@pytest.fixture(scope="module")
def trained(
    data: gen.GeneratorData, tmp_path_factory: pytest.TempPathFactory
) -> tuple[StableDiffusionPipeline, Path]:
    """A tiny pipeline trained for a few steps of each stage, and its work dir."""
    work = tmp_path_factory.mktemp("work")
    with _one_thread():
        vae, _ = gen.train_vae(data, TINY, work)
        pipe, _ = gen.train_unet_and_text_encoder(vae, data, TINY, work)
    return pipe, work


def test_captions_use_class_names_and_match_generation_prompts() -> None:
    config = gen.GeneratorTrainConfig()
    for name in fm.CLASS_NAMES:
        captions = gen.training_captions(name, config)
        assert captions and all(name in caption for caption in captions)
        assert len(set(captions)) == len(captions)
    # what generation asks for is among what training showed
    specs = build_specs(fm.CLASS_NAMES, 20, DEFAULT_TEMPLATES, DEFAULT_ADJECTIVES, seed=3)
    for spec in specs:
        assert spec.prompt in gen.training_captions(spec.class_name, config)

    ids, empty = gen._caption_ids(gen.build_tokenizer(config), config)
    assert ids.shape[0] == 10 and ids.shape[2] == empty.shape[0] == config.max_length
    assert not torch.equal(ids[0, 0], empty)
    with pytest.raises(ValueError, match="max_length: caption 'a photo of"):
        short = dataclasses.replace(config, max_length=6)
        gen._caption_ids(gen.build_tokenizer(short), short)


def test_only_the_generator_part_is_loaded(
    fmnist_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []
    load_split = fm.load_split

    def spy(split: str, root: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        asked.append(split)
        return load_split(split, root)  # type: ignore[arg-type]

    monkeypatch.setattr(gen, "load_split", spy)
    data = gen.load_generator_data(fmnist_root)
    assert asked == ["train"]  # never the test set

    images, labels = fm.load_split("train", fmnist_root)
    split = fm.split_train_indices(labels, seed=0)
    assert torch.equal(data.indices, split.generator)
    assert torch.equal(data.images, images[split.generator])
    assert torch.equal(data.labels, labels[split.generator])
    assert not torch.isin(data.indices, torch.cat([split.classifier, split.kshot])).any()

    small = data.subset(2)
    assert len(small.labels) == 20 and torch.isin(small.indices, split.generator).all()
    with pytest.raises(ValueError, match="generator part"):
        gen.GeneratorData(
            images[split.classifier], labels[split.classifier], split.classifier, split=split
        )
    mixed = torch.cat([split.generator[:3], split.kshot[:1]])
    with pytest.raises(ValueError, match="generator part"):
        gen.GeneratorData(images[mixed], labels[mixed], mixed, split=split)
    with pytest.raises(ValueError, match="GeneratorData"):
        gen.train_vae((images, labels), TINY, Path("unused"))  # type: ignore[arg-type]


def test_prepare_images_and_classifier_view_invert_each_other() -> None:
    images = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    x = gen.prepare_images(images)
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[:, 0], x[:, 2])
    assert (x[:, :, :2] == -1).all() and (x[:, :, :, -2:] == -1).all()  # background border

    inputs, gray = gen.to_classifier_input((x + 1) / 2)
    assert inputs.shape == (3, 1, 28, 28) and gray.shape == (3, 32, 32)
    assert torch.equal(gray[:, 2:30, 2:30], images)
    expected = fm.normalize(fm.to_float_images(images))
    torch.testing.assert_close(inputs, expected)


def test_config_checks_and_round_trip() -> None:
    assert gen.GeneratorTrainConfig.from_dict(TINY.to_dict()) == TINY
    assert TINY.image_size == 32 and TINY.latent_size == 8
    cases: list[tuple[dict[str, Any], str]] = [
        ({"vae_channels": (32, 48, 128)}, "vae_channels"),
        ({"pad": 1}, "pad"),
        ({"caption_dropout": 1.0}, "caption_dropout"),
        ({"templates": ("a {token} {cls}",)}, "templates"),
        ({"unet_minutes": 0}, "unet_minutes"),
        ({"vae_steps": 0}, "vae_steps"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(gen.GeneratorTrainConfig(), **bad)


def test_trained_pipeline_round_trips_and_generates(
    trained: tuple[StableDiffusionPipeline, Path], tmp_path: Path
) -> None:
    pipe, work = trained
    scaling = pipe.vae.config["scaling_factor"]
    assert scaling != 1.0 and 0 < scaling < 1e3
    for name in ("vae_loss.csv", "unet_loss.csv"):
        rows = list(csv.reader((work / name).open()))
        assert [row[0] for row in rows] == ["step", "2", "4"]

    pipe.save_pretrained(tmp_path / "sd")
    loaded = load_generator(tmp_path / "sd", scheduler="default")
    assert isinstance(loaded, StableDiffusionPipeline)
    assert loaded.vae.config["scaling_factor"] == pytest.approx(scaling)
    assert loaded.scheduler.config["steps_offset"] == 1
    assert len(loaded.tokenizer) == 49408 and loaded.tokenizer.model_max_length == 16

    def image(p: StableDiffusionPipeline) -> torch.Tensor:
        out = p(
            "a photo of a bag",
            num_inference_steps=2,
            guidance_scale=5.0,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        )
        return torch.as_tensor(out.images)

    first = image(loaded)
    assert first.shape == (1, 3, 32, 32)
    torch.testing.assert_close(first, image(pipe), atol=1e-5, rtol=0)

    classifier = BNConvNet()
    agreement = gen.measure_agreement(
        loaded, classifier, num_per_class=2, steps=2, guidance_scale=5.0, batch_size=7
    )
    assert 0 <= agreement.overall <= 1 and list(agreement.per_class) == list(fm.CLASS_NAMES)
    assert agreement.images.shape == (20, 32, 32) and agreement.labels.tolist()[:3] == [0, 0, 1]
    assert sum(map(sum, agreement.confusion)) == 20
    assert classifier.training  # mode restored


def test_resume_continues_the_step_count_and_the_same_run(
    data: gen.GeneratorData, tmp_path: Path
) -> None:
    straight, result = gen.train_vae(data, dataclasses.replace(TINY, vae_steps=6), tmp_path / "a")
    assert (result.steps, result.stopped_by) == (6, "steps")

    calls: list[tuple[str, int, int]] = []

    def stop_after_three() -> bool:
        return len(calls) >= 3

    with pytest.raises(gen.GeneratorTrainingCanceled, match="step 3"):
        gen.train_vae(
            data,
            dataclasses.replace(TINY, vae_steps=6),
            tmp_path / "b",
            on_progress=lambda stage, done, total: calls.append((stage, done, total)),
            should_stop=stop_after_three,
        )
    assert calls == [("train_vae", i, 6) for i in (1, 2, 3)]
    with (tmp_path / "b" / "vae_loss.csv").open("a") as log:
        log.write("4,0.1")  # a line cut off when the run was killed
    resumed, result = gen.train_vae(
        data, dataclasses.replace(TINY, vae_steps=6), tmp_path / "b", resume=True
    )
    assert result.steps == 6
    rows = list(csv.reader((tmp_path / "b" / "vae_loss.csv").open()))
    assert [row[0] for row in rows] == ["step", "2", "4", "6"]
    for name, tensor in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, msg=name)

    # a finished stage resumes to itself; a bigger budget continues it
    _, again = gen.train_vae(data, TINY, tmp_path / "a", resume=True)
    assert again.steps == 6
    with pytest.raises(ValueError, match="vae_lr"):
        gen.train_vae(data, dataclasses.replace(TINY, vae_lr=1e-4), tmp_path / "a", resume=True)

    # the UNet stage: 2 steps, then resumed to 4
    vae = straight
    _, first = gen.train_unet_and_text_encoder(
        vae, data, dataclasses.replace(TINY, unet_steps=2), tmp_path / "a"
    )
    _, second = gen.train_unet_and_text_encoder(vae, data, TINY, tmp_path / "a", resume=True)
    assert (first.steps, second.steps) == (2, 4)
    assert second.seconds >= first.seconds


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


LOOKS = ("dark", "", "bright")


def test_image_looks_split_each_class_by_garment_intensity() -> None:
    images = torch.zeros(7, 28, 28, dtype=torch.uint8)
    brightness = [90, 250, 30, 160, 200, 120, 60]
    for i, value in enumerate(brightness):
        images[i, 10:18, 10:18] = value
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    looks = gen.image_looks(images, labels, 3)
    # class 0: 30 < 90 < 250; class 1: 60 < 120 < 160 < 200 (4 images in 3 parts)
    assert looks.tolist() == [1, 2, 0, 1, 2, 0, 0]
    assert torch.equal(gen.image_looks(images, labels, 1), torch.zeros(7, dtype=torch.int64))
    with pytest.raises(ValueError, match="num_looks"):
        gen.image_looks(images, labels, 0)
    with pytest.raises(ValueError, match="labels"):
        gen.image_looks(images, labels[:3], 3)


def test_look_captions_put_each_image_look_in_the_adjective() -> None:
    config = gen.GeneratorTrainConfig(look_words=LOOKS)
    dark = gen.training_captions("coat", config, "dark")
    assert len(dark) == len(config.templates)
    assert dark[0] == "a photo of a dark coat" and "a close-up photo of a coat" in dark
    assert gen.training_captions("coat", config, "")[0] == "a photo of a coat"
    assert all(
        "bright" not in c and "dark" not in c for c in gen.training_captions("coat", config, "")
    )
    with pytest.raises(ValueError, match="look must be one of"):
        gen.training_captions("coat", config, "small")

    # rows are (class, look): row 3 * c + l
    ids, _ = gen._caption_ids(gen.build_tokenizer(config), config)
    assert ids.shape[:2] == (30, len(config.templates))
    tokenizer = gen.build_tokenizer(config)
    assert tokenizer.decode(ids[3 * 4 + 0, 0], skip_special_tokens=True) == "a photo of a dark coat"
    assert (
        tokenizer.decode(ids[3 * 4 + 2, 0], skip_special_tokens=True) == "a photo of a bright coat"
    )
    # without look words: one row per class, as before
    assert gen._caption_ids(tokenizer, gen.GeneratorTrainConfig())[0].shape[0] == 10

    for bad in (("dark",), ("dark", "dark"), ("", ""), ("{cls}", "")):
        with pytest.raises(ValueError, match="look_words"):
            gen.GeneratorTrainConfig(look_words=bad)
    with pytest.raises(ValueError, match="look_words"):
        gen.GeneratorTrainConfig(look_words=LOOKS, templates=("a photo of a {cls}",))


def test_fine_tune_starts_from_the_initial_pipeline(
    trained: tuple[StableDiffusionPipeline, Path], data: gen.GeneratorData, tmp_path: Path
) -> None:
    pipe, _ = trained
    config = dataclasses.replace(TINY, look_words=LOOKS, unet_steps=1, unet_lr=1e-9, ema_power=None)
    tuned, result = gen.train_unet_and_text_encoder(
        pipe.vae, data, config, tmp_path / "tune", init=pipe
    )
    assert result.steps == 1
    for name in ("unet", "text_encoder"):
        start = getattr(pipe, name).state_dict()
        for key, value in getattr(tuned, name).state_dict().items():
            torch.testing.assert_close(value, start[key], atol=1e-6, rtol=0, msg=key)
    scratch, _ = gen.train_unet_and_text_encoder(pipe.vae, data, config, tmp_path / "scratch")
    assert not torch.equal(
        scratch.unet.conv_in.weight, pipe.unet.conv_in.weight
    )  # without init: fresh weights

    # a resumed fine-tune must start from the same weights
    longer = dataclasses.replace(config, unet_steps=2)
    gen.train_unet_and_text_encoder(
        pipe.vae, data, longer, tmp_path / "tune", resume=True, init=pipe
    )
    with pytest.raises(ValueError, match="initial weights"):
        gen.train_unet_and_text_encoder(
            pipe.vae, data, longer, tmp_path / "tune", resume=True, init=scratch
        )
    wider = dataclasses.replace(config, text_hidden_size=32, text_heads=2)
    with pytest.raises(ValueError, match="init: the unet differs in size"):
        gen.train_unet_and_text_encoder(pipe.vae, data, wider, tmp_path / "wide", init=pipe)
