"""The job store: Redis is the system of record for jobs (Ray's own state is not durable).

Every write is one Lua script, so the checks it depends on (idempotency key, fencing token, legal
transition) and the write itself happen atomically even with many API replicas and workers. Times come
from the Redis server's clock (``TIME``), one clock for every writer.

Key layout (``P`` is the prefix, ``genq`` by default):

- ``P:job:{id}``               hash: id, tenant, kind, status, stage ("" = none), attempt, created_at and
                               updated_at (epoch ms), cancel_requested ("0"/"1"), config, result and
                               error (JSON; error "" = none), idempotency_key ("" = none)
- ``P:job:{id}:progress``      hash: ``stage:{stage}:done``, ``stage:{stage}:total`` and one field per counter
- ``P:job:{id}:transitions``   list of JSON ``{status, stage, at, attempt}``, oldest first
- ``P:job:{id}:events``        stream, field ``data`` = compact JSON event, trimmed to ~``events_maxlen``
- ``P:tenant:{t}:jobs``        sorted set of job ids, all scores 0: lexical order of the ULID ids is
                               creation order, which gives stable cursor pagination
- ``P:tenant:{t}:jobs:{status}``  the same, per status, kept in step with every transition
- ``P:idem:{t}:{key}``         hash {job_id, body_hash}, expires after ``idempotency_ttl_s``
- ``P:counts``                 hash status -> number of jobs in that status (for ``/metrics``)

The scripts build per-job and per-tenant key names themselves from the prefix, so the store needs a
single Redis primary (not Redis Cluster, where a script must declare every key it touches).
"""

from __future__ import annotations

import builtins
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from redis import Redis

from services.common.jobs import (
    ALLOWED_TRANSITIONS,
    TERMINAL_STATUSES,
    InvalidTransition,
    JobError,
    JobEvent,
    JobKind,
    JobProgress,
    JobRecord,
    JobStatus,
    Stage,
    Transition,
    is_job_id,
    new_job_id,
)

__all__ = ["IdempotencyConflict", "JobNotFound", "JobStore", "StaleAttempt"]

_TENANT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_MAX_IDEMPOTENCY_KEY = 255


class IdempotencyConflict(Exception):
    """The tenant reused an idempotency key with a different request body (the API answers 409/422)."""

    def __init__(self, key: str, job_id: str) -> None:
        self.key = key
        self.job_id = job_id
        super().__init__(
            f"idempotency key {key!r} was already used for job {job_id} with another body"
        )


class StaleAttempt(Exception):
    """A worker wrote with a fencing token that is not the job's current attempt: a newer attempt owns
    the job, so this worker must stop without touching it (and without acking its queue message)."""

    def __init__(self, job_id: str, token: int, current: int) -> None:
        self.job_id = job_id
        self.token = token
        self.current = current
        super().__init__(
            f"job {job_id}: attempt {token} is stale, the current attempt is {current}"
        )


class JobNotFound(LookupError):
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id} not found")


class JobStore:
    """Job records, their state machine and their event streams in Redis (a sync client: the API calls
    it from sync routes / the threadpool, the workers from their actors).

    Worker-side writes take the fencing token returned by ``start_attempt`` and raise ``StaleAttempt``
    once a newer attempt has started, so a worker that lost its lease can never overwrite its successor.
    """

    def __init__(
        self,
        redis: Redis,
        prefix: str = "genq",
        *,
        idempotency_ttl_s: int = 24 * 3600,
        events_maxlen: int = 1000,
        list_scan_limit: int = 1000,
    ) -> None:
        """``list_scan_limit`` bounds how many index entries one filtered ``list`` call reads, so a rare
        filter never scans a tenant's whole history in one request (the page is then short, with a cursor).
        """
        if not prefix or ":" in prefix:
            raise ValueError(f"prefix must be non-empty and free of ':', got {prefix!r}")
        for name, value in [
            ("idempotency_ttl_s", idempotency_ttl_s),
            ("events_maxlen", events_maxlen),
            ("list_scan_limit", list_scan_limit),
        ]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self._redis = redis
        self._prefix = prefix
        self._idempotency_ttl_ms = idempotency_ttl_s * 1000
        self._events_maxlen = events_maxlen
        self._list_scan_limit = list_scan_limit
        self._scripts = {
            name: redis.register_script(_PRELUDE + body) for name, body in _SCRIPTS.items()
        }

    # ---- API side -------------------------------------------------------------------------------

    def create(
        self,
        tenant: str,
        kind: JobKind | str,
        config: dict[str, Any],
        idempotency_key: str | None = None,
        body_hash: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """Create a queued job, or return the job an earlier request with the same idempotency key made.

        Returns ``(job, created)``. The same tenant + key + ``body_hash`` returns the existing job with
        ``created=False`` (the caller must not enqueue it again); the same key with another body hash
        raises ``IdempotencyConflict``. Keys are remembered for ``idempotency_ttl_s``.
        """
        # 1. check inputs
        _check_tenant(tenant)
        kind = JobKind(kind)
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= _MAX_IDEMPOTENCY_KEY:
            raise ValueError(
                f"idempotency key must be 1..{_MAX_IDEMPOTENCY_KEY} characters, got {idempotency_key!r}"
            )
        config_json = json.dumps(config, separators=(",", ":"), sort_keys=True)
        # 2. check the key and write the job in one script
        reply = self._run(
            "create",
            new_job_id(),
            tenant,
            kind.value,
            config_json,
            idempotency_key or "",
            body_hash or "",
            self._idempotency_ttl_ms,
        )
        outcome, job_id = _text(reply[0]), _text(reply[1])
        if outcome == "conflict":
            raise IdempotencyConflict(cast(str, idempotency_key), job_id)
        # 3. read it back (the record of an existing job may have moved on since its creation)
        record = self.get(job_id)
        if record is None:  # only if a concurrent discard() removed it between the two calls
            raise JobNotFound(job_id)
        return record, outcome == "created"

    def get(self, job_id: str, tenant: str | None = None) -> JobRecord | None:
        """The job, or ``None`` if it does not exist or (with ``tenant``) belongs to another tenant:
        the API answers 404 for both, so one tenant can't even learn that another's job id exists."""
        if not is_job_id(job_id):
            return None
        record = self._load_many([job_id])[0]
        if record is None or (tenant is not None and record.tenant != tenant):
            return None
        return record

    def list(
        self,
        tenant: str,
        status: JobStatus | str | None = None,
        kind: JobKind | str | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> tuple[builtins.list[JobRecord], str | None]:
        """One page of a tenant's jobs, newest first, and the cursor of the next page (``None`` at the end).

        The cursor is the last job id returned (opaque to clients); jobs created after the first page
        sort before it, so they never shift later pages. With filters, one call reads at most
        ``list_scan_limit`` index entries and may return a short page with a cursor to go on from.
        """
        # 1. check inputs
        _check_tenant(tenant)
        status = JobStatus(status) if status is not None else None
        kind = JobKind(kind) if kind is not None else None
        if not 1 <= limit <= 1000:
            raise ValueError(f"limit must be in 1..1000, got {limit}")
        if cursor is not None and not is_job_id(cursor):
            raise ValueError(f"invalid cursor {cursor!r}")
        # 2. walk the narrowest index, newest first, keeping the records that still match
        index = self._k_tenant(tenant) if status is None else self._k_tenant(tenant, status)
        batch_size = limit + 1 if kind is None else max(limit + 1, 100)
        page: builtins.list[JobRecord] = []
        position, scanned = cursor, 0
        while scanned < self._list_scan_limit:
            upper = "+" if position is None else "(" + position
            ids = [
                _text(i)
                for i in cast(
                    Sequence[Any],
                    self._redis.zrange(
                        index, upper, "-", desc=True, bylex=True, offset=0, num=batch_size
                    ),
                )
            ]
            if not ids:
                return page, None
            for i, (job_id, record) in enumerate(zip(ids, self._load_many(ids), strict=True)):
                scanned += 1
                position = job_id
                if record is None or (status is not None and record.status != status):
                    continue  # discarded, or moved to another status since the index was read
                if kind is not None and record.kind != kind:
                    continue
                page.append(record)
                if len(page) == limit:
                    # 3. a full page: hand out a cursor only if something older exists
                    more = i + 1 < len(ids) or self._has_older(index, job_id)
                    return page, job_id if more else None
            if len(ids) < batch_size:
                return page, None
        return page, position

    def request_cancel(self, job_id: str, tenant: str) -> JobRecord | None:
        """Cancel a job, idempotently; ``None`` if unknown or another tenant's.

        A queued job becomes ``canceled`` at once (the dispatcher drops its queue message when
        ``start_attempt`` refuses it). A running job gets ``cancel_requested=True``; the worker checks
        ``is_cancel_requested`` between batches/blocks and calls ``finish(..., CANCELED)``. A finished
        job is returned unchanged.
        """
        if not is_job_id(job_id):
            return None
        reply = self._run("cancel", job_id, tenant)
        if _text(reply[0]) == "missing":
            return None
        return self.get(job_id, tenant)

    def discard(self, job_id: str) -> bool:
        """Delete a job that no worker has started (queued, attempt 0), with its idempotency key.

        For the API when ``JobQueue.enqueue`` refuses a just-created job (``QueueFull``): the client gets
        429 and no orphaned queued job, and may retry with the same idempotency key. Returns whether
        the job was deleted.
        """
        if not is_job_id(job_id):
            return False
        return _text(self._run("discard", job_id)[0]) == "ok"

    def counts_by_status(self) -> dict[str, int]:
        """Number of jobs in each status, all statuses present (kept by the same scripts that move jobs)."""
        raw = cast(dict[Any, Any], self._redis.hgetall(self._k_counts()))
        stored = {_text(k): int(v) for k, v in raw.items()}
        return {status.value: stored.get(status.value, 0) for status in JobStatus}

    def events(
        self, job_id: str, last_id: str = "0", block_ms: int | None = None, count: int = 100
    ) -> builtins.list[JobEvent]:
        """Events after ``last_id`` (a stream id; "0" = from the start), oldest first.

        ``block_ms`` waits that long for a first event when there is none (keep it under the client's
        socket timeout). The stream keeps about the last ``events_maxlen`` events; the record itself
        is always the full state. No tenant check here: the API calls ``get(job_id, tenant)`` first.
        """
        response = self._redis.xread(
            {self._k_job(job_id, "events"): last_id}, count=count, block=block_ms
        )
        return [
            _parse_event(_text(entry_id), fields) for entry_id, fields in _stream_entries(response)
        ]

    # ---- worker side ----------------------------------------------------------------------------

    def start_attempt(self, job_id: str) -> int:
        """Start a new attempt of a queued job, or take over a running one from a lost worker.

        Returns the fencing token (the new attempt number) that every later write must carry; any
        writer holding an older token gets ``StaleAttempt`` from then on. Raises ``JobNotFound``, or
        ``InvalidTransition`` for a finished job (e.g. canceled while queued): drop its queue message.
        """
        reply = self._run("start", job_id)
        self._raise_for(reply, job_id, token=None)
        return int(reply[1])

    def set_stage(self, job_id: str, token: int, stage: Stage | str) -> None:
        """Enter ``stage`` (a running -> running transition, recorded in ``transitions``)."""
        stage = Stage(stage)
        self._raise_for(self._run("set_stage", job_id, token, stage.value), job_id, token)

    def update_progress(
        self,
        job_id: str,
        token: int,
        *,
        stage: Stage | str | None = None,
        done: int | None = None,
        total: int | None = None,
        **counters: int,
    ) -> None:
        """Set ``stage``'s done/total and/or counters (``images_generated=...``, see
        ``JobProgress.counter_names()``). Values are absolute, not increments, so a retried write is
        harmless. Not a transition: it emits a ``progress`` event with the whole progress.
        """
        # 1. check inputs
        fields: builtins.list[str | int] = []
        if stage is not None:
            stage = Stage(stage)
            if done is None and total is None:
                raise ValueError(f"update_progress for stage {stage.value!r} needs done or total")
            for part, value in [("done", done), ("total", total)]:
                if value is not None:
                    fields += [f"stage:{stage.value}:{part}", _count(part, value)]
        elif done is not None or total is not None:
            raise ValueError("done/total need the stage they belong to")
        known = JobProgress.counter_names()
        for name, value in counters.items():
            if name not in known:
                raise ValueError(f"unknown progress counter {name!r}; known: {', '.join(known)}")
            fields += [name, _count(name, value)]
        if not fields:
            raise ValueError("update_progress called with nothing to update")
        # 2. fenced write
        self._raise_for(self._run("progress", job_id, token, *fields), job_id, token)

    def finish(
        self,
        job_id: str,
        token: int,
        status: JobStatus | str,
        error: JobError | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        """End the attempt: ``succeeded`` (no error; ``result`` = artifact keys etc.), ``failed`` (with
        an error) or ``canceled``. ``result=None`` keeps the stored result. Finishing again with the same
        status and token is a no-op, so a worker may retry a write whose reply it lost.
        """
        status = JobStatus(status)
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"finish takes a terminal status, got {status.value!r}")
        if status is JobStatus.FAILED and error is None:
            raise ValueError("finish(failed) needs a JobError")
        if status is JobStatus.SUCCEEDED and error is not None:
            raise ValueError("finish(succeeded) takes no error")
        error_json = error.model_dump_json() if error is not None else ""
        result_json = "" if result is None else json.dumps(result, separators=(",", ":"))
        reply = self._run("finish", job_id, token, status.value, error_json, result_json)
        self._raise_for(reply, job_id, token)

    def requeue(self, job_id: str, token: int, error: JobError) -> JobStatus:
        """Put a running job back to ``queued`` after a retryable failure, recording ``error``.

        Returns the new status: ``canceled`` instead of ``queued`` when a cancel was requested meanwhile,
        so a job the user canceled never runs again. The caller then schedules the retry
        (``JobQueue.retry_later``) only for ``queued``.
        """
        reply = self._run("requeue", job_id, token, error.model_dump_json())
        self._raise_for(reply, job_id, token)
        return JobStatus(_text(reply[1]))

    def is_cancel_requested(self, job_id: str) -> bool:
        """Whether the user asked to cancel the job (workers poll this between batches/blocks)."""
        flag = self._redis.hget(self._k_job(job_id), "cancel_requested")
        if flag is None:
            raise JobNotFound(job_id)
        return _text(flag) == "1"

    # ---- helpers --------------------------------------------------------------------------------

    def _run(self, script: str, *args: str | int) -> builtins.list[Any]:
        """Run a script; every script gets the prefix and the events' maxlen first (see ``_PRELUDE``)."""
        return cast(
            builtins.list[Any],
            self._scripts[script](args=[self._prefix, self._events_maxlen, *args]),
        )

    @staticmethod
    def _raise_for(reply: Sequence[Any], job_id: str, token: int | None) -> None:
        outcome = _text(reply[0])
        if outcome == "ok":
            return
        if outcome == "missing":
            raise JobNotFound(job_id)
        if outcome == "stale":
            raise StaleAttempt(job_id, cast(int, token), int(reply[1]))
        if outcome == "invalid":
            raise InvalidTransition(_text(reply[1]), _text(reply[2]), job_id)
        raise RuntimeError(f"unexpected reply from the job store script: {reply!r}")

    def _has_older(self, index: str, job_id: str) -> bool:
        older = self._redis.zrange(index, "(" + job_id, "-", desc=True, bylex=True, offset=0, num=1)
        return bool(older)

    def _load_many(self, job_ids: Sequence[str]) -> builtins.list[JobRecord | None]:
        """Records for ``job_ids`` in one MULTI round trip (each record is a consistent snapshot)."""
        pipe = self._redis.pipeline(transaction=True)
        for job_id in job_ids:
            pipe.hgetall(self._k_job(job_id))
            pipe.hgetall(self._k_job(job_id, "progress"))
            pipe.lrange(self._k_job(job_id, "transitions"), 0, -1)
        replies = pipe.execute()
        return [
            _parse_record(replies[i], replies[i + 1], replies[i + 2]) if replies[i] else None
            for i in range(0, len(replies), 3)
        ]

    def _k_job(self, job_id: str, part: str | None = None) -> str:
        key = f"{self._prefix}:job:{job_id}"
        return key if part is None else f"{key}:{part}"

    def _k_tenant(self, tenant: str, status: JobStatus | None = None) -> str:
        key = f"{self._prefix}:tenant:{tenant}:jobs"
        return key if status is None else f"{key}:{status.value}"

    def _k_counts(self) -> str:
        return f"{self._prefix}:counts"


def _check_tenant(tenant: str) -> None:
    # Tenants are part of key names: no ':' so that one tenant's keys can never alias another's.
    if not _TENANT_RE.match(tenant):
        raise ValueError(f"tenant must match {_TENANT_RE.pattern}, got {tenant!r}")


def _count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def _text(value: Any) -> str:
    """Replies are bytes unless the client was made with ``decode_responses=True``; accept both."""
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)


def _from_ms(ms: Any) -> datetime:
    millis = int(ms)
    return datetime.fromtimestamp(millis // 1000, UTC) + timedelta(milliseconds=millis % 1000)


def _parse_progress(raw: dict[Any, Any]) -> JobProgress:
    stages: dict[str, dict[str, int]] = {}
    counters: dict[str, int] = {}
    for key, value in raw.items():
        name = _text(key)
        if name.startswith("stage:"):
            _, stage, part = name.split(":")
            stages.setdefault(stage, {})[part] = int(value)
        else:
            counters[name] = int(value)
    return JobProgress.model_validate({"stages": stages, **counters})


def _parse_transition(raw: Any) -> Transition:
    data = json.loads(_text(raw))
    data["at"] = _from_ms(data["at"])
    return Transition.model_validate(data)


def _parse_record(raw: dict[Any, Any], progress: dict[Any, Any], transitions: Any) -> JobRecord:
    fields = {_text(k): _text(v) for k, v in raw.items()}
    return JobRecord(
        id=fields["id"],
        tenant=fields["tenant"],
        kind=JobKind(fields["kind"]),
        status=JobStatus(fields["status"]),
        stage=Stage(fields["stage"]) if fields["stage"] else None,
        progress=_parse_progress(progress),
        attempt=int(fields["attempt"]),
        created_at=_from_ms(fields["created_at"]),
        updated_at=_from_ms(fields["updated_at"]),
        transitions=[_parse_transition(t) for t in transitions],
        error=JobError.model_validate_json(fields["error"]) if fields["error"] else None,
        config=json.loads(fields["config"]),
        cancel_requested=fields["cancel_requested"] == "1",
        result=json.loads(fields["result"]),
    )


def _parse_event(entry_id: str, fields: dict[Any, Any]) -> JobEvent:
    data = json.loads(_text(fields.get(b"data", fields.get("data"))))
    data["at"] = _from_ms(data["at"])
    return JobEvent.model_validate({"id": entry_id, **data})


def _stream_entries(response: Any) -> builtins.list[tuple[Any, dict[Any, Any]]]:
    """(id, fields) pairs from an XREAD reply of one stream, in RESP2 (list) or RESP3 (dict) shape."""
    if not response:
        return []
    streams = response.values() if isinstance(response, dict) else [s[1] for s in response]
    entries: builtins.list[tuple[Any, dict[Any, Any]]] = []
    for stream in streams:
        # RESP3 nests the entries one level deeper: {name: [entries]}
        items = stream[0] if stream and isinstance(stream[0], list) else stream
        entries.extend((entry_id, fields) for entry_id, fields in items)
    return entries


def _lua_allowed_table() -> str:
    """``ALLOWED_TRANSITIONS`` as a Lua table literal, so the scripts enforce the same table."""
    rows = []
    for old, targets in ALLOWED_TRANSITIONS.items():
        inner = ", ".join(f"{new.value} = true" for new in sorted(targets))
        rows.append(f"{old.value} = {{{inner}}}")
    return "{" + ", ".join(rows) + "}"


# Shared by every script: ARGV[1] = prefix, ARGV[2] = events' maxlen; a script's own args start at ARGV[3].
# Replies are arrays whose first element says what happened: ok | missing | stale | invalid | ...
_PRELUDE = (
    """
local P = ARGV[1]
local EVENTS_MAXLEN = tonumber(ARGV[2])
local ALLOWED = """
    + _lua_allowed_table()
    + """
local COUNTS = P .. ':counts'

local function job_key(id) return P .. ':job:' .. id end
local function progress_key(id) return job_key(id) .. ':progress' end
local function transitions_key(id) return job_key(id) .. ':transitions' end
local function events_key(id) return job_key(id) .. ':events' end
local function tenant_index(tenant) return P .. ':tenant:' .. tenant .. ':jobs' end
local function status_index(tenant, status) return tenant_index(tenant) .. ':' .. status end
local function idem_key(tenant, key) return P .. ':idem:' .. tenant .. ':' .. key end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function nullable(s)
  if s == '' then return cjson.null end
  return s
end

local function load(id)
  local v = redis.call('HMGET', job_key(id), 'status', 'attempt', 'tenant', 'stage', 'cancel_requested')
  if not v[1] then return nil end
  return {status = v[1], attempt = tonumber(v[2]), tenant = v[3], stage = v[4], cancel = v[5] == '1'}
end

-- nil if the token is the current attempt, else the reply to return
local function fence(job, token)
  if not job then return {'missing'} end
  if job.attempt ~= tonumber(token) then return {'stale', job.attempt} end
  return nil
end

local function emit(id, event)
  redis.call('XADD', events_key(id), 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'data', cjson.encode(event))
end

local function progress_snapshot(id)
  local flat = redis.call('HGETALL', progress_key(id))
  local snap = {stages = {}}
  for i = 1, #flat, 2 do
    local stage, part = string.match(flat[i], '^stage:([^:]+):(%a+)$')
    if stage then
      snap.stages[stage] = snap.stages[stage] or {}
      snap.stages[stage][part] = tonumber(flat[i + 1])
    else
      snap[flat[i]] = tonumber(flat[i + 1])
    end
  end
  return snap
end

-- the one place a status/stage changes: record, indexes, counts, history, event
local function move(id, tenant, old, new, stage, attempt, now)
  redis.call('HSET', job_key(id), 'status', new, 'stage', stage, 'updated_at', now)
  if old ~= new then
    redis.call('ZREM', status_index(tenant, old), id)
    redis.call('ZADD', status_index(tenant, new), 0, id)
    redis.call('HINCRBY', COUNTS, old, -1)
    redis.call('HINCRBY', COUNTS, new, 1)
  end
  local entry = {status = new, stage = nullable(stage), at = now, attempt = attempt}
  redis.call('RPUSH', transitions_key(id), cjson.encode(entry))
  entry.type = 'transition'
  emit(id, entry)
end
"""
)

_SCRIPTS: dict[str, str] = {
    # ARGV: id, tenant, kind, config, idempotency key ('' = none), body hash, idempotency ttl (ms)
    "create": """
local id, tenant, kind, config = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local idem, body_hash, ttl = ARGV[7], ARGV[8], ARGV[9]
if idem ~= '' then
  local ik = idem_key(tenant, idem)
  local found = redis.call('HMGET', ik, 'job_id', 'body_hash')
  if found[1] and redis.call('EXISTS', job_key(found[1])) == 1 then
    if found[2] == body_hash then return {'existing', found[1]} end
    return {'conflict', found[1]}
  end
  redis.call('HSET', ik, 'job_id', id, 'body_hash', body_hash)
  redis.call('PEXPIRE', ik, ttl)
end
local now = now_ms()
redis.call('HSET', job_key(id), 'id', id, 'tenant', tenant, 'kind', kind, 'status', 'queued',
  'stage', '', 'attempt', 0, 'created_at', now, 'updated_at', now, 'cancel_requested', 0,
  'config', config, 'result', '{}', 'error', '', 'idempotency_key', idem)
redis.call('ZADD', tenant_index(tenant), 0, id)
redis.call('ZADD', status_index(tenant, 'queued'), 0, id)
redis.call('HINCRBY', COUNTS, 'queued', 1)
local entry = {status = 'queued', stage = cjson.null, at = now, attempt = 0}
redis.call('RPUSH', transitions_key(id), cjson.encode(entry))
entry.type = 'created'
emit(id, entry)
return {'created', id}
""",
    # ARGV: id
    "start": """
local id = ARGV[3]
local job = load(id)
if not job then return {'missing'} end
if not ALLOWED[job.status]['running'] then return {'invalid', job.status, 'running'} end
local attempt = redis.call('HINCRBY', job_key(id), 'attempt', 1)
move(id, job.tenant, job.status, 'running', '', attempt, now_ms())
return {'ok', attempt}
""",
    # ARGV: id, token, stage
    "set_stage": """
local id, token, stage = ARGV[3], ARGV[4], ARGV[5]
local job = load(id)
local refused = fence(job, token)
if refused then return refused end
if job.status ~= 'running' then return {'invalid', job.status, 'running'} end
if job.stage ~= stage then move(id, job.tenant, 'running', 'running', stage, job.attempt, now_ms()) end
return {'ok'}
""",
    # ARGV: id, token, then field, value pairs for the progress hash
    "progress": """
local id, token = ARGV[3], ARGV[4]
local job = load(id)
local refused = fence(job, token)
if refused then return refused end
if job.status ~= 'running' then return {'invalid', job.status, 'running'} end
redis.call('HSET', progress_key(id), unpack(ARGV, 5))
local now = now_ms()
redis.call('HSET', job_key(id), 'updated_at', now)
emit(id, {type = 'progress', status = 'running', stage = nullable(job.stage), at = now,
  attempt = job.attempt, progress = progress_snapshot(id)})
return {'ok'}
""",
    # ARGV: id, token, terminal status, error JSON ('' = none), result JSON ('' = keep)
    "finish": """
local id, token, new, err, result = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local job = load(id)
local refused = fence(job, token)
if refused then return refused end
if job.status == new then return {'ok'} end
if job.status ~= 'running' or not ALLOWED[job.status][new] then
  return {'invalid', job.status, new}
end
redis.call('HSET', job_key(id), 'error', err)
if result ~= '' then redis.call('HSET', job_key(id), 'result', result) end
move(id, job.tenant, 'running', new, job.stage, job.attempt, now_ms())
return {'ok'}
""",
    # ARGV: id, token, error JSON
    "requeue": """
local id, token, err = ARGV[3], ARGV[4], ARGV[5]
local job = load(id)
local refused = fence(job, token)
if refused then return refused end
if job.status ~= 'running' then return {'invalid', job.status, 'queued'} end
local new, stage = 'queued', ''
if job.cancel then new, stage = 'canceled', job.stage end
redis.call('HSET', job_key(id), 'error', err)
move(id, job.tenant, 'running', new, stage, job.attempt, now_ms())
return {'ok', new}
""",
    # ARGV: id, tenant
    "cancel": """
local id, tenant = ARGV[3], ARGV[4]
local job = load(id)
if not job or job.tenant ~= tenant then return {'missing'} end
if job.status == 'queued' then
  redis.call('HSET', job_key(id), 'cancel_requested', 1)
  move(id, tenant, 'queued', 'canceled', '', job.attempt, now_ms())
elseif job.status == 'running' and not job.cancel then
  local now = now_ms()
  redis.call('HSET', job_key(id), 'cancel_requested', 1, 'updated_at', now)
  emit(id, {type = 'cancel_requested', status = 'running', stage = nullable(job.stage), at = now,
    attempt = job.attempt})
end
return {'ok'}
""",
    # ARGV: id
    "discard": """
local id = ARGV[3]
local job = load(id)
if not job or job.status ~= 'queued' or job.attempt ~= 0 then return {'refused'} end
local idem = redis.call('HGET', job_key(id), 'idempotency_key')
if idem and idem ~= '' and redis.call('HGET', idem_key(job.tenant, idem), 'job_id') == id then
  redis.call('DEL', idem_key(job.tenant, idem))
end
redis.call('DEL', job_key(id), progress_key(id), transitions_key(id), events_key(id))
redis.call('ZREM', tenant_index(job.tenant), id)
redis.call('ZREM', status_index(job.tenant, 'queued'), id)
redis.call('HINCRBY', COUNTS, 'queued', -1)
return {'ok'}
""",
}
