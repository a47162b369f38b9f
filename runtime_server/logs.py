"""Structured logs: one JSON object per line, with fields that cannot carry data or secrets.

Handlers log an event name and a few fields (``extra={"fields": {...}}``). The formatter
keeps only numbers, booleans and short strings: an array, bytes, a list of labels or any
long string is replaced by a marker, so a tensor, a batch's labels or a token cannot end
up in a log file by a slip in a handler. Tokens are never passed in (the auth module only
hands out device names), and session ids are logged as their first 8 characters.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from dpa.contract.choices import Choice

__all__ = ["JsonFormatter", "configure", "safe_fields", "MAX_FIELD_CHARS"]

MAX_FIELD_CHARS = 200
_REDACTED = "<redacted>"


def _is_safe(value: Any) -> bool:
    """A scalar or a short string: nothing that can hold a tensor, a label list or a token file."""
    if isinstance(value, bool | int | float) or value is None:
        return True
    return isinstance(value, str) and len(value) <= MAX_FIELD_CHARS


def safe_fields(fields: dict[str, Any]) -> dict[str, Any]:
    return {key: value if _is_safe(value) else _REDACTED for key, value in fields.items()}


def _message(record: logging.LogRecord) -> str:
    """The message, with %-arguments filled in only when every one is a scalar or a short string."""
    args = record.args if isinstance(record.args, tuple) else ()
    if args and all(_is_safe(arg) for arg in args):
        return record.getMessage()
    return str(record.msg)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": _message(record),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(safe_fields(fields))
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__  # the type only: tracebacks can hold data
        return json.dumps(entry, default=lambda _: _REDACTED)


class LogFormat(Choice):
    JSON = "json"  # one object per line, for log shippers
    TEXT = "text"  # for people

    @classmethod
    def what(cls) -> str:
        return "log format"


def configure(fmt: LogFormat | str = LogFormat.JSON, level: int = logging.INFO) -> None:
    """Route the server's logs to stderr, as JSON lines ("json") or for people ("text")."""
    handler = logging.StreamHandler(sys.stderr)
    if LogFormat.parse(fmt) is LogFormat.JSON:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s %(fields)s", defaults={"fields": ""})
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
