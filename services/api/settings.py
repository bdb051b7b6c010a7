"""Settings of the REST frontend: ``ApiSettings``, every field from ``GENQ_<FIELD>``.

API keys are never configured in plain text: ``GENQ_API_KEYS`` lists ``sha256:<hex digest>=<tenant>``
entries (comma-separated, or a JSON list), so a leaked env file or ``repr`` gives no usable key.
:func:`hash_api_key` makes an entry's digest; ``python -m services.api.settings`` reads a key from
stdin and prints it.

The per-job limits map one to one onto :class:`services.common.spec.Limits` (``GENQ_MAX_BITS``,
``GENQ_MAX_IMAGES_PER_JOB``, ...); :meth:`ApiSettings.limits` builds that object.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from services.common.settings import StoreSettings
from services.common.spec import Limits

__all__ = ["ApiSettings", "hash_api_key"]

_KEY_ENTRY_RE = re.compile(r"^sha256:([0-9a-f]{64})=([A-Za-z0-9_.-]{1,128})$")
_DEFAULT_LIMITS = Limits()
_GIB = 1024**3
_MIB = 1024**2


def hash_api_key(key: str) -> str:
    """The ``sha256:<hex>`` digest of an API key, as ``GENQ_API_KEYS`` entries hold it."""
    if not key or key != key.strip():
        raise ValueError("an API key must be non-empty and free of surrounding whitespace")
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class ApiSettings(StoreSettings):
    """Everything the API process reads from its environment (on top of :class:`StoreSettings`)."""

    # -- auth ---------------------------------------------------------------------------------
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="'sha256:<hex digest of the key>=<tenant>' entries, comma-separated",
    )

    # -- per-job limits (services.common.spec.Limits) ------------------------------------------
    max_images_per_job: int = Field(
        default=_DEFAULT_LIMITS.max_images_per_job,
        ge=1,
        description="most images one job may generate (per class x classes)",
    )
    max_calibration_images: int = Field(
        default=_DEFAULT_LIMITS.max_calibration_images,
        ge=1,
        description="most calibration images per job",
    )
    max_generation_steps: int = Field(
        default=_DEFAULT_LIMITS.max_generation_steps,
        ge=1,
        description="most denoising steps per image",
    )
    max_resolution: int = Field(
        default=_DEFAULT_LIMITS.max_resolution,
        ge=8,
        description="largest generated image side, pixels",
    )
    max_iters: int = Field(
        default=_DEFAULT_LIMITS.max_iters, ge=1, description="most reconstruction steps per block"
    )
    max_inversion_steps: int = Field(
        default=_DEFAULT_LIMITS.max_inversion_steps,
        ge=1,
        description="most textual-inversion steps",
    )
    min_bits: int = Field(
        default=_DEFAULT_LIMITS.min_bits,
        ge=2,
        le=8,
        description="fewest weight/activation bits a job may ask for",
    )
    max_bits: int = Field(
        default=_DEFAULT_LIMITS.max_bits,
        ge=2,
        le=8,
        description="most weight/activation bits a job may ask for",
    )

    # -- queue ------------------------------------------------------------------------------------
    max_queue_depth: int = Field(default=1000, ge=1, description="jobs waiting or running")
    queue_full_retry_after_s: int = Field(
        default=30, ge=1, description="Retry-After of a 429 when the queue is full"
    )

    # -- uploads and request bodies -------------------------------------------------------------
    max_request_bytes: int = Field(
        default=1024 * 1024, ge=1024, description="a JSON request body (uploads have their own)"
    )
    max_upload_bytes_model: int = Field(default=2 * _GIB, ge=1, description="largest model upload")
    max_upload_bytes_calibration: int = Field(
        default=2 * _GIB, ge=1, description="largest calibration-set upload"
    )
    max_upload_bytes_kshot: int = Field(
        default=256 * _MIB, ge=1, description="largest k-shot image upload (data-scarce mode)"
    )
    max_upload_bytes_eval: int = Field(
        default=2 * _GIB, ge=1, description="largest evaluation-set upload"
    )
    max_archive_files: int = Field(default=50_000, ge=1, description="entries in one archive")
    max_archive_bytes: int = Field(
        default=8 * _GIB, ge=1, description="uncompressed bytes in one archive (zip bombs)"
    )
    max_member_bytes: int = Field(default=64 * _MIB, ge=1, description="one archive member")
    max_image_pixels: int = Field(default=40_000_000, ge=1, description="width x height")
    upload_tmp_dir: Path | None = Field(
        default=None, description="where uploads are spooled while validated (system temp)"
    )

    # -- URLs ---------------------------------------------------------------------------------
    presign_expiry_s: int = Field(
        default=3600,
        ge=1,
        le=7 * 24 * 3600,
        description="how long download and upload URLs stay valid",
    )
    public_base_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^/?#]+(/[^?#]*)?$",
        description="base URL users reach the API on (Location headers, job urls); "
        "None: the request's own base URL",
    )

    # -- clients ------------------------------------------------------------------------------
    redis_socket_timeout_s: float = Field(
        default=10.0, gt=0, description="longest wait for a Redis reply"
    )
    redis_connect_timeout_s: float = Field(
        default=3.0, gt=0, description="longest wait to connect to Redis"
    )
    redis_retries: int = Field(
        default=1, ge=0, description="retries of a Redis command after a connection error"
    )
    s3_connect_timeout_s: float = Field(
        default=3.0, gt=0, description="longest wait to connect to S3"
    )
    s3_read_timeout_s: float = Field(default=60.0, gt=0, description="longest wait for an S3 reply")
    s3_max_retries: int = Field(
        default=2, ge=0, description="retries of an S3 request after a connection error"
    )
    events_block_ms: int = Field(
        default=5000, ge=1, description="one blocking read of a job's event stream"
    )
    events_max_readers: int = Field(
        default=64,
        ge=1,
        description="event-stream reads in flight at once (their own thread limit, so "
        "many open streams can't starve the other routes)",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        """Accept a JSON list or a comma/whitespace-separated string (friendlier in env files)."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part for part in re.split(r"[,\s]+", text) if part]
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, value: list[str]) -> list[str]:
        digests: set[str] = set()
        for position, entry in enumerate(value):
            match = _KEY_ENTRY_RE.match(entry)
            if not match:
                raise ValueError(
                    f"entry {position} is not 'sha256:<64 hex digits>=<tenant>' (tenant: letters, "
                    "digits, '_', '.', '-'); make a digest with services.api.settings.hash_api_key"
                )
            if match.group(1) in digests:
                raise ValueError(f"entry {position} repeats the digest of an earlier entry")
            digests.add(match.group(1))
        return value

    @field_validator("public_base_url")
    @classmethod
    def _no_trailing_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _consistent(self) -> ApiSettings:
        if self.min_bits > self.max_bits:
            raise ValueError(f"min_bits ({self.min_bits}) > max_bits ({self.max_bits})")
        # A blocking XREAD that outlives the socket timeout would look like a dead connection.
        if self.events_block_ms >= self.redis_socket_timeout_s * 1000:
            raise ValueError(
                f"events_block_ms ({self.events_block_ms}) must be below redis_socket_timeout_s "
                f"({self.redis_socket_timeout_s} s)"
            )
        return self

    def key_digests(self) -> dict[str, str]:
        """``{hex digest: tenant}`` of every configured API key."""
        pairs = (_KEY_ENTRY_RE.match(entry) for entry in self.api_keys)
        return {m.group(1): m.group(2) for m in pairs if m}

    def limits(self) -> Limits:
        """The deployment's per-job bounds, as ``check_limits`` takes them."""
        return Limits(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Limits)})

    def max_upload_bytes(self, kind: str) -> int:
        """The size limit of one upload of ``kind`` (``model``, ``calibration``, ``kshot``, ``eval``)."""
        return int(getattr(self, f"max_upload_bytes_{kind}"))

    def missing_for_distributed(self) -> list[str]:
        """The store settings plus the API keys (an API without keys would answer only 401s);
        ``check()`` raises :class:`~services.common.settings.MissingSettings` naming them all."""
        missing = super().missing_for_distributed()
        if not self.api_keys:
            missing.append("GENQ_API_KEYS")
        return missing


def main() -> None:
    """Print the ``GENQ_API_KEYS`` digest of the key read from stdin (keeps it out of shell history)."""
    key = sys.stdin.readline().strip()
    print(hash_api_key(key))


if __name__ == "__main__":
    main()
