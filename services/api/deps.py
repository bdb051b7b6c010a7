"""Route dependencies, as ``Annotated`` aliases: ``def route(store: StoreDep, tenant: TenantDep)``."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.api.errors import NotFound, Unauthenticated
from services.api.settings import ApiSettings
from services.api.state import AppState
from services.api.storage import Buckets
from services.api.uploads import UploadStore
from services.common.jobs import JobRecord
from services.common.jobstore import JobStore
from services.common.queue import JobQueue

__all__ = [
    "BucketsDep",
    "OwnedJobDep",
    "QueueDep",
    "SettingsDep",
    "StateDep",
    "StoreDep",
    "TenantDep",
    "UploadsDep",
    "base_url",
]

_bearer = HTTPBearer(auto_error=False, description="an API key: Authorization: Bearer <key>")
_MAX_KEY_LENGTH = 512


async def _state(request: Request) -> AppState:
    state: AppState = request.app.state.genq
    return state


StateDep = Annotated[AppState, Depends(_state)]


async def _settings(state: StateDep) -> ApiSettings:
    return state.settings


async def _store(state: StateDep) -> JobStore:
    return state.store


async def _queue(state: StateDep) -> JobQueue:
    return state.queue


async def _uploads(state: StateDep) -> UploadStore:
    return state.uploads


async def _buckets(state: StateDep) -> Buckets:
    return state.buckets


SettingsDep = Annotated[ApiSettings, Depends(_settings)]
StoreDep = Annotated[JobStore, Depends(_store)]
QueueDep = Annotated[JobQueue, Depends(_queue)]
UploadsDep = Annotated[UploadStore, Depends(_uploads)]
BucketsDep = Annotated[Buckets, Depends(_buckets)]


async def _tenant(
    request: Request,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The tenant of the presented API key; 401 (with ``WWW-Authenticate: Bearer``) otherwise.

    Keys are compared by their sha256 digests with ``hmac.compare_digest`` against every
    configured digest (no early exit), so timing tells nothing about which digest came close.
    """
    if credentials is None:
        raise Unauthenticated(
            "missing API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    key = credentials.credentials
    presented = hashlib.sha256(key.encode()).hexdigest() if len(key) <= _MAX_KEY_LENGTH else ""
    tenant: str | None = None
    for digest, owner in settings.key_digests().items():
        if hmac.compare_digest(presented, digest):
            tenant = owner
    if tenant is None:
        raise Unauthenticated(
            "invalid API key", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
        )
    request.state.tenant = tenant  # for the request's log line
    return tenant


TenantDep = Annotated[str, Depends(_tenant)]


def _owned_job(job_id: str, tenant: TenantDep, store: StoreDep) -> JobRecord:
    """The tenant's job ``job_id`` (a sync dependency: FastAPI runs it in the threadpool)."""
    job = store.get(job_id, tenant)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return job


OwnedJobDep = Annotated[JobRecord, Depends(_owned_job)]


def base_url(request: Request, settings: ApiSettings) -> str:
    """The URL prefix links are built on: ``GENQ_PUBLIC_BASE_URL``, else the request's own."""
    return settings.public_base_url or str(request.base_url).rstrip("/")
