"""ApiSettings: hashed API keys, limits from the environment, refusing half-configured starts."""

from __future__ import annotations

import hashlib
import io

import pytest

from services.api.app import create_app
from services.api.settings import ApiSettings, hash_api_key, main
from services.common.settings import MissingSettings
from services.common.spec import Limits


def test_distributed_mode_without_api_keys_refuses_to_start(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GENQ_MODE", "distributed")
    monkeypatch.setenv("GENQ_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("GENQ_S3_ENDPOINT", "127.0.0.1:1")
    monkeypatch.setenv("GENQ_S3_ACCESS_KEY", "a")
    monkeypatch.setenv("GENQ_S3_SECRET_KEY", "b")

    with pytest.raises(MissingSettings) as info:
        create_app(ApiSettings())

    assert info.value.names == ["GENQ_API_KEYS"]
    assert "GENQ_API_KEYS" in str(info.value)


def test_every_missing_setting_is_named(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GENQ_MODE", "distributed")

    with pytest.raises(MissingSettings) as info:
        ApiSettings().check()

    assert info.value.names == [
        "GENQ_REDIS_URL",
        "GENQ_S3_ENDPOINT",
        "GENQ_S3_ACCESS_KEY",
        "GENQ_S3_SECRET_KEY",
        "GENQ_API_KEYS",
    ]


def test_api_keys_are_hashed_entries_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    digest = hashlib.sha256(b"k1").hexdigest()
    assert hash_api_key("k1") == f"sha256:{digest}"
    monkeypatch.setenv("GENQ_API_KEYS", f"sha256:{digest}=acme, {hash_api_key('k2')}=globex")

    settings = ApiSettings()

    assert settings.key_digests() == {digest: "acme", hash_api_key("k2")[7:]: "globex"}
    assert "k1" not in repr(settings)


@pytest.mark.parametrize(
    "entry",
    ["k1=acme", f"{hash_api_key('k')}=bad:tenant", f"sha256:{'0' * 63}=acme", hash_api_key("k")],
)
def test_malformed_key_entries_are_refused(monkeypatch: pytest.MonkeyPatch, entry: str):
    monkeypatch.setenv("GENQ_API_KEYS", entry)

    with pytest.raises(ValueError, match="sha256:<64 hex digits>=<tenant>"):
        ApiSettings()


def test_limits_map_onto_the_spec_limits(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GENQ_MAX_BITS", "6")
    monkeypatch.setenv("GENQ_MAX_IMAGES_PER_JOB", "500")

    limits = ApiSettings().limits()

    assert limits == Limits(max_bits=6, max_images_per_job=500)


def test_inconsistent_settings_are_refused():
    with pytest.raises(ValueError, match="min_bits"):
        ApiSettings(min_bits=6, max_bits=4)
    with pytest.raises(ValueError, match="events_block_ms"):
        ApiSettings(events_block_ms=20_000, redis_socket_timeout_s=10)


def test_the_hash_command_reads_the_key_from_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setattr("sys.stdin", io.StringIO("my-key\n"))

    main()

    assert capsys.readouterr().out.strip() == hash_api_key("my-key")
