"""Every way a poll can fail, and server text made safe to show.

Errors form a small tree whose ``reason`` is the contract's poll-error reason:

    PollFailure                           every way a poll can fail
    ├── ApiFailure        reason "api"    the body said no (non-success code)
    ├── AuthFailure       reason "auth"   HTTP 401/403 or a bad-key body code
    ├── TimeoutFailure    reason "timeout"
    ├── ConnectionFailure reason "connection"
    ├── HttpFailure       reason "http"   any other non-200 status
    ├── DecodeFailure     reason "decode" not JSON, or not the documented shape
    └── PaginationFailure reason "pagination" (raised by the paging)

``retryable`` tells the poller whether another attempt may help (timeouts,
connection errors, 429 and 5xx), and ``retry_after`` carries a server's hint.
``label_text`` and ``failure_text`` make a server's text safe for a label value,
``scrub`` takes a secret out of any text.
"""

from __future__ import annotations

import re
from typing import Any

from exporter.kinds import REDACTED

# A failure text becomes a label value: one line, bounded.
MAX_REASON_CHARS = 200


_SURROGATE = re.compile("[\ud800-\udfff]")


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


class PollFailure(Exception):
    """Every way a poll can fail; each subclass names its contract reason."""

    reason: str
    retryable = False

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ApiFailure(PollFailure):
    reason = "api"


class AuthFailure(PollFailure):
    reason = "auth"


class TimeoutFailure(PollFailure):
    reason = "timeout"
    retryable = True


class ConnectionFailure(PollFailure):
    reason = "connection"
    retryable = True


class HttpFailure(PollFailure):
    reason = "http"

    def __init__(self, message: str, status: int, retry_after: float | None = None) -> None:
        super().__init__(message, retry_after)
        self.status = status
        self.retryable = status == 429 or status >= 500


class DecodeFailure(PollFailure):
    reason = "decode"


class PaginationFailure(PollFailure):
    reason = "pagination"


def label_text(text: str) -> str:
    """Server text made safe for a label value: valid UTF-8 (lone surrogates, which
    JSON allows and UTF-8 cannot encode, become U+FFFD), control characters removed.

    Without this, one such name in one listing would make every scrape fail.
    """
    if text.isascii() and text.isprintable():
        return text
    return _CONTROL.sub("", _SURROGATE.sub("\ufffd", text))


def scrub(text: str, secret: str) -> str:
    if secret:
        text = text.replace(secret, REDACTED)
        if ":" in secret:  # user:password: never show the password alone either
            text = text.replace(secret.split(":", 1)[1], REDACTED)
    return text


def failure_text(raw: Any, secret: str) -> str:
    """A server's failure text as a label value: one line of at most 200 characters,
    whitespace collapsed, the API key scrubbed should a server ever echo it."""
    if raw is None:
        return ""
    text = label_text(" ".join(scrub(str(raw), secret).split()))
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS - 1] + "…"
