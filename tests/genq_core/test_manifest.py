from __future__ import annotations

import json
from pathlib import Path

import pytest

from genq_core.manifest import ManifestRecord, read_manifest, write_manifest
from genq_core.storage import LocalStorage


def _record(index: int, **changes: object) -> ManifestRecord:
    values: dict = {
        "index": index,
        "class_index": index % 3,
        "class_name": ["T-shirt/top", "ankle boot", "Käfer"][index % 3],
        "prompt": f"a photo of a thing {index}",
        "seed": 2**62 + index,
        "key": f"jobs/1/images/{index % 3:04d}/{index:06d}.png",
    }
    values.update(changes)
    return ManifestRecord(**values)


def test_round_trip(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    records = [
        _record(0),
        _record(1, scores={"energy": -3.5, "distribution": 0.25}, kept={"energy": True}),
        _record(2, scores={"energy": 1.0}, kept={"energy": False}, kept_final=False),
        _record(3, kept_final=True),
    ]
    write_manifest(store, "jobs/1/manifest.jsonl", records)

    text = store.get_bytes("jobs/1/manifest.jsonl").decode("utf-8")
    assert len(text.splitlines()) == 4
    assert json.loads(text.splitlines()[1])["scores"] == {"energy": -3.5, "distribution": 0.25}
    assert read_manifest(store, "jobs/1/manifest.jsonl") == records


def test_blank_lines_are_skipped_and_int_scores_become_floats(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    line = json.dumps(_record(5, scores={"clip": 1}).to_dict())
    store.put_bytes("m.jsonl", f"\n{line}\n\n".encode())
    [record] = read_manifest(store, "m.jsonl")
    assert record.scores == {"clip": 1.0}
    assert isinstance(record.scores["clip"], float)


def test_empty_manifest_round_trips(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    write_manifest(store, "m.jsonl", [])
    assert read_manifest(store, "m.jsonl") == []


def test_missing_manifest_raises_key_error(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="nope.jsonl"):
        read_manifest(LocalStorage(tmp_path), "nope.jsonl")


def _bad_line(**changes: object) -> str:
    data = _record(1).to_dict()
    for name, value in changes.items():
        if value is _DROP:
            del data[name]
        else:
            data[name] = value
    return json.dumps(data)


_DROP = object()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2: not valid JSON"),
        ("[1, 2]", "line 2: expected a JSON object"),
        (_bad_line(extra=1), r"line 2: unknown fields \['extra'\]"),
        (_bad_line(seed=_DROP), r"line 2: missing fields \['seed'\]"),
        (_bad_line(index="3"), "line 2: index must be an integer"),
        (_bad_line(class_index=True), "line 2: class_index must be an integer"),
        (_bad_line(prompt=None), "line 2: prompt must be a string"),
        (_bad_line(scores={"energy": "low"}), "line 2: scores must be"),
        (_bad_line(scores=[1.0]), "line 2: scores must be"),
        (_bad_line(kept={"energy": 1}), "line 2: kept must be"),
        (_bad_line(kept_final="yes"), "line 2: kept_final must be"),
    ],
)
def test_malformed_lines_are_named(tmp_path: Path, line: str, message: str) -> None:
    store = LocalStorage(tmp_path)
    good = json.dumps(_record(0).to_dict())
    store.put_bytes("m.jsonl", f"{good}\n{line}\n".encode())
    with pytest.raises(ValueError, match=f"manifest m.jsonl {message}"):
        read_manifest(store, "m.jsonl")


def test_non_utf8_manifest_is_a_value_error(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put_bytes("m.jsonl", b"\xff\xfe")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_manifest(store, "m.jsonl")
