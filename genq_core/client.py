"""A Python client of the GenQ REST API (what ``genq submit | status | wait | ...`` use).

::

    with GenQClient("https://genq.example.com", api_key) as client:
        job = client.submit({"kind": "genq", "model": {"source": "timm", "name": "resnet18"}})
        final = client.wait(job["id"], on_update=print)
        paths = client.download(job["id"], "out/")

It needs httpx and nothing else (no torch): it runs on a laptop against a server.

Errors. Every error the API answers (``{"error": {code, message, retryable}}``) is raised as a
:class:`GenQError` with that code, message and flag plus the HTTP status; the client's own
failures use the same class with codes of their own (``connection_error``, ``checksum_mismatch``,
``unsafe_key``, ``wait_timeout``; ``http_<status>`` for an answer that is not the API's).

Retries. Connect errors, 429 (after its ``Retry-After``) and 502/503/504 are retried with
exponential backoff and jitter, at most ``max_retries`` times, for the calls that are safe to
repeat: reads, ``cancel`` (idempotent on the server), downloads, and ``submit``, which always sends
an ``Idempotency-Key`` so that a retry after a lost reply returns the job the first try created.
Uploads are retried only when the connection was never made (nothing was sent).
"""

from __future__ import annotations

import builtins
import email.utils
import hashlib
import json
import logging
import os
import random
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

import genq_core

__all__ = [
    "TERMINAL_STATUSES",
    "UPLOAD_KINDS",
    "GenQClient",
    "GenQError",
    "WaitTimeout",
]

log = logging.getLogger(__name__)

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})
"""Job statuses that never change again."""

UPLOAD_KINDS = ("model", "calibration", "kshot", "eval")
"""What an upload can be for (the ``kind`` of ``POST /v1/uploads``)."""

TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})
"""HTTP statuses worth retrying: queue full, and a proxy or dependency that is down."""

_IDEMPOTENCY_KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")  # what the API accepts
_UNSAFE_KEY_CHARS = re.compile(r"[\x00-\x1f\x7f\\:]")  # control chars, Windows separators/drives
_CHUNK_BYTES = 1024 * 1024


class GenQError(Exception):
    """An error of the GenQ API, or of the client talking to it.

    Attributes:
        code: a stable code to branch on: the API's (``not_found``, ``invalid_request``,
            ``queue_full``, ``idempotency_conflict``, ...) or the client's own
            (``connection_error``, ``checksum_mismatch``, ``unsafe_key``, ``wait_timeout``,
            ``http_<status>`` for an error body that is not the API's).
        message: what went wrong, for people (a 422's names the field).
        retryable: whether the same request may succeed later.
        status: the HTTP status, or ``None`` when no answer came.
        fields: for invalid requests, ``[{"field": dotted path, "message": ...}]``.
    """

    def __init__(
        self,
        code: str,
        message: str,
        retryable: bool = False,
        status: int | None = None,
        *,
        fields: list[dict[str, str]] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
        self.status = status
        self.fields = fields or []

    @property
    def is_user_error(self) -> bool:
        """Whether the request itself is at fault (a 4xx other than 408/429): fix it, don't retry."""
        return (
            self.status is not None and 400 <= self.status < 500 and self.status not in (408, 429)
        )


class WaitTimeout(GenQError, TimeoutError):
    """:meth:`GenQClient.wait` gave up before the job ended; ``status`` is the job's last one."""

    def __init__(self, job_id: str, timeout: float, job_status: str) -> None:
        super().__init__(
            "wait_timeout",
            f"job {job_id} is still {job_status} after {timeout:g} s",
            retryable=True,
        )
        self.job_id = job_id
        self.job_status = job_status


class GenQClient:
    """A synchronous client of one GenQ server, for one API key (one tenant).

    Args:
        base_url: the server, e.g. ``https://genq.example.com`` (routes are under ``/v1``).
        api_key: the bearer key; it is only ever sent to ``base_url``, never to the object
            store the download URLs point at.
        timeout: seconds for connecting and for each read (uploads wait 10x longer for the
            server's validation).
        transport: an httpx transport to use instead of the network (tests:
            ``httpx.MockTransport``); it serves both the API and the download URLs.
        max_retries: retries of a transient failure, per call.
        backoff_s: the first retry's delay; it doubles with each retry (with jitter).
        max_delay_s: the longest wait between tries; a ``Retry-After`` above it is not waited
            for, the error is raised instead.
        sleep: how to wait (tests pass a recorder).

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        max_delay_s: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        # 1. check inputs
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not api_key or api_key != api_key.strip() or not api_key.isprintable():
            raise ValueError("api_key must be a non-empty printable key without surrounding spaces")
        for name, value in [("timeout", timeout), ("max_delay_s", max_delay_s)]:
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if max_retries < 0 or backoff_s < 0:
            raise ValueError(
                f"max_retries and backoff_s must be >= 0, got {max_retries}, {backoff_s}"
            )
        # 2. one HTTP client for the API (with the key), one for presigned URLs (without it)
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_delay_s = max_delay_s
        self._sleep = sleep
        user_agent = f"genq-client/{genq_core.__version__}"
        self._api = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": user_agent},
            timeout=timeout,
            transport=transport,
        )
        self._storage = httpx.Client(
            headers={"User-Agent": user_agent}, timeout=timeout, transport=transport
        )

    def __enter__(self) -> GenQClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections."""
        self._api.close()
        self._storage.close()

    # ---- jobs -----------------------------------------------------------------------------------

    def submit(
        self, body: Mapping[str, Any], *, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Submit a job: ``body`` is a request of ``POST /v1/jobs`` (``{"kind": "genq", ...}``).

        Returns ``{id, kind, status, created_at, urls}``. Every submission carries an
        ``Idempotency-Key`` (a new random one unless given) so the client's own retries are safe;
        give your own to make resubmitting from another process safe as well (the same key with
        another body is a 409 ``idempotency_conflict``).
        """
        if not isinstance(body, Mapping):
            raise ValueError(f"a job request is a JSON object, got {type(body).__name__}")
        key = idempotency_key if idempotency_key is not None else f"genq-{uuid.uuid4().hex}"
        if not _IDEMPOTENCY_KEY_RE.match(key):
            raise ValueError(
                f"idempotency key {key!r} must be 1-255 printable ASCII characters, no spaces"
            )
        response = self._send(
            lambda: self._api.build_request(
                "POST", "/v1/jobs", json=dict(body), headers={"Idempotency-Key": key}
            ),
            idempotent=True,
        )
        return _json_object(response)

    def get(self, job_id: str) -> dict[str, Any]:
        """A job: status, stage, progress, attempt, transitions, error, config, result."""
        return self._get_json(_job_path(job_id))

    def list(
        self, status: str | None = None, kind: str | None = None, limit: int | None = 50
    ) -> Iterator[dict[str, Any]]:
        """The tenant's jobs, newest first, at most ``limit`` (``None``: all), optionally only
        those of one ``status`` and/or ``kind``; pages are fetched as the iterator goes."""
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {limit}")
        remaining = limit
        cursor: str | None = None
        while remaining is None or remaining > 0:
            params: dict[str, str | int] = {
                "limit": 100 if remaining is None else min(remaining, 100)
            }
            for name, value in [("status", status), ("kind", kind), ("cursor", cursor)]:
                if value is not None:
                    params[name] = value
            page = self._get_json("/v1/jobs", params=params)
            for job in page["data"]:
                yield job
                if remaining is not None:
                    remaining -= 1
                    if remaining == 0:
                        return
            cursor = page.get("next_cursor")
            if cursor is None:
                return

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job (idempotent): a queued one at once, a running one at its next checkpoint
        (``cancel_requested`` is then true); a finished job is returned unchanged."""
        path = f"{_job_path(job_id)}/cancel"
        response = self._send(lambda: self._api.build_request("POST", path), idempotent=True)
        return _json_object(response)

    def events(self, job_id: str, last_event_id: str | None = None) -> Iterator[dict[str, Any]]:
        """A job's events (``GET /v1/jobs/{id}/events``), oldest first, until its terminal one.

        Each is ``{id, type, at, status, stage, attempt, progress}`` (``type``: ``created``,
        ``transition``, ``progress``, ``cancel_requested``). Starts after ``last_event_id`` if
        given. A dropped connection is reopened with ``Last-Event-ID`` (nothing is repeated or
        lost), up to ``max_retries`` times in a row.
        """
        return self._follow(job_id, last_event_id, deadline=None, timeout=None)

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        poll_s: float = 2.0,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Block until the job ends; return its final record (see :meth:`get`).

        Follows the job's event stream, falling back to polling every ``poll_s`` seconds when the
        stream is unavailable. ``on_update`` is called with the job record first, then with each
        event (or each changed record when polling); both carry ``status``, ``stage`` and
        ``progress`` (``None`` in events other than progress events).

        Raises:
            WaitTimeout: the job had not ended after ``timeout`` seconds (it keeps running).
        """
        # 1. check inputs; where the job is now
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout}")
        if poll_s <= 0:
            raise ValueError(f"poll_s must be > 0 seconds, got {poll_s}")
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.get(job_id)
        if on_update is not None:
            on_update(job)
        if job["status"] in TERMINAL_STATUSES:
            return job
        # 2. follow its events until the terminal one (the stream starts at the job's first
        #    event: those older than the record just read are already in it)
        seen_until = _timestamp(job.get("updated_at"))
        try:
            for event in self._follow(job_id, None, deadline, timeout):
                at = _timestamp(event.get("at"))
                if seen_until is not None and at is not None and at < seen_until:
                    continue
                if on_update is not None:
                    on_update(event)
            return self.get(job_id)
        except WaitTimeout:
            raise
        except GenQError as err:
            log.info("job %s: event stream unavailable (%s); polling instead", job_id, err)
        # 3. or poll it
        return self._poll(job_id, deadline, timeout, poll_s, on_update)

    def artifacts(self, job_id: str) -> builtins.list[dict[str, Any]]:
        """The job's artifacts: ``{name, kind, key, size, sha256, content_type, url}`` each, the
        ``url`` a presigned download link (no API key needed) valid for the server's expiry.
        A 409 ``not_ready`` until the job has written them."""
        artifacts: builtins.list[dict[str, Any]] = self._get_json(f"{_job_path(job_id)}/artifacts")[
            "artifacts"
        ]
        return artifacts

    def download(
        self,
        job_id: str,
        dest_dir: str | os.PathLike[str],
        *,
        names: Iterable[str] | None = None,
    ) -> builtins.list[Path]:
        """Download the job's artifacts (or only those whose name or key is in ``names``) into
        ``dest_dir``, each at its key (``model/model.safetensors``); returns their paths.

        Each file is streamed to a temporary file beside its target, checked against the
        manifest's size and sha256, then renamed into place, so a target is either complete or
        absent. A target that already matches is kept as it is. Keys that could write outside
        ``dest_dir`` (``..``, absolute, backslashes) are refused before anything is written.

        Raises:
            ValueError: a name in ``names`` is not one of the job's artifacts.
            GenQError: ``checksum_mismatch`` (nothing kept), ``unsafe_key``, or an HTTP error.
        """
        # 1. which artifacts, and where each goes: all checked before anything is written
        artifacts = self.artifacts(job_id)
        chosen = _select(artifacts, names)
        dest = Path(dest_dir)
        targets = [(artifact["key"], _safe_target(dest, artifact["key"])) for artifact in chosen]
        # 2. fetch each, checking size and sha256; URLs that expired meanwhile are renewed once
        by_key = {artifact["key"]: artifact for artifact in chosen}
        paths: builtins.list[Path] = []
        renewed = False
        for key, target in targets:
            artifact = by_key[key]
            if not _matches(target, artifact["size"], artifact["sha256"]):
                try:
                    self._fetch(artifact, target)
                except GenQError as err:
                    if err.status != 403 or renewed:
                        raise
                    renewed = True
                    by_key.update((a["key"], a) for a in self.artifacts(job_id))
                    self._fetch(by_key[key], target)
            paths.append(target)
        return paths

    # ---- uploads --------------------------------------------------------------------------------

    def upload(self, path: str | os.PathLike[str], kind: str) -> dict[str, Any]:
        """Upload a model (``.safetensors`` weights or a ``torch.export`` ``.pt2``), a calibration
        or evaluation set, or k-shot images (``.zip``/``.tar``/``.tar.gz``) for jobs to use.

        The file is streamed (multipart); the server validates it before answering. Returns the
        upload ``{id, kind, filename, format, status: "ready", size, sha256, detail, ...}``;
        a 422 ``invalid_upload`` says what is wrong with the content.
        """
        if kind not in UPLOAD_KINDS:
            raise ValueError(f"kind must be one of {', '.join(UPLOAD_KINDS)}, got {kind!r}")
        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(f"{source} does not exist or is not a file")
        # the server validates before it answers: give it longer than an ordinary read
        timeout = httpx.Timeout(self.timeout, read=self.timeout * 10)
        with open(source, "rb") as handle:
            response = self._send(
                lambda: self._api.build_request(
                    "POST",
                    "/v1/uploads",
                    params={"kind": kind},
                    files={"file": (source.name, handle, "application/octet-stream")},
                    timeout=timeout,
                ),
                idempotent=False,
            )
        return _json_object(response)

    # ---- helpers --------------------------------------------------------------------------------

    def _get_json(self, path: str, params: Mapping[str, str | int] | None = None) -> Any:
        response = self._send(
            lambda: self._api.build_request("GET", path, params=params), idempotent=True
        )
        return _json_object(response)

    def _send(
        self,
        build: Callable[[], httpx.Request],
        *,
        idempotent: bool,
        stream: bool = False,
        client: httpx.Client | None = None,
    ) -> httpx.Response:
        """Send the request ``build()`` makes, retrying transient failures; a successful response
        (still open when ``stream``), or ``GenQError``.

        Idempotent requests are retried on any transport error, 429 and 502/503/504; the others
        only when the connection could not be made. ``build`` is called once per try.
        """
        http = client or self._api
        attempt = 0
        while True:
            request = build()
            try:
                response = http.send(request, stream=stream)
            except httpx.TransportError as err:
                safe = idempotent or isinstance(err, httpx.ConnectError | httpx.ConnectTimeout)
                error = GenQError(
                    "connection_error",
                    f"{request.method} {_redact(request.url)}: {type(err).__name__}: {err}",
                    retryable=True,
                )
                if not safe or attempt >= self.max_retries:
                    raise error from err
                delay = self._backoff(attempt)
            else:
                if response.is_success:
                    return response
                if stream:
                    response.read()
                    response.close()
                error = _error_from(response)
                if not (idempotent and response.status_code in TRANSIENT_STATUSES):
                    raise error
                if attempt >= self.max_retries:
                    raise error
                retry_after = _retry_after(response)
                if retry_after is not None and retry_after > self.max_delay_s:
                    raise error
                delay = self._backoff(attempt) if retry_after is None else retry_after
            log.debug("retrying %s %s in %.2f s", request.method, request.url.path, delay)
            self._sleep(delay)
            attempt += 1

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: up to ``backoff_s * 2**attempt``, capped."""
        ceiling = min(self.max_delay_s, self.backoff_s * 2**attempt)
        return ceiling * random.uniform(0.5, 1.0)

    def _follow(
        self,
        job_id: str,
        last_event_id: str | None,
        deadline: float | None,
        timeout: float | None,
    ) -> Iterator[dict[str, Any]]:
        """The event stream, reconnecting as needed; ``WaitTimeout`` past ``deadline``."""
        path = f"{_job_path(job_id)}/events"
        last_id = last_event_id
        status = "unknown"
        failures = 0
        while True:
            # 1. (re)connect after the last event seen; reads time out at the deadline
            headers = {"Accept": "text/event-stream"}
            if last_id:
                headers["Last-Event-ID"] = last_id
            read_timeout = self.timeout
            if deadline is not None:
                read_timeout = max(0.05, min(read_timeout, deadline - time.monotonic()))
            request_timeout = httpx.Timeout(self.timeout, read=read_timeout)
            parser = _SseParser()
            try:
                response = self._send(
                    partial(
                        self._api.build_request,
                        "GET",
                        path,
                        headers=headers,
                        timeout=request_timeout,
                    ),
                    idempotent=True,
                    stream=True,
                )
                with closing(response):
                    content_type = response.headers.get("content-type", "")
                    if not content_type.startswith("text/event-stream"):
                        raise GenQError(
                            "not_event_stream",
                            f"{path} answered {content_type or 'no content type'}, "
                            "not text/event-stream",
                            status=response.status_code,
                        )
                    # 2. relay events until the terminal transition
                    for line in response.iter_lines():
                        # keep-alive pings reset the read timeout: check the deadline per line
                        _check_deadline(deadline, timeout, job_id, status)
                        sse = parser.feed(line)
                        if sse is None:
                            continue
                        event = sse.job_event()
                        last_id = sse.id or last_id
                        status = str(event.get("status", status))
                        failures = 0
                        yield event
                        if event.get("type") == "transition" and status in TERMINAL_STATUSES:
                            return
                # 3. the server ended the stream without a terminal event: done if the job is
                #    (its terminal event was trimmed), else reconnect after the last event
                job = self.get(job_id)
                status = job["status"]
                if status in TERMINAL_STATUSES:
                    return
                delay = parser.retry_s if parser.retry_s is not None else self.backoff_s
            except httpx.TransportError as err:
                # a dropped connection (or a read timeout): resume after the last event seen
                _check_deadline(deadline, timeout, job_id, status)
                failures += 1
                if failures > self.max_retries:
                    raise GenQError(
                        "connection_error",
                        f"the event stream of {job_id} dropped {failures} times in a row: {err}",
                        retryable=True,
                    ) from err
                log.debug("event stream of %s dropped (%s); reconnecting", job_id, err)
                delay = (
                    parser.retry_s if parser.retry_s is not None else self._backoff(failures - 1)
                )
            _check_deadline(deadline, timeout, job_id, status)
            if deadline is not None:
                delay = min(delay, max(0.0, deadline - time.monotonic()))
            self._sleep(delay)

    def _poll(
        self,
        job_id: str,
        deadline: float | None,
        timeout: float | None,
        poll_s: float,
        on_update: Callable[[dict[str, Any]], None] | None,
    ) -> dict[str, Any]:
        """GET the job every ``poll_s`` seconds until it ends (or the deadline)."""
        seen: str | None = None
        while True:
            job = self.get(job_id)
            if on_update is not None and job.get("updated_at") != seen:
                on_update(job)
            seen = job.get("updated_at")
            if job["status"] in TERMINAL_STATUSES:
                return job
            _check_deadline(deadline, timeout, job_id, job["status"])
            delay = poll_s if deadline is None else min(poll_s, deadline - time.monotonic())
            self._sleep(max(0.0, delay))

    def _fetch(self, artifact: Mapping[str, Any], target: Path) -> None:
        """Download one artifact to ``target`` via a checked temporary file; a transfer that
        breaks off is started again (up to ``max_retries`` times)."""
        size, sha256, key = int(artifact["size"]), str(artifact["sha256"]), artifact["key"]
        target.parent.mkdir(parents=True, exist_ok=True)
        attempt = 0
        while True:
            fd, tmp_name = tempfile.mkstemp(
                dir=target.parent, prefix=f".{target.name}.", suffix=".part"
            )
            tmp = Path(tmp_name)
            try:
                digest, received = hashlib.sha256(), 0
                with os.fdopen(fd, "wb") as out:
                    response = self._send(
                        lambda: self._storage.build_request("GET", artifact["url"]),
                        idempotent=True,
                        stream=True,
                        client=self._storage,
                    )
                    with closing(response):
                        for chunk in response.iter_bytes(_CHUNK_BYTES):
                            digest.update(chunk)
                            received += len(chunk)
                            out.write(chunk)
                if received != size or digest.hexdigest() != sha256:
                    raise GenQError(
                        "checksum_mismatch",
                        f"artifact {key}: got {received} bytes with sha256 {digest.hexdigest()}, "
                        f"the manifest says {size} bytes with sha256 {sha256}; nothing was kept",
                    )
                os.replace(tmp, target)
                return
            except httpx.TransportError as err:
                tmp.unlink(missing_ok=True)
                if attempt >= self.max_retries:
                    raise GenQError(
                        "connection_error", f"downloading {key}: {err}", retryable=True
                    ) from err
                self._sleep(self._backoff(attempt))
                attempt += 1
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise


@dataclass
class _SseEvent:
    id: str | None
    type: str
    data: str

    def job_event(self) -> dict[str, Any]:
        """The event's JSON data, with ``id`` and ``type`` from the SSE fields if it lacks them."""
        try:
            parsed = json.loads(self.data)
        except json.JSONDecodeError:
            parsed = None
        event: dict[str, Any] = parsed if isinstance(parsed, dict) else {"data": self.data}
        if self.id is not None:
            event.setdefault("id", self.id)
        event.setdefault("type", self.type)
        return event


class _SseParser:
    """Server-sent events, line by line, as the HTML standard parses them: ``data`` lines are
    joined with newlines, the ``id`` carries over to later events, ``:`` lines are comments,
    a blank line ends an event, and ``retry`` sets the reconnection delay."""

    def __init__(self) -> None:
        self.last_id: str | None = None
        self.retry_s: float | None = None
        self._type = ""
        self._data: list[str] = []

    def feed(self, line: str) -> _SseEvent | None:
        """Take one line (without its end); the event it completes, if any."""
        if not line:
            event = None
            if self._data:
                event = _SseEvent(self.last_id, self._type or "message", "\n".join(self._data))
            self._type, self._data = "", []
            return event
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._type = value
        elif name == "id" and "\x00" not in value:
            self.last_id = value
        elif name == "retry" and value.isdigit():
            self.retry_s = int(value) / 1000
        return None


def _job_path(job_id: str) -> str:
    if not job_id:
        raise ValueError("a job id is required")
    return f"/v1/jobs/{quote(job_id, safe='')}"


def _json_object(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as err:
        raise GenQError(
            "invalid_response",
            f"{response.request.method} {response.request.url.path} answered "
            f"{response.status_code} with a body that is not JSON",
            status=response.status_code,
        ) from err


def _error_from(response: httpx.Response) -> GenQError:
    """The API's error body as a ``GenQError``; anything else (a proxy's page, S3's XML) as
    ``http_<status>`` with the start of the body."""
    status = response.status_code
    try:
        error = response.json()["error"]
        return GenQError(
            str(error["code"]),
            str(error["message"]),
            bool(error.get("retryable", False)),
            status,
            fields=error.get("fields"),
        )
    except (ValueError, KeyError, TypeError):
        text = " ".join(response.text.split())[:300] or response.reason_phrase
        return GenQError(f"http_{status}", text, status in TRANSIENT_STATUSES, status)


def _retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), ``None`` if absent/invalid."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _check_deadline(
    deadline: float | None, timeout: float | None, job_id: str, status: str
) -> None:
    if deadline is not None and timeout is not None and time.monotonic() >= deadline:
        raise WaitTimeout(job_id, timeout, status)


def _select(
    artifacts: builtins.list[dict[str, Any]], names: Iterable[str] | None
) -> builtins.list[dict[str, Any]]:
    """The artifacts whose name or key is in ``names`` (all of them for ``None``)."""
    if names is None:
        return artifacts
    wanted = builtins.list(dict.fromkeys(names))
    known = {a["name"] for a in artifacts} | {a["key"] for a in artifacts}
    missing = [name for name in wanted if name not in known]
    if missing:
        listing = ", ".join(f"{a['name']} ({a['key']})" for a in artifacts) or "none"
        raise ValueError(f"no artifact named {', '.join(missing)}; the job has: {listing}")
    return [a for a in artifacts if a["name"] in wanted or a["key"] in wanted]


def _safe_target(dest: Path, key: str) -> Path:
    """Where the artifact ``key`` goes under ``dest``; ``unsafe_key`` for any key that could
    land elsewhere (absolute, ``..``, empty parts, backslashes, drive letters, control chars)
    or that resolves outside ``dest`` through a symlink."""
    parts = key.split("/")
    if not key or _UNSAFE_KEY_CHARS.search(key) or any(part in ("", ".", "..") for part in parts):
        raise GenQError("unsafe_key", f"refusing to write artifact key {key!r} outside {dest}")
    target = dest.joinpath(*parts)
    root = dest.resolve()
    if not target.resolve().is_relative_to(root):
        raise GenQError("unsafe_key", f"artifact key {key!r} resolves outside {dest}")
    return target


def _matches(path: Path, size: int, sha256: str) -> bool:
    """Whether ``path`` is a file with this size and sha256 (an earlier complete download)."""
    if not path.is_file() or path.stat().st_size != size:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest() == sha256


def _timestamp(value: Any) -> datetime | None:
    """An ISO-8601 time from the API (``None`` if absent or not one)."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _redact(url: httpx.URL) -> str:
    """A URL for messages, without its query (presigned signatures live there)."""
    return str(url.copy_with(query=None))
