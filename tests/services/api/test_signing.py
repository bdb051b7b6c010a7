"""Signed download links: a genuine token names its object; an altered, foreign or expired one is
refused with a reason."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.api.signing import FILES_PATH, LinkExpired, LinkInvalid, LinkSigner

LATER = datetime.now(UTC) + timedelta(hours=1)


def test_a_token_carries_role_key_filename_and_expiry():
    signer = LinkSigner()
    link = signer.verify(signer.sign("results", "jobs/j/report.json", LATER, "report.json"))

    assert (link.role, link.key, link.filename) == ("results", "jobs/j/report.json", "report.json")
    assert link.expires_at == datetime.fromtimestamp(int(LATER.timestamp()), UTC)
    assert signer.link("data", "k", LATER).startswith(f"{FILES_PATH}/")


def test_an_altered_token_is_invalid():
    signer = LinkSigner()
    body, mac = signer.sign("results", "jobs/j/report.json", LATER).split(".")
    other_body = signer.sign("results", "jobs/k/report.json", LATER).split(".")[0]

    for forged in (f"{other_body}.{mac}", f"{body}.{mac[:-2]}AA", body, f".{mac}", "x.y.z", ""):
        with pytest.raises(LinkInvalid, match="not valid"):
            signer.verify(forged)


def test_another_signers_token_is_invalid():
    token = LinkSigner().sign("results", "k", LATER)
    with pytest.raises(LinkInvalid):
        LinkSigner().verify(token)


def test_an_expired_token_says_when_it_expired():
    signer = LinkSigner(b"s" * 32)
    token = signer.sign("results", "k", datetime(2026, 1, 1, tzinfo=UTC))

    with pytest.raises(LinkExpired, match="expired at 2026-01-01"):
        signer.verify(token)
    assert signer.verify(token, now=datetime(2025, 12, 31, tzinfo=UTC)).key == "k"


def test_a_short_secret_is_refused():
    with pytest.raises(ValueError, match="16 bytes"):
        LinkSigner(b"short")
