"""Structured logs: one JSON object per line, with the job and request fields that apply.

Every service process (the API, the dispatcher, each Ray actor) logs through
:func:`configure_logging`. A record's ``extra`` fields named in :data:`LOG_FIELDS` become keys of
its line, so ``grep '"job_id": "job_…"'`` over all the logs gives one job's story::

    {"time": "...", "level": "INFO", "logger": "services.workers.dispatcher",
     "message": "... succeeded", "job_id": "job_01...", "attempt": 1}
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

__all__ = ["LOG_FIELDS", "JsonFormatter", "configure_logging"]

LOG_FIELDS = (
    "job_id",
    "attempt",
    "shard",
    "node_id",
    "actor",
    "call",
    "request_id",
    "tenant",
    "method",
    "route",
    "status",
    "duration_ms",
)
"""Record attributes (``logger.info(..., extra={...})``) copied into the JSON line."""


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the :data:`LOG_FIELDS` set on the
    record, and the traceback as ``error``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in LOG_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: str = "INFO", *, json_lines: bool = True) -> None:
    """Route every logger to stderr at ``level``: JSON lines, or plain text for a console."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
