"""Generation shards: a plan covers every image once, and shards make exactly the unsharded images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genq_core.generate import GenerationConfig, build_specs, generate_images
from genq_core.generate.tiny import build_tiny_pipeline
from genq_core.manifest import read_manifest
from genq_core.storage import LocalStorage
from services.workers.shards import (
    gather_records,
    generate_shard,
    load_or_plan,
    plan_shards,
    read_shard,
)

CLASSES = ["coat", "bag", "sandal"]


@pytest.mark.parametrize(
    ("classes", "per_class", "shard_images", "count"),
    [(10, 4, 8, 5), (10, 4, 100, 1), (3, 5, 2, 9), (3, 5, 5, 3), (1, 1, 1, 1), (7, 3, 7, 4)],
)
def test_plan_covers_every_image_once(
    classes: int, per_class: int, shard_images: int, count: int
) -> None:
    shards = plan_shards(classes, per_class, shard_images)
    assert len(shards) == count
    assert [shard.index for shard in shards] == list(range(count))
    assert all(0 < shard.size <= max(shard_images, 1) for shard in shards)
    covered = sorted(
        (c, j)
        for s in shards
        for c in range(s.class_start, s.class_stop)
        for j in range(s.image_start, s.image_stop)
    )
    assert covered == [(c, j) for c in range(classes) for j in range(per_class)]


def test_plan_rejects_empty_sizes() -> None:
    with pytest.raises(ValueError, match="shard_images"):
        plan_shards(3, 4, 0)


def test_a_stored_plan_wins_over_a_new_shard_size(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    first = load_or_plan(storage, 10, 4, 8)
    assert load_or_plan(storage, 10, 4, 100) == first
    # a plan for another set is not reused
    assert len(load_or_plan(storage, 10, 5, 100)) == 1


def test_shards_in_any_order_make_exactly_the_unsharded_images(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    pipe = build_tiny_pipeline(sample_size=16, seed=0)
    generation = GenerationConfig(num_per_class=5, steps=2, batch_size=4, seed=7)
    specs = build_specs(CLASSES, 5, generation.templates, generation.adjectives, generation.seed)
    whole = LocalStorage(tmp_path / "whole")
    records = generate_images(pipe, specs, generation, whole, "synthetic")

    sharded = LocalStorage(tmp_path / "sharded")
    shards = plan_shards(len(CLASSES), 5, 2)  # image ranges cut each class: other batches
    results = [
        generate_shard(pipe, shard, specs, generation, sharded) for shard in reversed(shards)
    ]
    assert [r.to_dict() for r in gather_records(results)] == [r.to_dict() for r in records]
    image_keys = whole.list("synthetic/images/")
    assert image_keys == sharded.list("synthetic/images/") and len(image_keys) == 15
    for key in image_keys:
        assert whole.get_bytes(key) == sharded.get_bytes(key), key
    # each shard has its own manifest and done marker; the set's manifest is not written
    assert not sharded.exists("synthetic/manifest.jsonl")
    for shard in shards:
        done = read_shard(sharded, shard)
        assert done is not None and len(done.records) == shard.size
        assert read_manifest(sharded, shard.manifest_key) == done.records
