"""Settings every service process shares: where the job store and the object store are.

Each service has its own pydantic-settings class built on :class:`StoreSettings`
(``services.api.settings.ApiSettings``, ``services.workers.settings.WorkerSettings``); every
field comes from an environment variable ``GENQ_<FIELD>`` (or an env file). Secrets have no
defaults: in the distributed mode a process refuses to start and names what is missing.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from genq_core.storage import LocalStorage, Storage

__all__ = ["Mode", "StoreSettings", "MissingSettings"]


class Mode(StrEnum):
    """``embedded``: one process, local folders, no external servers (a laptop, the demo).
    ``distributed``: Redis, an S3 server (MinIO) and a Ray cluster."""

    EMBEDDED = "embedded"
    DISTRIBUTED = "distributed"


class MissingSettings(ValueError):
    """The distributed mode needs settings that are not set; ``names`` are the env variables."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(
            "missing settings for the distributed mode: " + ", ".join(names) + " (set them in "
            "the environment or the env file; deploy/env.example lists every setting)"
        )
        self.names = names


class StoreSettings(BaseSettings):
    """The job store (Redis) and the object store (S3), shared by the API and the workers.

    Buckets: ``s3_bucket_data`` holds synthetic datasets, calibration sets and learned tokens
    (the deployment may expire them), ``s3_bucket_results`` holds quantized models, reports and
    manifests (kept), ``s3_bucket_uploads`` holds what users upload.
    """

    # an empty variable is unset (compose files pass `${VAR:-}` through as "")
    model_config = SettingsConfigDict(
        env_prefix="GENQ_", env_file=None, extra="ignore", env_ignore_empty=True
    )

    mode: Mode = Field(
        default=Mode.EMBEDDED, description="embedded (one process, local folders) or distributed"
    )
    redis_url: str | None = Field(default=None, description="redis://host:port/db")
    redis_prefix: str = Field(
        default="genq",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="prefix of every Redis key (several deployments can share one Redis)",
    )
    s3_endpoint: str | None = Field(default=None, description="host:port the services reach")
    s3_public_endpoint: str | None = Field(
        default=None, description="host:port users reach; presigned URLs are signed for it"
    )
    s3_access_key: SecretStr | None = Field(default=None, description="S3 access key (secret)")
    s3_secret_key: SecretStr | None = Field(default=None, description="S3 secret key (secret)")
    s3_secure: bool = Field(default=False, description="HTTPS to the S3 endpoint")
    s3_region: str = Field(default="us-east-1", description="region presigned URLs are signed for")
    s3_bucket_data: str = Field(
        default="genq-data",
        description="synthetic datasets, calibration sets, learned tokens (may expire)",
    )
    s3_bucket_results: str = Field(
        default="genq-results", description="quantized models, reports, manifests (kept)"
    )
    s3_bucket_uploads: str = Field(
        default="genq-uploads", description="what users upload (models, image sets)"
    )
    data_dir: Path = Field(
        default=Path("runs/service"), description="embedded mode: storage and job store folder"
    )

    def missing_for_distributed(self) -> list[str]:
        """Env variable names the distributed mode needs and that are unset."""
        required = {
            "GENQ_REDIS_URL": self.redis_url,
            "GENQ_S3_ENDPOINT": self.s3_endpoint,
            "GENQ_S3_ACCESS_KEY": self.s3_access_key,
            "GENQ_S3_SECRET_KEY": self.s3_secret_key,
        }
        return [name for name, value in required.items() if not value]

    def check(self) -> None:
        """Raise :class:`MissingSettings` when the distributed mode lacks a required setting."""
        if self.mode == Mode.DISTRIBUTED:
            missing = self.missing_for_distributed()
            if missing:
                raise MissingSettings(missing)

    def local_storage(self, bucket: str) -> Storage:
        """Embedded mode: a bucket is a folder under ``data_dir``."""
        return LocalStorage(self.data_dir / "storage" / bucket)
