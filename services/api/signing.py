"""Signed download links for the embedded mode's local storage: what presigned URLs are on S3.

A link is ``/files/<token>``: the token carries the bucket role, the object key, the expiry and
the download filename, and an HMAC-SHA256 over them with a secret only this API process knows.
Anyone holding the link can download that one object until it expires, without an API key, like
an S3 presigned URL; changing any part of it breaks the signature. The secret is made per process,
so links die with it (as they would with rotated S3 credentials).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = ["LinkExpired", "LinkInvalid", "LinkSigner", "SignedLink", "FILES_PATH"]

FILES_PATH = "/files"
"""The route prefix signed links are served under (``services.api.routers.files``)."""


class LinkInvalid(ValueError):
    """The token was not made by this process's signer, or was altered."""


class LinkExpired(ValueError):
    """The token is genuine but past its expiry."""


@dataclass(frozen=True)
class SignedLink:
    """What a verified token grants: one object of one bucket role, named ``filename``."""

    role: str
    key: str
    expires_at: datetime
    filename: str | None


class LinkSigner:
    """Makes and checks download tokens with one secret (random unless given)."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        if len(self._secret) < 16:
            raise ValueError("a link secret needs at least 16 bytes")

    def __repr__(self) -> str:
        return "LinkSigner(<secret>)"

    def sign(self, role: str, key: str, expires_at: datetime, filename: str | None = None) -> str:
        """A token for ``key`` of the bucket with ``role``, valid until ``expires_at``."""
        payload = {"r": role, "k": key, "e": int(expires_at.timestamp()), "f": filename}
        body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
        return f"{body}.{_b64(self._mac(body))}"

    def link(self, role: str, key: str, expires_at: datetime, filename: str | None = None) -> str:
        """The path of the download route for a new token (absolute-ize it with the base URL)."""
        return f"{FILES_PATH}/{self.sign(role, key, expires_at, filename)}"

    def verify(self, token: str, now: datetime | None = None) -> SignedLink:
        """The link ``token`` grants.

        Raises:
            LinkInvalid: not this signer's token, or altered.
            LinkExpired: past its expiry.
        """
        body, _, mac = token.partition(".")
        try:
            genuine = hmac.compare_digest(_unb64(mac), self._mac(body))
        except (ValueError, binascii.Error):
            genuine = False
        if not body or not genuine:
            raise LinkInvalid("this download link is not valid (altered or from another server)")
        payload = json.loads(_unb64(body))  # signed by us: well-formed
        expires_at = datetime.fromtimestamp(payload["e"], UTC)
        if (now or datetime.now(UTC)) >= expires_at:
            raise LinkExpired(
                f"this download link expired at {expires_at.isoformat()}; ask the job's "
                "artifacts for a new one"
            )
        return SignedLink(
            role=payload["r"], key=payload["k"], expires_at=expires_at, filename=payload["f"]
        )

    def _mac(self, body: str) -> bytes:
        return hmac.new(self._secret, body.encode(), hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
