from __future__ import annotations

import pytest

from services.common.settings import MissingSettings, Mode, StoreSettings


def test_distributed_mode_names_every_missing_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENQ_MODE", "distributed")
    monkeypatch.setenv("GENQ_REDIS_URL", "redis://127.0.0.1:6379/0")
    settings = StoreSettings()
    assert settings.mode == Mode.DISTRIBUTED
    with pytest.raises(MissingSettings) as info:
        settings.check()
    assert info.value.names == ["GENQ_S3_ENDPOINT", "GENQ_S3_ACCESS_KEY", "GENQ_S3_SECRET_KEY"]
    assert "GENQ_S3_SECRET_KEY" in str(info.value)


def test_embedded_mode_needs_nothing_and_hides_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENQ_S3_SECRET_KEY", "hunter2")
    settings = StoreSettings()
    settings.check()
    assert "hunter2" not in repr(settings)
    assert settings.s3_secret_key is not None
    assert settings.s3_secret_key.get_secret_value() == "hunter2"
