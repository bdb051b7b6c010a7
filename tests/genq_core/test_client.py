"""``GenQClient`` against scripted servers (``httpx.MockTransport``): error mapping, retries and
Retry-After, cursors, server-sent events with reconnects, waiting, checked downloads, uploads."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from genq_core.client import GenQClient, GenQError, WaitTimeout
from tests.support.imports import loaded_modules

BASE = "http://genq.test"
KEY = "secret-key"
JOB = "job_01HZZZZZZZZZZZZZZZZZZZZZZZ"

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """A scripted server: answers each request with the next response of its route's script and
    keeps every request it saw."""

    def __init__(self, routes: dict[tuple[str, str], list[Handler | httpx.Response]]) -> None:
        self.routes = routes
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        script = self.routes.get((request.method, request.url.path))
        if not script:
            raise AssertionError(f"unexpected {request.method} {request.url}")
        answer = script.pop(0) if len(script) > 1 else script[0]
        return answer(request) if callable(answer) else answer

    def seen(self, method: str, path: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and r.url.path == path]


def make_client(server: Recorder, sleeps: list[float] | None = None, **kwargs: Any) -> GenQClient:
    record = sleeps.append if sleeps is not None else (lambda _: None)
    return GenQClient(BASE, KEY, transport=httpx.MockTransport(server), sleep=record, **kwargs)


def error(status: int, code: str, retryable: bool = False, **headers: str) -> httpx.Response:
    body = {"error": {"code": code, "message": f"{code} happened", "retryable": retryable}}
    return httpx.Response(status, json=body, headers=headers)


def job(status: str = "running", **fields: Any) -> dict[str, Any]:
    return {
        "id": JOB,
        "kind": "genq",
        "status": status,
        "stage": fields.pop("stage", None),
        "progress": fields.pop("progress", {"stages": {}}),
        "attempt": 1,
        "cancel_requested": False,
        "error": None,
        "created_at": "2025-01-01T00:00:00Z",
        "updated_at": fields.pop("updated_at", "2025-01-01T00:00:01Z"),
        **fields,
    }


def sse(*events: dict[str, Any]) -> bytes:
    """Events as the API sends them: id, event and one JSON data line each."""
    chunks = [
        f"id: {e['id']}\nevent: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events
    ]
    return b"".join(chunks)


def event(n: int, type_: str, status: str, stage: str | None = None) -> dict[str, Any]:
    return {"id": f"{n}-0", "type": type_, "status": status, "stage": stage, "attempt": 1}


# ---- errors and retries -------------------------------------------------------------------------


def test_api_errors_become_genq_errors_with_code_message_retryable_and_status() -> None:
    body = {
        "error": {
            "code": "invalid_request",
            "message": "quant.weight_bits: Input should be less than or equal to 8",
            "retryable": False,
            "fields": [{"field": "quant.weight_bits", "message": "Input should be ..."}],
        }
    }
    server = Recorder(
        {
            ("POST", "/v1/jobs"): [httpx.Response(422, json=body)],
            ("GET", f"/v1/jobs/{JOB}"): [error(404, "not_found")],
        }
    )
    with make_client(server) as client:
        with pytest.raises(GenQError) as invalid:
            client.submit({"kind": "genq"})
        with pytest.raises(GenQError) as missing:
            client.get(JOB)

    assert invalid.value.code == "invalid_request" and invalid.value.status == 422
    assert invalid.value.message.startswith("quant.weight_bits:")
    assert invalid.value.fields[0]["field"] == "quant.weight_bits"
    assert invalid.value.is_user_error and not invalid.value.retryable
    assert (missing.value.code, missing.value.status) == ("not_found", 404)
    assert str(missing.value) == "not_found: not_found happened"
    assert len(server.requests) == 2  # 4xx are never retried
    assert server.requests[0].headers["Authorization"] == f"Bearer {KEY}"


def test_submit_retries_transient_failures_with_one_idempotency_key() -> None:
    accepted = {"id": JOB, "kind": "genq", "status": "queued"}
    server = Recorder(
        {
            ("POST", "/v1/jobs"): [
                error(503, "unavailable", retryable=True),
                httpx.Response(502, text="<html>bad gateway</html>"),
                httpx.Response(202, json=accepted),
            ]
        }
    )
    sleeps: list[float] = []
    with make_client(server, sleeps, backoff_s=0.5) as client:
        assert client.submit({"kind": "genq"}) == accepted

    keys = {r.headers["Idempotency-Key"] for r in server.requests}
    assert len(server.requests) == 3 and len(keys) == 1
    assert json.loads(server.requests[0].content) == {"kind": "genq"}
    # exponential backoff with jitter: within [0.5, 1] x 0.5 * 2**attempt
    assert 0.25 <= sleeps[0] <= 0.5 and 0.5 <= sleeps[1] <= 1.0


def test_a_given_idempotency_key_is_sent_and_a_malformed_one_refused() -> None:
    server = Recorder({("POST", "/v1/jobs"): [httpx.Response(202, json={"id": JOB})]})
    with make_client(server) as client:
        client.submit({"kind": "genq"}, idempotency_key="nightly-2025-01-01")
        with pytest.raises(ValueError, match="idempotency key"):
            client.submit({"kind": "genq"}, idempotency_key="has spaces")
    assert server.requests[0].headers["Idempotency-Key"] == "nightly-2025-01-01"


def test_retry_after_is_honoured_in_seconds_and_as_a_date() -> None:
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    server = Recorder(
        {
            ("POST", "/v1/jobs"): [
                error(429, "queue_full", retryable=True, **{"Retry-After": "7"}),
                error(429, "queue_full", retryable=True, **{"Retry-After": later}),
                httpx.Response(202, json={"id": JOB}),
            ]
        }
    )
    sleeps: list[float] = []
    with make_client(server, sleeps) as client:
        client.submit({"kind": "genq"})
    assert sleeps[0] == 7.0
    assert 25.0 <= sleeps[1] <= 30.0


def test_a_retry_after_longer_than_max_delay_is_raised_not_waited_for() -> None:
    server = Recorder(
        {("POST", "/v1/jobs"): [error(429, "queue_full", True, **{"Retry-After": "3600"})]}
    )
    sleeps: list[float] = []
    with make_client(server, sleeps, max_delay_s=60) as client, pytest.raises(GenQError) as err:
        client.submit({"kind": "genq"})
    assert (err.value.code, err.value.status, err.value.retryable) == ("queue_full", 429, True)
    assert not err.value.is_user_error
    assert sleeps == [] and len(server.requests) == 1


def test_retries_are_bounded() -> None:
    server = Recorder({("GET", f"/v1/jobs/{JOB}"): [error(503, "unavailable", True)]})
    sleeps: list[float] = []
    with make_client(server, sleeps, max_retries=3) as client, pytest.raises(GenQError) as err:
        client.get(JOB)
    assert err.value.code == "unavailable" and len(server.requests) == 4 and len(sleeps) == 3


def test_connect_errors_are_retried_and_reported_without_presigned_signatures() -> None:
    calls = 0

    def flaky(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json=job())

    server = Recorder({("GET", f"/v1/jobs/{JOB}"): [flaky]})
    with make_client(server) as client:
        assert client.get(JOB)["status"] == "running"

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with (
        make_client(Recorder({("GET", f"/v1/jobs/{JOB}"): [down]}), max_retries=1) as client,
        pytest.raises(GenQError) as err,
    ):
        client.get(JOB)
    assert err.value.code == "connection_error" and err.value.status is None
    assert "connection refused" in err.value.message


def test_an_upload_is_retried_when_nothing_was_sent_but_not_after_sending(tmp_path: Path) -> None:
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights" * 1000)
    bodies: list[bytes] = []
    answers: list[str] = ["connect", "ok", "read"]

    def upload(request: httpx.Request) -> httpx.Response:
        what = answers.pop(0)
        if what == "connect":
            raise httpx.ConnectError("refused", request=request)
        bodies.append(request.read())
        if what == "read":
            raise httpx.ReadError("connection reset", request=request)
        return httpx.Response(201, json={"id": "upl_1", "status": "ready"})

    server = Recorder({("POST", "/v1/uploads"): [upload]})
    with make_client(server) as client:
        assert client.upload(model, "model")["id"] == "upl_1"
        with pytest.raises(GenQError, match="connection reset"):
            client.upload(model, "model")
        with pytest.raises(ValueError, match="kind"):
            client.upload(model, "weights")
        with pytest.raises(FileNotFoundError):
            client.upload(tmp_path / "missing.safetensors", "model")

    assert len(server.requests) == 3  # connect error retried once; the read error not at all
    assert server.requests[1].url.params["kind"] == "model"
    assert server.requests[1].headers["content-type"].startswith("multipart/form-data")
    assert b'filename="model.safetensors"' in bodies[0] and b"weights" * 1000 in bodies[0]


# ---- listing ------------------------------------------------------------------------------------


def test_list_follows_cursors_up_to_the_limit() -> None:
    jobs = [job(id=f"job_{i:026d}") for i in range(5)]
    pages = {
        None: {"data": jobs[:2], "next_cursor": "c1"},
        "c1": {"data": jobs[2:3], "next_cursor": "c2"},  # a filtered page may be short
        "c2": {"data": jobs[3:], "next_cursor": None},
    }

    def page(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=pages[request.url.params.get("cursor")])

    server = Recorder({("GET", "/v1/jobs"): [page]})
    with make_client(server) as client:
        every = [j["id"] for j in client.list(status="running", kind="genq", limit=None)]
        first_three = [j["id"] for j in client.list(limit=3)]

    assert every == [j["id"] for j in jobs]
    assert first_three == every[:3]
    params = [dict(r.url.params) for r in server.requests]
    assert params[0] == {"limit": "100", "status": "running", "kind": "genq"}
    assert params[1]["cursor"] == "c1"
    assert params[3] == {"limit": "3"} and params[4] == {"limit": "1", "cursor": "c1"}
    assert len(server.requests) == 5  # the limited listing stops without fetching page 3


# ---- events and wait ----------------------------------------------------------------------------


def test_events_parse_the_sse_format() -> None:
    stream = (
        b": ping\n\n"
        b"retry: 250\r\n"
        b'id: 1-0\nevent: created\ndata: {"status": "queued",\ndata:  "attempt": 0}\n\n'
        b"event: note\ndata:plain text\n\n"  # no id: the last one carries over; no JSON
        b"id: 2-0\nevent: transition\ndata: "
        + json.dumps(event(2, "transition", "failed")).encode()
        + b"\n\n"
    )
    server = Recorder(
        {
            ("GET", f"/v1/jobs/{JOB}/events"): [
                httpx.Response(200, content=stream, headers={"content-type": "text/event-stream"})
            ]
        }
    )
    with make_client(server) as client:
        events = list(client.events(JOB))

    assert events[0] == {"status": "queued", "attempt": 0, "id": "1-0", "type": "created"}
    assert events[1] == {"data": "plain text", "id": "1-0", "type": "note"}
    assert events[2]["status"] == "failed" and events[2]["id"] == "2-0"
    assert server.requests[0].headers["Accept"] == "text/event-stream"


def test_events_reconnect_with_last_event_id_after_a_dropped_connection() -> None:
    first = [event(1, "created", "queued"), event(2, "transition", "running")]
    rest = [event(3, "progress", "running", "generating"), event(4, "transition", "succeeded")]

    def dropped() -> Iterator[bytes]:
        yield sse(*first)
        yield b'id: 3-0\nevent: progress\ndata: {"stat'  # cut off mid-event
        raise httpx.ReadError("connection reset")

    answers = [
        lambda request: httpx.Response(
            200, content=dropped(), headers={"content-type": "text/event-stream"}
        ),
        lambda request: httpx.Response(
            200, content=sse(*rest), headers={"content-type": "text/event-stream"}
        ),
    ]
    server = Recorder({("GET", f"/v1/jobs/{JOB}/events"): list(answers)})
    sleeps: list[float] = []
    with make_client(server, sleeps) as client:
        ids = [e["id"] for e in client.events(JOB)]

    assert ids == ["1-0", "2-0", "3-0", "4-0"]  # nothing lost, nothing repeated
    assert "Last-Event-ID" not in server.requests[0].headers
    assert server.requests[1].headers["Last-Event-ID"] == "2-0"
    assert len(sleeps) == 1


def test_events_give_up_after_max_retries_drops_in_a_row() -> None:
    def dropping(request: httpx.Request) -> httpx.Response:
        def body() -> Iterator[bytes]:
            yield b": ping\n\n"
            raise httpx.ReadError("connection reset")

        return httpx.Response(200, content=body(), headers={"content-type": "text/event-stream"})

    server = Recorder({("GET", f"/v1/jobs/{JOB}/events"): [dropping]})
    sleeps: list[float] = []
    with make_client(server, sleeps, max_retries=2) as client, pytest.raises(GenQError) as err:
        list(client.events(JOB))
    assert err.value.code == "connection_error" and "dropped 3 times in a row" in err.value.message
    assert len(server.requests) == 3 and len(sleeps) == 2


def test_a_stream_that_ends_without_the_terminal_event_asks_the_job() -> None:
    # the terminal event was already trimmed from the stream: the job record says it ended
    server = Recorder(
        {
            ("GET", f"/v1/jobs/{JOB}/events"): [
                httpx.Response(
                    200,
                    content=sse(event(5, "progress", "running")),
                    headers={"content-type": "text/event-stream"},
                )
            ],
            ("GET", f"/v1/jobs/{JOB}"): [httpx.Response(200, json=job("canceled"))],
        }
    )
    with make_client(server) as client:
        assert [e["id"] for e in client.events(JOB)] == ["5-0"]


def test_wait_follows_events_and_returns_the_final_job() -> None:
    progress = {"stages": {"generating": {"done": 4, "total": 8}}, "images_generated": 4}
    events = [
        event(1, "created", "queued"),
        {**event(2, "progress", "running", "generating"), "progress": progress},
        event(3, "transition", "succeeded", "generating"),
    ]
    server = Recorder(
        {
            ("GET", f"/v1/jobs/{JOB}"): [
                httpx.Response(200, json=job("queued")),
                httpx.Response(200, json=job("succeeded")),
            ],
            ("GET", f"/v1/jobs/{JOB}/events"): [
                httpx.Response(
                    200, content=sse(*events), headers={"content-type": "text/event-stream"}
                )
            ],
        }
    )
    updates: list[dict[str, Any]] = []
    with make_client(server) as client:
        final = client.wait(JOB, on_update=updates.append)

    assert final["status"] == "succeeded"
    assert [u["status"] for u in updates] == ["queued", "queued", "running", "succeeded"]
    assert updates[2]["progress"]["images_generated"] == 4


def test_wait_skips_replayed_events_older_than_the_job_it_read_first() -> None:
    at = "2025-01-01T00:00:{:02d}Z".format
    events = [
        {**event(1, "created", "queued"), "at": at(0)},
        {**event(2, "transition", "running"), "at": at(1)},
        {**event(3, "progress", "running", "generating"), "at": at(5)},
        {**event(4, "transition", "succeeded", "generating"), "at": at(9)},
    ]
    server = Recorder(
        {
            ("GET", f"/v1/jobs/{JOB}"): [
                httpx.Response(200, json=job("running", stage="generating", updated_at=at(5))),
                httpx.Response(200, json=job("succeeded")),
            ],
            ("GET", f"/v1/jobs/{JOB}/events"): [
                httpx.Response(
                    200, content=sse(*events), headers={"content-type": "text/event-stream"}
                )
            ],
        }
    )
    updates: list[dict[str, Any]] = []
    with make_client(server) as client:
        client.wait(JOB, on_update=updates.append)

    # the record, then only what is not older than it: no "queued" after "running"
    assert [u["status"] for u in updates] == ["running", "running", "succeeded"]


def test_wait_polls_when_the_event_stream_is_unavailable() -> None:
    records = [job("queued"), job("running", updated_at="t2"), job("running", updated_at="t2")]
    records.append(job("failed", updated_at="t3"))
    server = Recorder(
        {
            ("GET", f"/v1/jobs/{JOB}"): [httpx.Response(200, json=r) for r in records],
            ("GET", f"/v1/jobs/{JOB}/events"): [error(501, "not_implemented")],
        }
    )
    updates: list[dict[str, Any]] = []
    sleeps: list[float] = []
    with make_client(server, sleeps) as client:
        final = client.wait(JOB, poll_s=0.25, on_update=updates.append)

    assert final["status"] == "failed"
    # the first record, then each change (the unchanged record is not repeated)
    assert [u["status"] for u in updates] == ["queued", "running", "failed"]
    assert sleeps == [0.25, 0.25]


def test_wait_times_out_and_names_the_last_status() -> None:
    server = Recorder(
        {
            ("GET", f"/v1/jobs/{JOB}"): [httpx.Response(200, json=job("running"))],
            ("GET", f"/v1/jobs/{JOB}/events"): [
                httpx.Response(200, json={"not": "sse"}, headers={"content-type": "text/html"})
            ],
        }
    )
    with (
        GenQClient(BASE, KEY, transport=httpx.MockTransport(server)) as client,
        pytest.raises(WaitTimeout) as err,
    ):
        client.wait(JOB, timeout=0.2, poll_s=0.05)
    assert isinstance(err.value, TimeoutError) and err.value.code == "wait_timeout"
    assert err.value.job_status == "running" and "still running after 0.2 s" in str(err.value)


def test_wait_times_out_on_a_stream_that_only_sends_keep_alive_pings() -> None:
    def pings() -> Iterator[bytes]:
        for _ in range(200):
            time.sleep(0.01)
            yield b": ping\n\n"

    server = Recorder(
        {
            ("GET", f"/v1/jobs/{JOB}"): [httpx.Response(200, json=job("running"))],
            ("GET", f"/v1/jobs/{JOB}/events"): [
                lambda request: httpx.Response(
                    200, content=pings(), headers={"content-type": "text/event-stream"}
                )
            ],
        }
    )
    started = time.monotonic()
    with make_client(server) as client, pytest.raises(WaitTimeout):
        client.wait(JOB, timeout=0.2)
    assert time.monotonic() - started < 1.5


def test_a_finished_job_is_returned_without_following_events() -> None:
    server = Recorder({("GET", f"/v1/jobs/{JOB}"): [httpx.Response(200, json=job("succeeded"))]})
    with make_client(server) as client:
        assert client.wait(JOB)["status"] == "succeeded"
    assert len(server.requests) == 1


# ---- downloads ----------------------------------------------------------------------------------


def artifact(key: str, data: bytes, **fields: Any) -> dict[str, Any]:
    return {
        "name": key.replace("/", "-"),
        "kind": "file",
        "key": key,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "content_type": "application/octet-stream",
        "url": f"http://s3.test/results/jobs/{JOB}/{key}?X-Amz-Signature=abc",
        **fields,
    }


def storage_server(manifest: list[dict[str, Any]], objects: dict[str, bytes | Handler]) -> Recorder:
    routes: dict[tuple[str, str], list[Handler | httpx.Response]] = {
        ("GET", f"/v1/jobs/{JOB}/artifacts"): [
            httpx.Response(200, json={"job_id": JOB, "expires_at": "x", "artifacts": manifest})
        ]
    }
    for key, data in objects.items():
        answer = data if callable(data) else httpx.Response(200, content=data)
        routes[("GET", f"/results/jobs/{JOB}/{key}")] = [answer]
    return Recorder(routes)


def test_download_checks_sha256_and_keeps_the_api_key_from_the_object_store(
    tmp_path: Path,
) -> None:
    files = {"model/model.safetensors": b"weights" * 300, "report.json": b'{"top1": 0.9}'}
    server = storage_server([artifact(k, v) for k, v in files.items()], dict(files))
    with make_client(server) as client:
        paths = client.download(JOB, tmp_path / "out")

    assert paths == [tmp_path / "out" / key for key in files]
    assert all(
        path.read_bytes() == files[str(path.relative_to(tmp_path / "out"))] for path in paths
    )
    downloads = [r for r in server.requests if r.url.host == "s3.test"]
    assert len(downloads) == 2
    assert all("Authorization" not in r.headers for r in downloads)
    assert downloads[0].url.params["X-Amz-Signature"] == "abc"
    assert not list((tmp_path / "out").rglob("*.part"))


def test_download_rejects_a_sha256_mismatch_and_keeps_nothing(tmp_path: Path) -> None:
    entry = artifact("model/model.safetensors", b"the real weights")
    server = storage_server([entry], {"model/model.safetensors": b"the evil weights"})
    with make_client(server) as client, pytest.raises(GenQError) as err:
        client.download(JOB, tmp_path)

    assert err.value.code == "checksum_mismatch" and entry["sha256"] in err.value.message
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize(
    "key", ["../escape.txt", "/etc/passwd", "model/../../x", "a\\b", "C:evil", "a//b", ""]
)
def test_download_refuses_keys_that_would_leave_the_folder(tmp_path: Path, key: str) -> None:
    manifest = [artifact("report.json", b"{}"), artifact(key, b"x")]
    server = storage_server(manifest, {"report.json": b"{}"})
    with make_client(server) as client, pytest.raises(GenQError) as err:
        client.download(JOB, tmp_path / "out")
    assert err.value.code == "unsafe_key"
    assert not (tmp_path / "out").exists()  # refused before anything was written
    assert all(r.url.host != "s3.test" for r in server.requests)


def test_download_refuses_a_symlink_out_of_the_folder(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "model").symlink_to(tmp_path / "elsewhere")
    server = storage_server([artifact("model/w.bin", b"x")], {"model/w.bin": b"x"})
    with make_client(server) as client, pytest.raises(GenQError, match="resolves outside"):
        client.download(JOB, tmp_path / "out")


def test_download_by_name_skips_complete_files_and_retries_a_broken_transfer(
    tmp_path: Path,
) -> None:
    data = b"0123456789" * 1000
    attempts = 0

    def flaky(request: httpx.Request) -> httpx.Response:
        nonlocal attempts
        attempts += 1

        def body() -> Iterator[bytes]:
            yield data[:100]
            if attempts == 1:
                raise httpx.ReadError("connection reset")
            yield data[100:]

        return httpx.Response(200, content=body())

    manifest = [artifact("report.json", b"{}"), artifact("model/w.bin", data)]
    server = storage_server(manifest, {"report.json": b"{}", "model/w.bin": flaky})
    with make_client(server) as client:
        assert client.download(JOB, tmp_path, names=["model-w.bin"]) == [tmp_path / "model/w.bin"]
        # a second download finds it complete and fetches nothing
        assert client.download(JOB, tmp_path, names=["model/w.bin"]) == [tmp_path / "model/w.bin"]
        with pytest.raises(ValueError, match="no artifact named nope; the job has: report.json"):
            client.download(JOB, tmp_path, names=["nope"])

    assert (tmp_path / "model/w.bin").read_bytes() == data and attempts == 2
    assert not (tmp_path / "report.json").exists()


def test_download_renews_expired_urls_once(tmp_path: Path) -> None:
    data = b"weights"
    expired = artifact("model/w.bin", data)
    fresh = artifact("model/w.bin", data, url=f"http://s3.test/results/jobs/{JOB}/model/w.bin?v=2")
    server = Recorder(
        {
            ("GET", f"/v1/jobs/{JOB}/artifacts"): [
                httpx.Response(200, json={"artifacts": [expired]}),
                httpx.Response(200, json={"artifacts": [fresh]}),
            ],
            ("GET", f"/results/jobs/{JOB}/model/w.bin"): [
                lambda r: httpx.Response(403 if "v" not in r.url.params else 200, content=data)
            ],
        }
    )
    with make_client(server) as client:
        assert client.download(JOB, tmp_path) == [tmp_path / "model/w.bin"]
    assert len(server.seen("GET", f"/v1/jobs/{JOB}/artifacts")) == 2


# ---- the rest -----------------------------------------------------------------------------------


def test_cancel_posts_and_job_ids_are_quoted_into_one_path_segment() -> None:
    server = Recorder(
        {
            ("POST", f"/v1/jobs/{JOB}/cancel"): [httpx.Response(200, json=job("canceled"))],
            ("GET", "/v1/jobs/../uploads"): [error(404, "not_found")],  # url.path is decoded
        }
    )
    with make_client(server) as client:
        assert client.cancel(JOB)["status"] == "canceled"
        with pytest.raises(GenQError, match="not_found"):
            client.get("../uploads")
    assert server.requests[1].url.raw_path == b"/v1/jobs/..%2Fuploads"


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="http"):
        GenQClient("genq.test", KEY)
    with pytest.raises(ValueError, match="api_key"):
        GenQClient(BASE, " ")
    with pytest.raises(ValueError, match="timeout"):
        GenQClient(BASE, KEY, timeout=0)


def test_the_client_imports_no_torch() -> None:
    heavy = ("torch", "torchvision", "timm", "diffusers", "numpy", "services")
    assert loaded_modules("import genq_core.client", heavy) == set()
