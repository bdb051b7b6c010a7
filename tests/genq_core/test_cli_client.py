"""``genq submit | status | list | cancel | wait | download | upload`` against the real API: the
FastAPI app served by uvicorn on a loopback port, on a real redis-server and a real S3 server
(JuiceFS gateway). Jobs are driven by hand through the job store's worker-side methods, and their
artifacts written to S3 as a worker writes them."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from pydantic import SecretStr

from genq_core import cli, client
from genq_core.cli import main
from services.api.app import create_app
from services.api.settings import ApiSettings, hash_api_key
from services.api.uploads import UploadKind
from services.common import keys
from services.common.jobs import JobError, JobKind, JobStatus, Stage
from services.common.jobstore import JobStore
from services.common.settings import Mode
from tests.support.api_testing import KEY_ACME, KEY_GLOBEX, bucket
from tests.support.redis_server import RedisServerInfo, redis_server
from tests.support.s3_server import S3ServerInfo, s3_server
from tests.support.upload_files import safetensors_bytes

REPO_ROOT = Path(__file__).resolve().parents[2]
GENQ = {"kind": "genq", "model": {"source": "timm", "name": "resnet18"}}


@dataclass(frozen=True)
class Service:
    url: str
    settings: ApiSettings
    store: JobStore
    s3: S3ServerInfo

    def put_artifacts(self, job_id: str, outputs: dict[str, bytes]) -> None:
        """Write ``outputs`` (keys relative to the job) and their manifest, as a worker does."""
        names = {
            keys.BucketRole.DATA: self.settings.s3_bucket_data,
            keys.BucketRole.RESULTS: self.settings.s3_bucket_results,
        }
        entries = []
        for key, data in outputs.items():
            target = bucket(self.s3, names[keys.bucket_role(key)])
            target.put_bytes(keys.job_key(job_id, key), data, "application/octet-stream")
            entries.append(
                {
                    "name": key.rsplit("/", 1)[-1].split(".")[0],
                    "key": key,
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "content_type": "application/octet-stream",
                }
            )
        manifest = json.dumps({"artifacts": entries}).encode()
        results = bucket(self.s3, names[keys.bucket_role(keys.ARTIFACTS_MANIFEST)])
        results.put_bytes(keys.job_key(job_id, keys.ARTIFACTS_MANIFEST), manifest)


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on a free loopback port; stop it on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with (
        redis_server(tmp_path_factory.mktemp("redis"), appendonly=False) as redis_info,
        s3_server(tmp_path_factory.mktemp("s3")) as s3_info,
    ):
        settings = _settings(redis_info, s3_info)
        worker_redis = redis_info.client(socket_timeout=5)
        try:
            with serve(create_app(settings)) as url:
                yield Service(url, settings, JobStore(worker_redis, settings.redis_prefix), s3_info)
        finally:
            worker_redis.close()


@pytest.fixture
def genq(
    service: Service, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, str, str]]:
    """``genq(*args)`` -> (exit code, stdout, stderr), as tenant acme of the test server."""
    monkeypatch.setenv("GENQ_SERVER", service.url)
    monkeypatch.setenv("GENQ_API_KEY", KEY_ACME)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def request_file(tmp_path: Path, body: dict[str, Any], name: str = "job.yaml") -> str:
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text(json.dumps(body))
    else:
        import yaml

        path.write_text(yaml.safe_dump(body))
    return str(path)


# ---- submit, status, list, cancel ---------------------------------------------------------------


def test_submit_status_list_and_cancel(genq: Callable[..., tuple[int, str, str]], tmp_path: Path):
    code, out, err = genq("submit", request_file(tmp_path, GENQ))
    assert code == 0, err
    job_id = out.strip()
    assert job_id.startswith("job_") and f"genq wait {job_id}" in err

    code, out, _ = genq("status", job_id)
    assert code == 0 and out.startswith(f"{job_id}  genq  queued")
    code, out, _ = genq("status", job_id, "--json")
    job = json.loads(out)
    assert job["status"] == "queued" and job["config"]["quant"]["weight_bits"] == 4

    code, out, _ = genq("list", "--status", "queued", "--kind", "genq")
    assert code == 0 and out.splitlines()[0].split() == ["ID", "KIND", "STATUS", "STAGE", "CREATED"]
    assert any(line.startswith(job_id) for line in out.splitlines())
    code, out, _ = genq("list", "--json", "--limit", "1")
    assert [j["id"] for j in json.loads(out)] == [job_id]  # newest first

    code, out, _ = genq("cancel", job_id)
    assert code == 0 and out.strip() == f"{job_id} canceled"
    code, out, _ = genq("cancel", job_id)  # idempotent
    assert code == 0 and out.strip() == f"{job_id} canceled"
    code, out, _ = genq("list", "--status", "canceled", "--json")
    assert job_id in [j["id"] for j in json.loads(out)]


def test_idempotency_keys_and_json_requests(
    genq: Callable[..., tuple[int, str, str]], tmp_path: Path
):
    path = request_file(tmp_path, GENQ, "job.json")
    first = genq("submit", path, "--idempotency-key", "nightly-1", "--json")
    again = genq("submit", path, "--idempotency-key", "nightly-1", "--json")
    assert first[0] == again[0] == 0
    assert json.loads(first[1])["id"] == json.loads(again[1])["id"]

    other = request_file(tmp_path, {**GENQ, "quant": {"weight_bits": 8}}, "other.json")
    code, out, err = genq("submit", other, "--idempotency-key", "nightly-1")
    assert code == 2 and out == ""
    assert err.startswith("genq: error: idempotency_conflict: Idempotency-Key 'nightly-1'")


@pytest.mark.parametrize(
    ("args", "body", "code", "message"),
    [
        (("status", "job_00000000000000000000000000"), None, 2, "genq: error: not_found: "),
        (
            ("submit",),
            {**GENQ, "quant": {"weight_bits": 9}},
            2,
            "genq: error: invalid_request: quant.weight_bits: Input should be less than or equal to 8",
        ),
        (("submit",), ["not", "a", "mapping"], 2, "must hold a job request"),
        (("submit", "missing.yaml"), None, 2, "missing.yaml does not exist"),
        (("status", "job_x", "--api-key", KEY_GLOBEX + "-wrong"), None, 2, "unauthorized"),
    ],
)
def test_errors_print_the_api_code_and_message_without_a_traceback(
    genq: Callable[..., tuple[int, str, str]],
    tmp_path: Path,
    args: tuple[str, ...],
    body: Any,
    code: int,
    message: str,
):
    if body is not None:
        args = (*args, request_file(tmp_path, body, "bad.json"))
    result = genq(*args)
    assert result[0] == code
    assert message in result[2] and "Traceback" not in result[2]


def test_argument_errors_are_usage_errors(
    genq: Callable[..., tuple[int, str, str]], capsys: pytest.CaptureFixture[str]
):
    with pytest.raises(SystemExit) as exit:
        genq("list", "--status", "lost")
    assert exit.value.code == 2 and "invalid choice: 'lost'" in capsys.readouterr().err


def test_no_server_configured_is_a_usage_error(
    genq: Callable[..., tuple[int, str, str]], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("GENQ_SERVER")
    assert genq("list") == (2, "", "genq: error: no server: pass --server URL or set GENQ_SERVER\n")


def test_another_tenants_job_is_not_found(
    genq: Callable[..., tuple[int, str, str]], tmp_path: Path
):
    _, out, _ = genq("submit", request_file(tmp_path, GENQ))
    code, _, err = genq("status", out.strip(), "--api-key", KEY_GLOBEX)
    assert code == 2 and "not_found" in err


# ---- wait and download --------------------------------------------------------------------------


def test_wait_follows_a_job_to_success_then_download_checks_every_file(
    genq: Callable[..., tuple[int, str, str]],
    service: Service,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    # 1. a job, and a "worker" that runs it in the background while `genq wait` follows it
    _, out, _ = genq("submit", request_file(tmp_path, GENQ))
    job_id = out.strip()
    # the worker starts once wait has read the job (on a loaded machine that can take a while)
    read_once = threading.Event()
    get = client.GenQClient.get

    def get_and_tell(self: client.GenQClient, job: str) -> dict[str, Any]:
        record = get(self, job)
        read_once.set()
        return record

    monkeypatch.setattr(client.GenQClient, "get", get_and_tell)
    outputs = {
        "model/model.safetensors": b"quantized weights" * 500,
        "report.json": b'{"top1": 0.91}\n',
        "synthetic/manifest.jsonl": b'{"index": 0}\n',
    }
    failures: list[BaseException] = []

    def work() -> None:
        try:
            store = service.store
            assert read_once.wait(timeout=30), "genq wait never read the job"
            time.sleep(0.3)  # longer than events_block_ms: the stream waits across reads
            token = store.start_attempt(job_id)
            store.set_stage(job_id, token, Stage.GENERATING)
            for done in (4, 8):
                store.update_progress(
                    job_id, token, stage=Stage.GENERATING, done=done, total=8, images_generated=done
                )
                time.sleep(0.1)
            store.set_stage(job_id, token, Stage.FILTERING)
            store.update_progress(
                job_id, token, stage=Stage.FILTERING, done=8, total=8, images_kept=4
            )
            store.set_stage(job_id, token, Stage.QUANTIZING)
            store.update_progress(
                job_id, token, stage=Stage.QUANTIZING, done=3, total=3, blocks_reconstructed=3
            )
            service.put_artifacts(job_id, outputs)
            store.finish(job_id, token, JobStatus.SUCCEEDED, result={"model": "model/"})
        except BaseException as err:  # surfaced by the test below
            failures.append(err)

    worker = threading.Thread(target=work)
    worker.start()
    code, out, err = genq("wait", job_id, "--timeout", "30")
    worker.join()

    # 2. wait showed the stages and counters and ended with the job's final state
    assert failures == []
    assert code == 0, err
    assert out.startswith(f"{job_id}  genq  succeeded")
    assert "images 8 generated, 4 kept; 3 blocks reconstructed" in out
    lines = err.splitlines()
    # the first line is the job's state when wait connected, however far the worker got by then
    assert lines[0].split("  ")[0] in ("queued", "running")
    # each stage's last state is shown before the next one starts
    assert "running  generating 8/8  images 8 generated, 0 kept" in lines
    assert "running  quantizing 3/3  images 8 generated, 4 kept; 3 blocks reconstructed" in lines
    assert lines[-1] == "succeeded"

    # 3. download: every artifact, checked, at its key; then one by name, as JSON
    code, out, err = genq("download", job_id, "--dest", str(tmp_path / "out"))
    assert code == 0, err
    assert out.splitlines() == [str(tmp_path / "out" / key) for key in outputs]
    for key, data in outputs.items():
        assert (tmp_path / "out" / key).read_bytes() == data
    code, out, _ = genq(
        "download", job_id, "--dest", str(tmp_path / "one"), "--name", "report", "--json"
    )
    assert json.loads(out) == [str(tmp_path / "one" / "report.json")]
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["report.json"]
    code, _, err = genq("download", job_id, "--name", "nothing")
    assert code == 2 and "no artifact named nothing" in err


def test_wait_on_a_failed_job_and_a_wait_that_times_out(
    genq: Callable[..., tuple[int, str, str]], service: Service, tmp_path: Path
):
    _, out, _ = genq("submit", request_file(tmp_path, GENQ))
    failed = out.strip()
    token = service.store.start_attempt(failed)
    error = JobError(code="oom", message="out of memory")
    service.store.finish(failed, token, JobStatus.FAILED, error=error)

    code, out, _ = genq("wait", failed, "-q")
    assert code == 1
    assert "failed" in out.splitlines()[0] and "error     oom: out of memory" in out
    code, _, err = genq("download", failed)
    assert code == 2 and "not_ready" in err  # it ended without artifacts: a final 409

    # nobody runs this one: `submit --wait` gives up after its timeout, and says so
    started = time.monotonic()
    code, out, err = genq("submit", request_file(tmp_path, GENQ), "--wait", "--timeout", "1")
    assert code == 1 and time.monotonic() - started < 10
    assert "genq: error: wait_timeout: job job_" in err and "still queued after 1 s" in err


# ---- uploads ------------------------------------------------------------------------------------


def test_upload_a_model_and_submit_a_job_that_uses_it(
    genq: Callable[..., tuple[int, str, str]], tmp_path: Path
):
    model = tmp_path / "resnet.safetensors"
    model.write_bytes(safetensors_bytes())
    code, out, err = genq("upload", str(model), "--kind", "model")
    assert code == 0, err
    upload_id = out.strip()
    assert f"uploaded resnet.safetensors: model (safetensors), {model.stat().st_size} bytes" in err

    code, out, _ = genq("upload", str(model), "--kind", "model", "--json")
    upload = json.loads(out)
    assert upload["status"] == "ready"
    assert upload["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()

    body = {
        "kind": "genq",
        "model": {"source": "upload", "upload_id": upload_id, "name": "resnet18"},
    }
    code, out, err = genq("submit", request_file(tmp_path, body))
    assert code == 0, err

    pickle = tmp_path / "model.pt"
    pickle.write_bytes(b"not allowed")
    code, _, err = genq("upload", str(pickle), "--kind", "model")
    assert code == 2 and "pickled checkpoints" in err


# ---- no torch, and the parser's mirrors ---------------------------------------------------------


def test_the_server_commands_import_no_torch(service: Service):
    code = (
        "import json, sys\n"
        "from genq_core.cli import main\n"
        "code = main(['list', '--json', '--limit', '1'])\n"
        "heavy = ('torch', 'torchvision', 'timm', 'diffusers', 'numpy', 'tqdm', 'services')\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "print(json.dumps({'code': code, 'loaded': loaded}), file=sys.stderr)\n"
    )
    env = {**os.environ, "GENQ_SERVER": service.url, "GENQ_API_KEY": KEY_ACME}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(done.stderr.strip().splitlines()[-1]) == {"code": 0, "loaded": []}
    assert isinstance(json.loads(done.stdout), list)


def test_the_parsers_mirrors_match_what_they_mirror():
    from genq_core.quant import PRESETS, ReconstructionConfig

    assert tuple(sorted(PRESETS)) == cli._PRESET_NAMES
    assert ReconstructionConfig.iters == cli._RECONSTRUCTION_ITERS
    assert ReconstructionConfig.batch_size == cli._RECONSTRUCTION_BATCH_SIZE
    assert tuple(s.value for s in JobStatus) == cli._JOB_STATUSES
    assert tuple(k.value for k in JobKind) == cli._JOB_KINDS
    assert tuple(s.value for s in Stage) == cli._STAGES
    assert cli._UPLOAD_KINDS == client.UPLOAD_KINDS == tuple(k.value for k in UploadKind)
    assert {"succeeded", "failed", "canceled"} == client.TERMINAL_STATUSES


def _settings(redis_info: RedisServerInfo, s3_info: S3ServerInfo) -> ApiSettings:
    return ApiSettings(
        mode=Mode.DISTRIBUTED,
        redis_url=redis_info.url,
        s3_endpoint=s3_info.endpoint,
        s3_access_key=SecretStr(s3_info.access_key),
        s3_secret_key=SecretStr(s3_info.secret_key),
        api_keys=[f"{hash_api_key(KEY_ACME)}=acme", f"{hash_api_key(KEY_GLOBEX)}=globex"],
        events_block_ms=200,
    )
