from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
from PIL import Image

from genq_core.data import Preprocessing
from genq_core.generate.generate import (
    GenerationCanceled,
    GenerationConfig,
    generate_images,
    load_images,
    regenerate,
)
from genq_core.generate.prompts import ImageSpec, build_specs
from genq_core.manifest import ManifestRecord, read_manifest
from genq_core.progress import Canceled
from genq_core.storage import LocalStorage

CLASSES = ["bag", "sandal", "ankle boot"]


def _config(**changes: Any) -> GenerationConfig:
    values: dict[str, Any] = {"num_per_class": 2, "steps": 2, "batch_size": 2}
    values.update(changes)
    return GenerationConfig(**values)


def _specs(config: GenerationConfig, classes: list[str] = CLASSES) -> list[ImageSpec]:
    return build_specs(
        classes, config.num_per_class, config.templates, config.adjectives, config.seed
    )


def _pixels(store: LocalStorage, key: str) -> np.ndarray:
    with Image.open(io.BytesIO(store.get_bytes(key))) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_generate_writes_images_and_manifest(
    tmp_path: Path, tiny_pipe: StableDiffusionPipeline
) -> None:
    config = _config()
    specs = _specs(config)
    store = LocalStorage(tmp_path)
    progress: list[tuple[str, int, int]] = []

    records = generate_images(
        tiny_pipe,
        specs,
        config,
        store,
        "jobs/7/synthetic",
        on_progress=lambda *args: progress.append(args),
    )

    assert progress == [("generate", 2, 6), ("generate", 4, 6), ("generate", 6, 6)]
    assert [r.key for r in records] == [
        f"jobs/7/synthetic/images/{s.class_index:04d}/{s.index:06d}.png" for s in specs
    ]
    assert records[5].key == "jobs/7/synthetic/images/0002/000005.png"
    for record, spec in zip(records, specs, strict=True):
        assert (record.index, record.class_index, record.class_name) == (
            spec.index,
            spec.class_index,
            spec.class_name,
        )
        assert (record.prompt, record.seed) == (spec.prompt, spec.seed)
        assert (record.scores, record.kept, record.kept_final) == ({}, {}, None)
        with Image.open(io.BytesIO(store.get_bytes(record.key))) as image:
            assert (image.format, image.size, image.mode) == ("PNG", (16, 16), "RGB")
    assert read_manifest(store, "jobs/7/synthetic/manifest.jsonl") == records
    assert store.list("jobs/7/") == sorted(
        [r.key for r in records] + ["jobs/7/synthetic/manifest.jsonl"]
    )


def test_an_image_does_not_depend_on_its_batch(
    tmp_path: Path, tiny_pipe: StableDiffusionPipeline
) -> None:
    config = _config(batch_size=4)
    specs = _specs(config)
    store = LocalStorage(tmp_path)
    in_fours = generate_images(tiny_pipe, specs, config, store, "fours")
    # other batch size, other order, other neighbours
    alone = generate_images(tiny_pipe, specs[::-1], _config(batch_size=1), store, "ones")
    by_index = {r.index: r for r in alone}
    for record in in_fours:
        diff = np.abs(_pixels(store, record.key) - _pixels(store, by_index[record.index].key))
        assert diff.max() <= 1  # one grey level at most: float rounding of other batch sizes
    # and different seeds give different images
    assert np.abs(_pixels(store, in_fours[0].key) - _pixels(store, in_fours[1].key)).mean() > 5


def test_regenerate_reproduces_a_stored_image(
    tmp_path: Path, tiny_pipe: StableDiffusionPipeline
) -> None:
    config = _config(scheduler="euler", guidance_scale=5.0)
    specs = _specs(config)
    store = LocalStorage(tmp_path)
    records = generate_images(tiny_pipe, specs, config, store, "set")
    assert isinstance(tiny_pipe.scheduler, EulerDiscreteScheduler)

    regenerate(tiny_pipe, specs[0], _config(scheduler="ddim"))  # switches the scheduler away
    again = np.asarray(regenerate(tiny_pipe, specs[3], config), dtype=np.int16)
    assert np.abs(again - _pixels(store, records[3].key)).max() <= 1


def test_resolution_and_negative_prompt(tmp_path: Path, tiny_pipe: StableDiffusionPipeline) -> None:
    config = _config(resolution=32, negative_prompt="blurry", num_per_class=1)
    store = LocalStorage(tmp_path)
    records = generate_images(tiny_pipe, _specs(config, ["bag"]), config, store, "")
    assert records[0].key == "images/0000/000000.png"
    assert store.exists("manifest.jsonl")
    with Image.open(io.BytesIO(store.get_bytes(records[0].key))) as image:
        assert image.size == (32, 32)
    plain = regenerate(tiny_pipe, _specs(config, ["bag"])[0], _config(resolution=32))
    assert np.asarray(plain).tobytes() != _pixels(store, records[0].key).astype(np.uint8).tobytes()


def test_cancel_between_batches_leaves_no_manifest(
    tmp_path: Path, tiny_pipe: StableDiffusionPipeline
) -> None:
    config = _config()
    store = LocalStorage(tmp_path)
    polls = []

    def should_stop() -> bool:
        polls.append(1)
        return len(polls) > 1

    with pytest.raises(GenerationCanceled, match="canceled during generation") as info:
        generate_images(tiny_pipe, _specs(config), config, store, "job", should_stop=should_stop)
    assert isinstance(info.value, Canceled)
    assert len(store.list("job/images/")) == 2  # the first batch only
    assert not store.exists("job/manifest.jsonl")


def test_bad_calls_are_rejected(tmp_path: Path, tiny_pipe: StableDiffusionPipeline) -> None:
    config = _config()
    store = LocalStorage(tmp_path)
    specs = _specs(config)
    with pytest.raises(ValueError, match="nothing to generate"):
        generate_images(tiny_pipe, [], config, store, "p")
    with pytest.raises(ValueError, match="unique"):
        generate_images(tiny_pipe, [specs[0], specs[0]], config, store, "p")
    with pytest.raises(ValueError, match="storage key"):
        generate_images(tiny_pipe, specs, config, store, "../p")
    with pytest.raises(ValueError, match="GenerationConfig"):
        generate_images(tiny_pipe, specs, {"steps": 2}, store, "p")  # type: ignore[arg-type]
    assert store.list() == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_per_class": 0}, "num_per_class: must be an integer >= 1"),
        ({"steps": 2.5}, "steps: must be an integer"),
        ({"batch_size": True}, "batch_size: must be an integer"),
        ({"seed": -1}, "seed: must be an integer >= 0"),
        ({"templates": ["a {cls}"]}, "templates: must be a tuple"),
        ({"templates": ("a photo",)}, "templates: 'a photo' must contain {cls}"),
        ({"adjectives": ()}, "templates: .* adjectives is empty"),
        ({"guidance_scale": -1.0}, "guidance_scale: must be a finite number"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"scheduler": "lms"}, "scheduler: must be one of"),
        ({"resolution": 20}, "resolution: must be a positive multiple of 8"),
        ({"negative_prompt": 3}, "negative_prompt: must be a string"),
    ],
)
def test_config_validation_names_the_field(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**changes)


def test_config_defaults() -> None:
    config = GenerationConfig()
    assert (config.guidance_scale, config.steps, config.scheduler) == (3.5, 25, "ddim")
    assert config.resolution is None and config.negative_prompt is None
    assert GenerationConfig(guidance_scale=0).guidance_scale == 0  # SD-Turbo


def test_load_images_applies_the_classifier_preprocessing(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    specs = _specs(_config(), ["bag"])
    records = []
    colours = [(255, 0, 0), (0, 0, 255)]
    for spec, colour in zip(specs, colours, strict=True):
        key = f"p/{spec.index}.png"
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), colour).save(buffer, format="PNG")
        store.put_bytes(key, buffer.getvalue())
        records.append(_record(spec, key))

    rgb = Preprocessing(input_size=(3, 8, 8), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    images = load_images(store, records, rgb)
    assert images.shape == (2, 3, 8, 8) and images.dtype == torch.float32
    torch.testing.assert_close(images[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    torch.testing.assert_close(images[1, :, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))

    gray = Preprocessing(input_size=(1, 12, 12), mean=(0.0,), std=(1.0,))
    images = load_images(store, records, gray)
    assert images.shape == (2, 1, 12, 12)
    # PIL's luma: L = 0.299 R + 0.587 G + 0.114 B
    torch.testing.assert_close(images[:, 0, 0, 0], torch.tensor([76 / 255, 29 / 255]))

    assert load_images(store, [], gray).shape == (0, 1, 12, 12)


def test_load_images_names_a_bad_object(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    spec = _specs(_config(), ["bag"])[0]
    store.put_bytes("p/broken.png", b"not a png")
    preprocessing = Preprocessing(input_size=(3, 8, 8), mean=(0.0,) * 3, std=(1.0,) * 3)
    with pytest.raises(ValueError, match="p/broken.png is not a readable image"):
        load_images(store, [_record(spec, "p/broken.png")], preprocessing)
    with pytest.raises(KeyError, match="p/missing.png"):
        load_images(store, [_record(spec, "p/missing.png")], preprocessing)


def _record(spec: ImageSpec, key: str) -> ManifestRecord:
    return ManifestRecord(
        index=spec.index,
        class_index=spec.class_index,
        class_name=spec.class_name,
        prompt=spec.prompt,
        seed=spec.seed,
        key=key,
    )
