"""Server processes for tests: start one on a free loopback port, wait until it is ready, stop it.

The test servers (:mod:`tests.support.redis_server`, :mod:`tests.support.s3_server`,
:mod:`tests.support.ray_cluster`) run as our children in their own session, with their output in a
log file in the caller's folder, and are stopped by the PID we hold: never by name, so that other
sessions' servers on the same machine are left alone.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

__all__ = [
    "free_port",
    "log_tail",
    "start_on_free_port",
    "start_process",
    "stop_process",
    "wait_until",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, never the same twice in a session.

    It is drawn below the kernel's ephemeral range (and above Ray's worker ports, 10002-19999),
    so no process that binds port 0 can take it before our server binds it: on 2 cores a Ray
    node's own processes used to take a port picked for the next node in the seconds between.
    """
    low, high = _PORT_RANGE
    for _ in range(2000):
        port = _PORT_RANDOM.randrange(low, high) if high > low else 0
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = sock.getsockname()[1]
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free TCP port in {low}-{high - 1} on 127.0.0.1")


def _port_range() -> tuple[int, int]:
    """``[20000, first ephemeral port)``; ``(0, 0)`` (any port) when that range is too small."""
    try:
        ephemeral_low = int(Path(_EPHEMERAL_RANGE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768  # Linux's default
    return (20000, ephemeral_low) if ephemeral_low - 20000 >= 1000 else (0, 0)


_EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
_PORT_RANGE = _port_range()
_PORT_RANDOM = random.Random()
_HANDED_OUT: set[int] = set()


def start_process(
    command: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``command`` with its stdout and stderr appended to ``log_path``.

    It runs in a session of its own, so that a Ctrl-C in pytest does not kill it before the
    fixture's cleanup stops it with :func:`stop_process`.
    """
    with open(log_path, "ab") as log:  # the child holds its own copy of the handle
        return subprocess.Popen(
            list(command),
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_until(
    check: Callable[[], bool],
    timeout_s: float,
    what: str,
    log_path: Path,
    watch: Collection[subprocess.Popen[bytes]] = (),
    poll_s: float = 0.05,
) -> None:
    """Call ``check`` every ``poll_s`` seconds until it returns true.

    Args:
        check: true once the awaited state is reached; it must not raise for "not yet".
        timeout_s: seconds to wait at the most.
        what: the awaited state, for the error (``"redis-server to answer on port 6379"``).
        log_path: the log (or folder of ``*.log`` files) whose tail ends the error.
        watch: processes that must keep running meanwhile.

    Raises:
        RuntimeError: a watched process exited, or ``timeout_s`` passed; the message ends with
            the log's tail.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        _raise_if_exited(watch, what, log_path)
        if check():
            return
        if time.monotonic() > deadline:
            _raise_if_exited(watch, what, log_path)  # the likelier cause, if ``check`` was slow
            raise RuntimeError(
                f"timed out after {timeout_s:.0f} s waiting for {what}; log {log_path}:\n"
                f"{log_tail(log_path)}"
            )
        time.sleep(poll_s)


def start_on_free_port(
    command: Callable[[int], Sequence[str]],
    ready: Callable[[int], bool],
    *,
    what: str,
    port_taken: str,
    log_path: Path,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    attempts: int = 3,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a server on a free port; return it once ``ready(port)``, with its port.

    Another process may bind the port between :func:`free_port` and the server: when the server
    fails and its new log lines contain ``port_taken``, it is started again on another port.

    Args:
        command: the command line for a port.
        ready: whether the server on that port answers yet (must not raise for "not yet").
        what: the server's name, for errors (``"juicefs gateway"``).
        port_taken: what the server logs when its port is in use.
        log_path: its log file, appended to.
        timeout_s: seconds to wait for each start.
        env: its environment (default: ours).
        attempts: starts to try at the most.

    Raises:
        RuntimeError: it exited or did not answer in time (on the last attempt); the message ends
            with the log's tail.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    for attempt in range(1, attempts + 1):
        port = free_port()
        log_start = log_path.stat().st_size if log_path.exists() else 0
        process = start_process(command(port), log_path, env)
        try:
            wait_until(
                functools.partial(ready, port),
                timeout_s,
                f"{what} to answer on port {port}",
                log_path,
                watch=[process],
            )
        except RuntimeError:
            stop_process(process)
            if port_taken in _read_from(log_path, log_start) and attempt < attempts:
                continue
            raise
        except BaseException:
            stop_process(process)
            raise
        return process, port
    raise AssertionError("the last attempt returns or raises")


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM (the servers flush and stop their own children), then SIGKILL after ``timeout_s``;
    returns once the process is gone."""
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log; of a folder, those of each ``*.log`` file in it."""
    if path.is_dir():
        return "\n".join(
            f"--- {log.name}\n{log_tail(log, lines)}" for log in sorted(path.glob("*.log"))
        )
    if not path.exists():
        return "(no log written)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _raise_if_exited(watch: Collection[subprocess.Popen[bytes]], what: str, log_path: Path) -> None:
    for process in watch:
        if process.poll() is not None:
            program = process.args[0] if isinstance(process.args, list) else process.args
            raise RuntimeError(
                f"{Path(str(program)).name} (PID {process.pid}) exited with code "
                f"{process.returncode} while waiting for {what}; log {log_path}:\n"
                f"{log_tail(log_path)}"
            )


def _read_from(path: Path, offset: int) -> str:
    if not path.exists():
        return ""
    with open(path, "rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")
