"""``genq stack``: the distributed topology as local processes, started, used, listed and stopped
through the real command; only the processes it recorded are ever stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from genq_core.client import GenQClient
from services.stack import STATE_FILE, ComponentState, LocalStack, StackError, StackState
from tests.services.workers.test_runner import genq_body

REPO_ROOT = Path(__file__).resolve().parents[2]
GENQ = str(Path(sys.executable).parent / "genq")
TINY_JOB = genq_body()


def genq_stack(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENQ_")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [GENQ, "stack", *args, "--dir", str(folder)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_up_runs_a_job_then_down_stops_exactly_what_it_started(tmp_path: Path):
    folder = tmp_path / "stack"
    started = genq_stack(folder, "up")
    try:
        assert started.returncode == 0, started.stderr + started.stdout
        state = StackState.load(folder / STATE_FILE)
        names = [c.name for c in state.components]
        assert names == ["redis", "s3", "ray-head", "ray-worker-0", "dispatcher", "api"]
        status = genq_stack(folder, "status")
        assert status.returncode == 0 and status.stdout.count("running") == 6
        again = genq_stack(folder, "up")
        assert again.returncode == 1 and "already runs" in again.stderr

        # a job through the stack, with the client settings it wrote
        env = LocalStack(folder).env()
        with GenQClient(env["GENQ_SERVER"], env["GENQ_API_KEY"]) as client:
            job_id = client.submit(TINY_JOB)["id"]
            final = client.wait(job_id, timeout=300)
        assert final["status"] == "succeeded", final
        assert oct((folder / "stack.env").stat().st_mode & 0o777) == "0o600"
    finally:
        stopped = genq_stack(folder, "down")
    assert stopped.returncode == 0, stopped.stderr
    assert "api" in stopped.stdout and "redis" in stopped.stdout
    for component in state.components:  # every process it started is gone
        assert not Path(f"/proc/{component.pid}").exists() or _zombie(component.pid)
    assert state.ray_temp_dir and not Path(state.ray_temp_dir).exists()
    after = genq_stack(folder, "status")
    assert after.returncode == 1 and "no stack" in after.stdout


def test_down_leaves_a_process_whose_pid_was_reused_alone(tmp_path: Path):
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        folder = tmp_path / "stack"
        folder.mkdir()
        # the recorded start time is not the bystander's: its PID now belongs to someone else
        StackState(components=[ComponentState("redis", bystander.pid, 1, "x.log")]).save(
            folder / STATE_FILE
        )
        stack = LocalStack(folder)

        assert [running for _, running in stack.status()] == [False]
        assert stack.down() == []
        time.sleep(0.2)
        assert bystander.poll() is None
        assert not (folder / STATE_FILE).exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_a_failing_start_stops_what_was_started_and_names_it(tmp_path: Path):
    stack = LocalStack(tmp_path / "stack", start_timeout_s=30)
    stack._bin = tmp_path / "no-bin"  # where `ray` and `genq` are looked up: nothing there

    with pytest.raises(StackError, match=r"ray-head could not start: .*no-bin/ray"):
        stack.up()
    state = json.loads((tmp_path / "stack" / STATE_FILE).read_text())
    assert [c["name"] for c in state["components"]][:2] == ["redis", "s3"]
    assert all(not running for _, running in stack.status())


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
