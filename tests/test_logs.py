"""One event, one line: values that hold line breaks or quotes cannot forge a line."""

from __future__ import annotations

import json
import logging

from exporter.logs import JsonFormatter, LogfmtFormatter, bind


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


def test_bound_fields_lead_every_line_and_merge_with_the_calls(caplog) -> None:
    """bind() replaces extra={"fields": {"cluster_name": ...}} at every call site: the
    lines are the same, the bound fields first."""
    logger = logging.getLogger("exporter.test")
    cluster_log = bind(logger, cluster_name="prod")
    with caplog.at_level(logging.INFO, logger="exporter.test"):
        cluster_log.info("cluster recovered", extra={"fields": {"jobs": 3}})
        cluster_log.bind(job_id="j1").warning("plain")
        logger.info("direct", extra={"fields": {"cluster_name": "prod", "jobs": 3}})
    bound, job, direct = (LogfmtFormatter().format(r) for r in caplog.records)
    assert bound.endswith(' msg="cluster recovered" cluster_name=prod jobs=3')
    assert direct.endswith(' msg=direct cluster_name=prod jobs=3')
    assert job.endswith(" msg=plain cluster_name=prod job_id=j1")
    assert json.loads(JsonFormatter().format(caplog.records[0]))["cluster_name"] == "prod"
