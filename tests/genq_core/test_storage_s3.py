"""S3Storage against a real S3 server: the JuiceFS gateway started by tests.support.s3_server."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from genq_core.configio import from_dict, to_dict
from genq_core.storage_s3 import S3Config, S3Storage, StorageError
from tests.support.imports import loaded_modules
from tests.support.s3_server import S3ServerInfo, s3_server

BUCKET = "genq-test"
BAD_KEYS = ["", "/abs/key", "a/../b", "..", "../outside", "a//b", "a/./b", "a/", "a\\b"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3ServerInfo]:
    with s3_server(tmp_path_factory.mktemp("s3")) as info:
        S3Storage(info.endpoint, info.access_key, info.secret_key, BUCKET).ensure_bucket()
        yield info


@pytest.fixture
def store(server: S3ServerInfo) -> S3Storage:
    """A storage below a prefix of its own, so tests see only their own objects."""
    return _storage(server, prefix=f"tests/{uuid.uuid4().hex}")


def test_round_trip_list_and_delete_under_a_prefix(server: S3ServerInfo) -> None:
    tenant = f"tenants/{uuid.uuid4().hex}"
    store = _storage(server, prefix=tenant)
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
    assert store.list("jobs/1") == ["jobs/1/a.txt", "jobs/1/b.png", "jobs/10/c"]
    assert store.list("jobs/1/a") == ["jobs/1/a.txt"]
    assert store.list("nothing/here/") == []

    # The objects live below the prefix in the bucket, and only there.
    whole_bucket = _storage(server)
    assert whole_bucket.get_bytes(f"{tenant}/jobs/1/a.txt") == b"hello"
    assert _storage(server, prefix=f"{tenant}/jobs/").list() == ["1/a.txt", "1/b.png", "10/c"]
    assert _storage(server, prefix=f"{tenant}x").list() == []

    store.put_bytes("jobs/1/a.txt", b"replaced")
    assert store.get_bytes("jobs/1/a.txt") == b"replaced"
    store.delete("jobs/1/a.txt")
    store.delete("jobs/1/a.txt")  # deleting a missing key is fine
    assert not store.exists("jobs/1/a.txt")
    assert store.list("jobs/") == ["jobs/1/b.png", "jobs/10/c"]


def test_missing_key_raises_key_error_naming_it(store: S3Storage) -> None:
    with pytest.raises(KeyError, match="jobs/7/manifest.jsonl"):
        store.get_bytes("jobs/7/manifest.jsonl")
    with pytest.raises(KeyError, match="jobs/7/manifest.jsonl"):
        store.stat("jobs/7/manifest.jsonl")
    store.put_bytes("jobs/7/x", b"1")
    with pytest.raises(KeyError, match="jobs/7"):
        store.get_bytes("jobs/7")  # a folder


def test_put_file_and_get_file_stream_a_multipart_object(store: S3Storage, tmp_path: Path) -> None:
    data = random.Random(0).randbytes(12 * 1024 * 1024 + 17)
    source = tmp_path / "model.safetensors"
    source.write_bytes(data)

    store.put_file("models/1/model.safetensors", source, "application/octet-stream")
    info = store.stat("models/1/model.safetensors")
    assert info.size == len(data)
    assert info.etag.endswith("-3"), "12 MB in 5 MiB parts is a 3-part multipart upload"

    target = tmp_path / "down" / "model.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"old content")
    store.get_file("models/1/model.safetensors", target)
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert os.listdir(target.parent) == ["model.safetensors"], "no temporary file is left"


def test_get_file_of_a_missing_key_keeps_the_old_file(store: S3Storage, tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(KeyError, match="no/such/object"):
        store.get_file("no/such/object", target)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]
    with pytest.raises(FileNotFoundError):
        store.put_file("x", tmp_path / "missing.bin")


def test_stat_reports_size_etag_type_and_time(store: S3Storage) -> None:
    before = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
    store.put_bytes("images/0001.png", b"\x89PNG fake", "image/png")
    info = store.stat("images/0001.png")
    assert info.key == "images/0001.png"
    assert info.size == 9
    assert info.etag == hashlib.md5(b"\x89PNG fake").hexdigest()
    assert info.content_type == "image/png"
    assert before <= info.last_modified <= datetime.now(UTC) + timedelta(seconds=1)


def test_presigned_get_serves_the_bytes_as_a_named_download(store: S3Storage) -> None:
    store.put_bytes("jobs/3/calib.zip", b"zip bytes", "application/zip")
    url = store.presigned_get_url("jobs/3/calib.zip", timedelta(minutes=5), filename="calib 3.zip")
    response = httpx.get(url)
    assert response.status_code == 200, response.text
    assert response.content == b"zip bytes"
    assert response.headers["content-disposition"] == 'attachment; filename="calib 3.zip"'

    unicode_url = store.presigned_get_url("jobs/3/calib.zip", timedelta(minutes=5), "café.zip")
    disposition = httpx.get(unicode_url).headers["content-disposition"]
    assert disposition == "attachment; filename=\"caf?.zip\"; filename*=UTF-8''caf%C3%A9.zip"

    plain = httpx.get(store.presigned_get_url("jobs/3/calib.zip", timedelta(seconds=60)))
    assert plain.content == b"zip bytes"
    assert httpx.get(url.replace("calib.zip", "other.zip")).status_code == 403  # signed path


def test_presigned_put_uploads_an_object(store: S3Storage) -> None:
    url = store.presigned_put_url("uploads/ckpt.pt", timedelta(minutes=5))
    response = httpx.put(url, content=b"checkpoint", headers={"content-type": "text/plain"})
    assert response.status_code == 200, response.text
    assert store.get_bytes("uploads/ckpt.pt") == b"checkpoint"
    assert store.stat("uploads/ckpt.pt").content_type == "text/plain"


def test_presigned_urls_are_signed_for_the_public_endpoint(server: S3ServerInfo) -> None:
    prefix = f"tests/{uuid.uuid4().hex}"
    public = f"localhost:{server.port}"
    store = _storage(server, prefix=prefix, public_endpoint=public)
    store.put_bytes("a.bin", b"public bytes")

    url = store.presigned_get_url("a.bin", timedelta(minutes=5))
    assert urlsplit(url).netloc == public
    assert httpx.get(url).content == b"public bytes"
    put_url = store.presigned_put_url("b.bin", timedelta(minutes=5))
    assert urlsplit(put_url).netloc == public
    assert httpx.put(put_url, content=b"up").status_code == 200
    assert store.get_bytes("b.bin") == b"up"

    # The Host header is signed: the same URL sent to the internal spelling is refused.
    internal = urlunsplit(urlsplit(url)._replace(netloc=server.endpoint))
    assert httpx.get(internal).status_code == 403

    with_scheme = _storage(server, prefix=prefix, public_endpoint=f"http://{public}")
    assert httpx.get(with_scheme.presigned_get_url("a.bin", timedelta(seconds=30))).is_success


def test_wrong_secret_raises_a_clear_storage_error(server: S3ServerInfo) -> None:
    store = S3Storage(server.endpoint, server.access_key, "not-the-secret", BUCKET)
    for call in (
        store.ping,
        lambda: store.get_bytes("a"),
        lambda: store.put_bytes("a", b"x"),
        lambda: store.list(),
    ):
        with pytest.raises(StorageError, match="refused access") as caught:
            call()
        assert server.endpoint in str(caught.value)
        assert BUCKET in str(caught.value)


def test_unreachable_endpoint_raises_storage_error_quickly() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{sock.getsockname()[1]}"  # nothing listens once closed
    store = S3Storage(endpoint, "key", "secret", BUCKET, connect_timeout=1, max_retries=1)
    started = time.monotonic()
    with pytest.raises(StorageError, match=f"cannot reach S3 endpoint http://{endpoint}") as caught:
        store.ping()
    assert BUCKET in str(caught.value)
    with pytest.raises(StorageError, match="cannot reach"):
        store.get_bytes("a")
    assert time.monotonic() - started < 5


def test_ping_and_ensure_bucket(server: S3ServerInfo) -> None:
    store = _storage(server, bucket=f"fresh-{uuid.uuid4().hex[:12]}")
    with pytest.raises(StorageError, match="does not exist"):
        store.ping()
    with pytest.raises(StorageError, match="does not exist"):
        store.get_bytes("a")
    store.ensure_bucket()
    store.ensure_bucket()  # idempotent
    store.ping()
    assert store.list() == []


@pytest.mark.parametrize("key", BAD_KEYS)
def test_unsafe_keys_are_rejected(store: S3Storage, key: str) -> None:
    for call in (
        lambda: store.put_bytes(key, b"x"),
        lambda: store.get_bytes(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.stat(key),
        lambda: store.presigned_get_url(key, timedelta(minutes=1)),
        lambda: store.presigned_put_url(key, timedelta(minutes=1)),
    ):
        with pytest.raises(ValueError, match="storage key"):
            call()
    assert store.list() == [], "nothing may be written for a bad key"


def test_list_rejects_escaping_prefixes(store: S3Storage) -> None:
    for prefix in ("/etc", "../", "a/../.."):
        with pytest.raises(ValueError, match="prefix"):
            store.list(prefix)


def test_a_key_cannot_be_both_object_and_folder(store: S3Storage) -> None:
    # MinIO and the JuiceFS gateway keep objects as files, like LocalStorage.
    store.put_bytes("a", b"1")
    with pytest.raises(ValueError, match="below an existing object"):
        store.put_bytes("a/b", b"2")
    store.put_bytes("c/d", b"3")
    with pytest.raises(ValueError, match="folder"):
        store.put_bytes("c", b"4")
    assert store.list() == ["a", "c/d"]


def test_presign_arguments_are_checked(store: S3Storage) -> None:
    with pytest.raises(ValueError, match="expires"):
        store.presigned_get_url("a", timedelta(days=8))
    with pytest.raises(ValueError, match="expires"):
        store.presigned_put_url("a", timedelta(0))
    with pytest.raises(ValueError, match="filename"):
        store.presigned_get_url("a", timedelta(minutes=1), filename='x".zip')


def test_config_is_validated_and_round_trips(server: S3ServerInfo) -> None:
    config = S3Config(
        endpoint=server.endpoint,
        access_key=server.access_key,
        secret_key=server.secret_key,
        bucket=BUCKET,
        prefix="tenants/x/",
        public_endpoint="https://files.example.com",
    )
    assert server.secret_key not in repr(config)
    assert from_dict(S3Config, to_dict(config)) == config
    store = S3Storage.from_config(config)
    assert store.config == config
    assert urlsplit(store.presigned_get_url("k", timedelta(seconds=5))).netloc == (
        "files.example.com"
    )
    assert server.secret_key not in repr(store)

    bad_values: dict[str, Any] = {
        "endpoint": "http://minio:9000",
        "bucket": "Bad_Bucket",
        "prefix": "../up",
        "public_endpoint": "https://files.example.com/s3",
        "connect_timeout": 0.0,
        "max_retries": -1,
    }
    for name, value in bad_values.items():
        with pytest.raises(ValueError, match=name.split("_")[0]):
            dataclasses.replace(config, **{name: value})


def test_importing_the_s3_storage_pulls_in_no_torch() -> None:
    assert loaded_modules("import genq_core.storage_s3", ("torch",)) == set()


def test_test_server_says_how_to_install_a_missing_juicefs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"scripts/install\.sh"), s3_server(tmp_path):
        pass


def _storage(
    server: S3ServerInfo,
    prefix: str = "",
    bucket: str = BUCKET,
    public_endpoint: str | None = None,
) -> S3Storage:
    return S3Storage(
        server.endpoint,
        server.access_key,
        server.secret_key,
        bucket,
        prefix=prefix,
        public_endpoint=public_endpoint,
        connect_timeout=2,
        read_timeout=30,
    )
