"""JSON log lines: the message, level and logger, every job/request field set on the record, and
the traceback of an exception."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from services.common.logs import JsonFormatter, configure_logging


def record(**extra: object) -> logging.LogRecord:
    made = logging.LogRecord("services.x", logging.INFO, __file__, 1, "job %s done", ("j",), None)
    for name, value in extra.items():
        setattr(made, name, value)
    return made


def test_a_line_is_one_json_object_with_the_fields_that_are_set():
    line = json.loads(JsonFormatter().format(record(job_id="job_1", attempt=2, other="x")))

    assert line["message"] == "job j done" and line["level"] == "INFO"
    assert line["logger"] == "services.x"
    assert (line["job_id"], line["attempt"]) == ("job_1", 2)
    assert "other" not in line and "shard" not in line


def test_an_exception_becomes_the_error_field():
    failed = record(shard=3)
    try:
        raise ValueError("bad shard")
    except ValueError:
        failed.exc_info = sys.exc_info()
    line = json.loads(JsonFormatter().format(failed))

    assert "ValueError: bad shard" in line["error"] and line["shard"] == 3


def test_configure_logging_writes_json_or_text_to_stderr(capsys: pytest.CaptureFixture[str]):
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        configure_logging("INFO")
        logging.getLogger("services.y").info("hello", extra={"job_id": "job_2"})
        assert json.loads(capsys.readouterr().err.strip())["job_id"] == "job_2"
        configure_logging("INFO", json_lines=False)
        logging.getLogger("services.y").info("plain")
        assert "INFO services.y: plain" in capsys.readouterr().err
    finally:  # the root logger as it was: later tests must not write to this capture
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
