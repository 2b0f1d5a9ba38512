"""One event, one line: values that hold line breaks or quotes cannot forge a line."""

from __future__ import annotations

import json
import logging

from exporter.logs import JsonFormatter, LogfmtFormatter


def record(**fields: object) -> logging.LogRecord:
    rec = logging.LogRecord("exporter", logging.WARNING, __file__, 1, "poll failed", (), None)
    rec.fields = fields      # type: ignore[attr-defined]
    return rec


def test_logfmt_escapes_every_line_break_quote_and_backslash() -> None:
    forged = 'ok\r\nts=2026-01-01T00:00:00Z level=info msg="all good" \\ "quoted"\ttab'
    line = LogfmtFormatter().format(record(error=forged, plain="simple", empty=""))
    assert "\r" not in line and "\n" not in line
    assert line.endswith(' plain=simple empty=""')
    assert 'error="ok\\r\\nts=2026-01-01T00:00:00Z level=info msg=\\"all good\\" \\\\ ' \
           '\\"quoted\\"\ttab"' in line
    assert line.startswith("ts=") and " level=warn msg=\"poll failed\" " in line


def test_json_lines_hold_the_value_as_it_was() -> None:
    text = "a\r\nb \"c\""
    event = json.loads(JsonFormatter().format(record(error=text)))
    assert event["error"] == text and event["level"] == "warn"
