"""The synthetic dataset's manifest: one JSON line per generated image.

Generation writes a record per image (its class, prompt, seed and storage key); the filters fill
in ``scores`` and ``kept`` per filter and the overall ``kept_final``. The manifest is JSON lines,
one object per line, in the order of the records::

    {"index": 0, "class_index": 0, "class_name": "shirt", "prompt": "a photo of a shirt",
     "seed": 123, "key": "jobs/1/images/0000/000000.png", "scores": {"energy": -4.2},
     "kept": {"energy": true}, "kept_final": null}
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from genq_core.storage import Storage

__all__ = ["MANIFEST_CONTENT_TYPE", "ManifestRecord", "read_manifest", "write_manifest"]

MANIFEST_CONTENT_TYPE = "application/x-ndjson"


@dataclass
class ManifestRecord:
    """One generated image.

    Attributes:
        index: position of the image in the generated set (0-based, unique).
        class_index: the classifier's label of the class it was generated for.
        class_name: that class's name as used in the prompt.
        prompt: the full text prompt.
        seed: seed of the image's own ``torch.Generator``; with the prompt, the generation config
            and the pipeline it reproduces the image.
        key: storage key of the PNG.
        scores: filter name -> the image's score under that filter (only filters that scored it).
        kept: filter name -> whether that filter kept the image.
        kept_final: whether the image survived every filter; ``None`` before filtering.
    """

    index: int
    class_index: int
    class_name: str
    prompt: str
    seed: int
    key: str
    scores: dict[str, float] = field(default_factory=dict)
    kept: dict[str, bool] = field(default_factory=dict)
    kept_final: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (a copy; mutating it does not change the record)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "record") -> ManifestRecord:
        """Inverse of :meth:`to_dict`, type-checked.

        Raises:
            ValueError: unknown or missing fields, or a value of the wrong type; the message
                starts with ``where``.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown fields {unknown}; known fields: {known}")
        required = [f.name for f in dataclasses.fields(cls) if _is_required(f)]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"{where}: missing fields {missing}")
        for name in ("index", "class_index", "seed"):
            _expect(_is_int(data[name]), where, name, "an integer", data[name])
        for name in ("class_name", "prompt", "key"):
            _expect(isinstance(data[name], str), where, name, "a string", data[name])
        scores = data.get("scores", {})
        _expect(
            isinstance(scores, Mapping)
            and all(isinstance(k, str) and _is_number(v) for k, v in scores.items()),
            where,
            "scores",
            "an object of filter name -> number",
            scores,
        )
        kept = data.get("kept", {})
        _expect(
            isinstance(kept, Mapping)
            and all(isinstance(k, str) and isinstance(v, bool) for k, v in kept.items()),
            where,
            "kept",
            "an object of filter name -> true/false",
            kept,
        )
        kept_final = data.get("kept_final")
        _expect(
            kept_final is None or isinstance(kept_final, bool),
            where,
            "kept_final",
            "true, false or null",
            kept_final,
        )
        return cls(
            index=data["index"],
            class_index=data["class_index"],
            class_name=data["class_name"],
            prompt=data["prompt"],
            seed=data["seed"],
            key=data["key"],
            scores={k: float(v) for k, v in scores.items()},
            kept=dict(kept),
            kept_final=kept_final,
        )


def write_manifest(storage: Storage, key: str, records: Iterable[ManifestRecord]) -> None:
    """Write ``records`` as JSON lines to ``key`` (one atomic put)."""
    lines = [json.dumps(record.to_dict(), ensure_ascii=False) + "\n" for record in records]
    storage.put_bytes(key, "".join(lines).encode("utf-8"), MANIFEST_CONTENT_TYPE)


def read_manifest(storage: Storage, key: str) -> list[ManifestRecord]:
    """The records of the manifest at ``key``; blank lines are skipped.

    Raises:
        KeyError: no manifest at ``key``.
        ValueError: a line that is not valid JSON or not a valid record (names the key and the
            1-based line number).
    """
    try:
        text = storage.get_bytes(key).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"manifest {key}: not UTF-8 text: {err}") from err
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"manifest {key} line {number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON: {err}") from err
        records.append(ManifestRecord.from_dict(data, where))
    return records


def _is_required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _expect(ok: bool, where: str, name: str, what: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{where}: {name} must be {what}, got {value!r}")
