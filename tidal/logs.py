"""How every Tidal process writes its log: one handler on the root logger, text or JSON lines.

`configure_logging(level, log_format, process)` is the one place a process sets up logging, called
first thing by each entry point (`tidal` commands, worker, API server and tensor-parallel rank
processes), so a deployment's `frontend.log_format` reaches every process it starts. It replaces
the handler an earlier call installed (a spawned process inherits none) and leaves other handlers be.

- `text`: `2024-05-01 12:00:00,123 INFO worker decode-0 tidal.worker.worker: message`, as before.
- `json`: one object per line with `ts` (ISO 8601, UTC, milliseconds), `level`, `logger`, `msg`,
  `process` (when given), `exc` (a traceback, when there is one), and the record's structured
  fields: whatever a caller passed as `extra={"fields": {...}}` (the request log's line, the engine
  stats line), merged in at the top level so a log pipeline can filter on them.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import get_args

from tidal.config import LogFormat

LOG_FORMATS: tuple[str, ...] = get_args(LogFormat)
FIELDS = "fields"
"""The `extra` key that carries a record's structured fields (a dict)."""
_RESERVED = ("ts", "level", "logger", "msg", "process", "exc")


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record; structured fields at the top level (never over the base keys)."""

    def __init__(self, process: str = "") -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
                "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        if self.process:
            line["process"] = self.process
        fields = getattr(record, FIELDS, None)
        if fields:
            line.update((k, v) for k, v in fields.items() if k not in _RESERVED)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        return json.dumps(line, default=str, ensure_ascii=False)


def text_formatter(process: str = "") -> logging.Formatter:
    where = f"{process} " if process else ""
    return logging.Formatter(f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s")


def current_log_format() -> str:
    """The format this process logs in (what a process it spawns should use too)."""
    handlers = logging.getLogger().handlers
    return "json" if any(isinstance(h.formatter, JsonLineFormatter) for h in handlers) else "text"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (a test's capture replaces it), and is the one
    handler `configure_logging` replaces when called again."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging(level: str | int = "info", log_format: str = "text", process: str = "") -> None:
    """Root logger at `level`, writing `log_format` lines to stderr; `process` names this process in
    each line (`worker decode-0`, `api-server 1`; empty for the main process). Called again, it
    replaces its own handler; other handlers (a test runner's) stay."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = _StderrHandler()
    handler.setFormatter(JsonLineFormatter(process) if log_format == "json" else text_formatter(process))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
