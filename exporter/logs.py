"""One line per event, as logfmt or JSON, with structured fields.

Callers pass fields as ``extra={"fields": {...}}``, or bind the ones every line of
a context shares once (``bind(log, cluster_name=...)``); exception traces are folded
into the same line so a log shipper never splits an event.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TYPE_CHECKING, Any, MutableMapping

if TYPE_CHECKING:
    _Adapter = logging.LoggerAdapter[logging.Logger]
else:
    _Adapter = logging.LoggerAdapter

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
          "error": logging.ERROR}
_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn",
                logging.ERROR: "error", logging.CRITICAL: "error"}


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + \
        f".{int(record.msecs):03d}Z"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {"ts": _timestamp(record),
                              "level": _LEVEL_NAMES.get(record.levelno, "info"),
                              "msg": record.getMessage()}
    fields.update(getattr(record, "fields", None) or {})
    if record.exc_info and record.exc_info[1] is not None:
        fields["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
    return fields


def _logfmt_value(value: Any) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\n\r\t\\'):
        return text
    # A raw \r or \n would let a value (a server's error text) forge a log line.
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") \
        .replace("\r", "\\r") + '"'


class FieldsAdapter(_Adapter):
    """A logger whose lines all carry some fields (a cluster's name), first, before
    the fields of the call."""

    def __init__(self, logger: logging.Logger, fields: dict[str, Any]) -> None:
        super().__init__(logger, fields)
        self.fields = fields

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]
                ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(kwargs.get("extra") or {})
        extra["fields"] = {**self.fields, **(extra.get("fields") or {})}
        kwargs["extra"] = extra
        return msg, kwargs

    def bind(self, **fields: Any) -> "FieldsAdapter":
        """This logger with more fields bound."""
        return FieldsAdapter(self.logger, {**self.fields, **fields})


def bind(logger: logging.Logger, **fields: Any) -> FieldsAdapter:
    """``logger`` with ``fields`` on every line."""
    return FieldsAdapter(logger, fields)


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in _fields(record).items())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), default=str)


def setup_logging(level: str, fmt: str) -> None:
    """Send every exporter log line to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
