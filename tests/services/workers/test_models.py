"""The warm-model LRU: one load per model identity, eviction, private pipelines for inversion."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import torch

from genq_core.pipeline import GeneratorConfig, GenQConfig
from services.workers.models import WarmModels
from services.workers.resolve import BUILTIN_CLASSIFIERS, BUILTIN_GENERATORS
from services.workers.settings import WorkerSettings
from tests.services.workers.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> GenQConfig:
    """The built-in Fashion BN CNN (weights copied, so a test may replace them) and the tiny
    generator (built once in a temporary model cache)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("models")
    settings = WorkerSettings(model_cache_dir=root / "cache")
    classifier = BUILTIN_CLASSIFIERS["fashion-bn-cnn"](REPO_ROOT / "benchmarks" / "assets")
    assert classifier.weights is not None
    weights = root / "weights.safetensors"
    shutil.copy(classifier.weights, weights)
    generator = BUILTIN_GENERATORS["tiny"](settings, True)
    return GenQConfig(
        classifier=dataclasses.replace(classifier, weights=weights),
        generator=GeneratorConfig(source=str(generator)),
        quant=None,
    )


def test_the_same_model_is_loaded_once(config: GenQConfig) -> None:
    models = WarmModels(size=2)
    first = models.classifier(config, None)
    assert models.classifier(config, None) is first
    pipe = models.generator(config, exclusive=False)
    assert models.generator(config, exclusive=False) is pipe
    assert models.stats() == {
        "classifier_loads": 1,
        "generator_loads": 1,
        "classifiers_cached": 1,
        "generators_cached": 1,
    }


def test_least_recently_used_model_is_evicted(config: GenQConfig) -> None:
    models = WarmModels(size=1)
    other = dataclasses.replace(
        config, classifier=dataclasses.replace(config.classifier, class_names=tuple("abcdefghij"))
    )
    first = models.classifier(config, None)
    assert models.classifier(other, None).class_names == list("abcdefghij")
    assert models.classifier(config, None) is not first  # evicted by the other one
    assert models.loads["classifier"] == 3 and models.stats()["classifiers_cached"] == 1


def test_a_replaced_weights_file_is_loaded_again(config: GenQConfig) -> None:
    models = WarmModels(size=2)
    first = models.classifier(config, None)
    weights = config.classifier.weights
    assert weights is not None
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert models.classifier(config, None) is not first
    assert models.loads["classifier"] == 2


def test_an_exclusive_pipeline_is_a_private_copy(config: GenQConfig) -> None:
    models = WarmModels(size=2)
    shared = models.generator(config, exclusive=False)
    vocabulary = len(shared.tokenizer)
    private = models.generator(config, exclusive=True)
    assert private is not shared and models.loads["generator"] == 1  # copied, not loaded
    private.tokenizer.add_tokens(["<genq-style>"])
    private.text_encoder.resize_token_embeddings(len(private.tokenizer))
    assert len(shared.tokenizer) == vocabulary
    assert models.generator(config, exclusive=False) is shared
    # with nothing cached, an exclusive request loads a pipeline and does not keep it
    fresh = WarmModels(size=2)
    assert fresh.generator(config, exclusive=True) is not None
    assert fresh.stats()["generator_loads"] == 1 and fresh.stats()["generators_cached"] == 0


def test_each_job_gets_its_own_scheduler_on_a_shared_pipeline(config: GenQConfig) -> None:
    models = WarmModels(size=2)
    euler = dataclasses.replace(
        config, generation=dataclasses.replace(config.generation, scheduler="euler")
    )
    assert type(models.generator(euler, exclusive=False).scheduler).__name__.startswith("Euler")
    pipe = models.generator(config, exclusive=False)  # the default: ddim
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"


def test_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="size"):
        WarmModels(size=0)


def test_models_are_keyed_by_their_folder(config: GenQConfig, tmp_path: Path) -> None:
    models = WarmModels(size=2)
    pipe = models.generator(config, exclusive=False)
    assert config.generator.source is not None
    copied = shutil.copytree(config.generator.source, tmp_path / "copy")
    moved = dataclasses.replace(config, generator=GeneratorConfig(source=str(copied)))
    assert models.generator(moved, exclusive=False) is not pipe
    assert models.loads["generator"] == 2
