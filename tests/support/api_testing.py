"""API keys, auth headers and bucket access shared by the REST API's tests."""

from __future__ import annotations

from genq_core.storage_s3 import S3Storage
from tests.support.s3_server import S3ServerInfo

__all__ = ["ACME", "BASE_URL", "GLOBEX", "KEY_ACME", "KEY_GLOBEX", "bucket"]

KEY_ACME = "acme-secret-key"
KEY_GLOBEX = "globex-secret-key"
ACME = {"Authorization": f"Bearer {KEY_ACME}"}
"""Headers of tenant ``acme``."""
GLOBEX = {"Authorization": f"Bearer {KEY_GLOBEX}"}
"""Headers of tenant ``globex``."""
BASE_URL = "http://api.test"


def bucket(server: S3ServerInfo, name: str) -> S3Storage:
    """Direct access to a bucket of the test S3 server, as a worker has it."""
    return S3Storage(server.endpoint, server.access_key, server.secret_key, name)
