from __future__ import annotations

import os
from pathlib import Path

import pytest

import genq_core.storage as storage_module
from genq_core.storage import LocalStorage, check_key

BAD_KEYS = ["", "/abs/key", "a/../b", "..", "../outside", "a//b", "a/./b", "a/", "a\\b"]


def test_round_trip_list_and_delete(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "root")
    store.put_bytes("jobs/1/b.png", b"png", "image/png")
    store.put_bytes("jobs/1/a.txt", b"hello")
    store.put_bytes("jobs/10/c", b"")
    store.put_bytes("top", b"x")

    assert store.get_bytes("jobs/1/a.txt") == b"hello"
    assert store.get_bytes("jobs/10/c") == b""
    assert store.exists("jobs/1/b.png")
    assert not store.exists("jobs/1")  # a folder is not an object
    assert store.list() == ["jobs/1/a.txt", "jobs/1/b.png", "jobs/10/c", "top"]
    assert store.list("jobs/1/") == ["jobs/1/a.txt", "jobs/1/b.png"]
    # a plain string prefix, like S3
    assert store.list("jobs/1") == ["jobs/1/a.txt", "jobs/1/b.png", "jobs/10/c"]
    assert store.list("jobs/1/a") == ["jobs/1/a.txt"]
    assert store.list("nothing/here/") == []

    store.put_bytes("jobs/1/a.txt", b"replaced")
    assert store.get_bytes("jobs/1/a.txt") == b"replaced"
    store.delete("jobs/1/a.txt")
    store.delete("jobs/1/a.txt")  # deleting a missing key is fine
    assert not store.exists("jobs/1/a.txt")
    assert store.list("jobs/") == ["jobs/1/b.png", "jobs/10/c"]


def test_missing_key_raises_key_error_naming_it(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    with pytest.raises(KeyError, match="jobs/7/manifest.jsonl"):
        store.get_bytes("jobs/7/manifest.jsonl")
    store.put_bytes("jobs/7/x", b"1")
    with pytest.raises(KeyError, match="jobs/7"):
        store.get_bytes("jobs/7")  # a folder


@pytest.mark.parametrize("key", BAD_KEYS)
def test_unsafe_keys_are_rejected(tmp_path: Path, key: str) -> None:
    store = LocalStorage(tmp_path / "root")
    for call in (
        lambda: store.put_bytes(key, b"x"),
        lambda: store.get_bytes(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
    ):
        with pytest.raises(ValueError, match="storage key"):
            call()
    assert not any(tmp_path.glob("*/**/*")), "nothing may be written for a bad key"


def test_check_key_accepts_ordinary_keys() -> None:
    for key in ("a", "jobs/1/images/0003/000017.png", "a..b/c.d", ".hidden/x"):
        check_key(key)


def test_list_rejects_escaping_prefixes(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    for prefix in ("/etc", "../", "a/../.."):
        with pytest.raises(ValueError, match="prefix"):
            store.list(prefix)


def test_symlink_out_of_the_root_is_rejected(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    store = LocalStorage(tmp_path / "root")
    (tmp_path / "root" / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="outside"):
        store.get_bytes("link/secret")
    with pytest.raises(ValueError, match="outside"):
        store.put_bytes("link/new", b"x")
    assert not (outside / "new").exists()


def test_failed_write_keeps_the_old_object_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStorage(tmp_path)
    store.put_bytes("a/obj", b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(storage_module.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store.put_bytes("a/obj", b"new")
    monkeypatch.undo()

    assert store.get_bytes("a/obj") == b"old"
    assert sorted(os.listdir(tmp_path / "a")) == ["obj"]


def test_writes_leave_no_temp_files_and_list_hides_stray_ones(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    for i in range(3):
        store.put_bytes(f"d/{i}", bytes([i]) * 10)
    assert sorted(os.listdir(tmp_path / "d")) == ["0", "1", "2"]
    (tmp_path / "d" / ".2.abc.genq-tmp").write_bytes(b"half")  # left by a killed writer
    assert store.list() == ["d/0", "d/1", "d/2"]
    with pytest.raises(ValueError, match="reserved"):
        store.put_bytes("d/x.genq-tmp", b"")


def test_a_key_cannot_be_both_object_and_folder(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put_bytes("a", b"1")
    with pytest.raises(ValueError, match="below an existing object"):
        store.put_bytes("a/b", b"2")
    store.put_bytes("c/d", b"3")
    with pytest.raises(ValueError, match="folder"):
        store.put_bytes("c", b"4")
    with pytest.raises(ValueError, match="folder"):
        store.delete("c")
    assert store.list() == ["a", "c/d"]
