"""Stage checkpoints: what a finished stage of a job made, so a retried attempt skips it.

After each stage the runner writes ``checkpoints/{stage}.json`` (under the job's prefix, in the
data bucket) naming the stage's outputs and the small results later stages need (the filter
report, the calibration statistics, the evaluation). Outputs are written first and the checkpoint
last, in one atomic put, so a checkpoint that exists describes outputs that exist. A new attempt
(a new fencing token) reads the checkpoints in stage order and resumes at the first stage that has
none.
"""

from __future__ import annotations

import json
from typing import Any

from genq_core.pipeline import MANIFEST_KEY, json_bytes
from genq_core.storage import Storage
from services.common.jobs import Stage
from services.common.keys import CHECKPOINT_PREFIX

__all__ = [
    "CHECKPOINT_VERSION",
    "checkpoint_key",
    "dataset_is_complete",
    "read_checkpoint",
    "write_checkpoint",
]

CHECKPOINT_VERSION = 1
"""Bumped when the checkpoint layout changes; checkpoints of another version are not trusted."""


def checkpoint_key(stage: Stage) -> str:
    """``checkpoints/{stage}.json``, relative to the job's prefix."""
    return f"{CHECKPOINT_PREFIX}/{Stage(stage).value}.json"


def read_checkpoint(storage: Storage, stage: Stage) -> dict[str, Any] | None:
    """The stage's checkpoint, or ``None`` when the stage has not finished.

    A checkpoint that is unreadable, of another layout version, or whose listed outputs are gone
    (a data bucket that expired them) counts as not finished: the stage runs again.
    """
    try:
        data = json.loads(storage.get_bytes(checkpoint_key(stage)))
    except KeyError:
        return None
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or data.get("version") != CHECKPOINT_VERSION:
        return None
    outputs = data.get("outputs", [])
    if not all(isinstance(key, str) and storage.exists(key) for key in outputs):
        return None
    return data


def write_checkpoint(
    storage: Storage, stage: Stage, outputs: list[str], data: dict[str, Any]
) -> dict[str, Any]:
    """Mark ``stage`` finished: ``outputs`` are the keys it wrote, ``data`` what later stages need.

    Returns:
        the checkpoint as written.
    """
    checkpoint = {"version": CHECKPOINT_VERSION, "stage": Stage(stage).value, "outputs": outputs}
    checkpoint.update(data)
    storage.put_bytes(checkpoint_key(stage), json_bytes(checkpoint), "application/json")
    return checkpoint


def dataset_is_complete(storage: Storage) -> bool:
    """Whether the job in ``storage`` has a finished, filtered synthetic set (its manifest with
    every image's verdict): what a later job may reuse or quantize on."""
    return read_checkpoint(storage, Stage.FILTERING) is not None and storage.exists(MANIFEST_KEY)
