"""Generation shards: a job's synthetic set cut into independent pieces (class ranges x image ranges).

Image ``j`` of class ``c`` has a prompt and a seed that depend only on ``(seed, c, j)``
(``genq_core.generate.prompts``), and its key is ``synthetic/images/{c:04d}/{index:06d}.png``
whatever else is generated. So a shard can run anywhere, at any time, in any order, and the
shards together make exactly the images that one unsharded run makes. A shard is the unit of:

- resuming: each finished shard has its own manifest and checkpoint, so a retried attempt
  regenerates only the shards it had not finished;
- spreading: the next step hands shards of one job to several actors (several GPUs).

Layout under the job's prefix (data bucket): ``checkpoints/generating/plan.json`` (the shards,
fixed by the first attempt, so a later one with another ``shard_images`` setting agrees),
``checkpoints/generating/shard-NNNNN.jsonl`` (the shard's manifest) and
``checkpoints/generating/shard-NNNNN.json`` (written last: the shard is done).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from genq_core.generate import GenerationConfig, ImageSpec, generate_images
from genq_core.manifest import ManifestRecord, read_manifest
from genq_core.pipeline import SYNTHETIC_PREFIX, json_bytes
from genq_core.progress import ProgressFn, StopFn
from genq_core.storage import Storage
from services.common.keys import CHECKPOINT_PREFIX

__all__ = [
    "PLAN_KEY",
    "Shard",
    "ShardResult",
    "gather_records",
    "generate_shard",
    "load_or_plan",
    "plan_shards",
    "read_shard",
]

_FOLDER = f"{CHECKPOINT_PREFIX}/generating"
PLAN_KEY = f"{_FOLDER}/plan.json"


@dataclass(frozen=True)
class Shard:
    """Images ``j`` in ``[image_start, image_stop)`` of classes ``[class_start, class_stop)``."""

    index: int
    class_start: int
    class_stop: int
    image_start: int
    image_stop: int

    @property
    def size(self) -> int:
        return (self.class_stop - self.class_start) * (self.image_stop - self.image_start)

    @property
    def manifest_key(self) -> str:
        return f"{_FOLDER}/shard-{self.index:05d}.jsonl"

    @property
    def done_key(self) -> str:
        return f"{_FOLDER}/shard-{self.index:05d}.json"

    def specs(self, specs: Sequence[ImageSpec], num_per_class: int) -> list[ImageSpec]:
        """This shard's part of the whole set's ``specs`` (from ``build_specs``), in order."""
        return [
            spec
            for spec in specs
            if self.class_start <= spec.class_index < self.class_stop
            and self.image_start <= spec.index - spec.class_index * num_per_class < self.image_stop
        ]


@dataclass(frozen=True)
class ShardResult:
    """A finished shard: its manifest records (index order) and how long it took."""

    shard: Shard
    records: list[ManifestRecord]
    seconds: float


def plan_shards(num_classes: int, num_per_class: int, shard_images: int) -> list[Shard]:
    """Shards of at most ``shard_images`` images (never fewer than one image each).

    Whole classes are grouped while they fit (``shard_images >= num_per_class``); otherwise each
    class is cut into image ranges. Shards are in index order of their images.
    """
    for name, value in [
        ("num_classes", num_classes),
        ("num_per_class", num_per_class),
        ("shard_images", shard_images),
    ]:
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    shards: list[Shard] = []
    if shard_images >= num_per_class:
        per_shard = shard_images // num_per_class
        for start in range(0, num_classes, per_shard):
            stop = min(start + per_shard, num_classes)
            shards.append(Shard(len(shards), start, stop, 0, num_per_class))
        return shards
    for cls in range(num_classes):
        for start in range(0, num_per_class, shard_images):
            stop = min(start + shard_images, num_per_class)
            shards.append(Shard(len(shards), cls, cls + 1, start, stop))
    return shards


def load_or_plan(
    storage: Storage, num_classes: int, num_per_class: int, shard_images: int
) -> list[Shard]:
    """The job's shard plan: the stored one if an earlier attempt made it, else a new one (stored)."""
    try:
        stored = json.loads(storage.get_bytes(PLAN_KEY))
        shards = [Shard(**item) for item in stored["shards"]]
        if sum(shard.size for shard in shards) == num_classes * num_per_class:
            return shards
    except (KeyError, ValueError, TypeError):
        pass  # none yet, or not one of ours: plan again
    shards = plan_shards(num_classes, num_per_class, shard_images)
    storage.put_bytes(
        PLAN_KEY, json_bytes({"shards": [asdict(s) for s in shards]}), "application/json"
    )
    return shards


def generate_shard(
    pipe: Any,
    shard: Shard,
    specs: Sequence[ImageSpec],
    generation: GenerationConfig,
    storage: Storage,
    *,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> ShardResult:
    """Generate one shard's images into ``synthetic/images/`` and mark the shard done.

    Args:
        pipe: the diffusion pipeline (with any learned tokens already added).
        shard: which images.
        specs: the whole set's specs (``genq_core.pipeline.generation_specs``).
        generation: sampling settings.
        storage: the job's storage.
        on_progress: ``on_progress("generate", done, shard.size)`` after each batch.
        should_stop: polled before each batch.
    """
    clock = time.perf_counter()
    records = generate_images(
        pipe,
        shard.specs(specs, generation.num_per_class),
        generation,
        storage,
        SYNTHETIC_PREFIX,
        manifest=shard.manifest_key,
        on_progress=on_progress,
        should_stop=should_stop,
    )
    seconds = time.perf_counter() - clock
    done = {"shard": asdict(shard), "images": len(records), "seconds": seconds}
    storage.put_bytes(shard.done_key, json_bytes(done), "application/json")
    return ShardResult(shard, records, seconds)


def read_shard(storage: Storage, shard: Shard) -> ShardResult | None:
    """A shard an earlier attempt (or another actor) finished, or ``None``."""
    try:
        done = json.loads(storage.get_bytes(shard.done_key))
        if done.get("shard") != asdict(shard):
            return None
        records = read_manifest(storage, shard.manifest_key)
    except (KeyError, ValueError):
        return None
    if len(records) != shard.size:
        return None
    return ShardResult(shard, records, float(done["seconds"]))


def gather_records(results: Sequence[ShardResult]) -> list[ManifestRecord]:
    """Every shard's records, in image index order (the order of an unsharded run)."""
    records = [record for result in results for record in result.records]
    return sorted(records, key=lambda record: record.index)
