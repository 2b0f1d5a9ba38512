"""Configuration values by kind: how one key's value is read from YAML and shown again
(``--check-config``): durations, lists of durations, sizes, numbers, strings, proxies,
regular expressions. ``config`` declares each key with its kind (``config.key``); a
value's error says what is wrong without echoing a secret.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping
from urllib.parse import SplitResult, urlsplit

REDACTED = "<secret>"
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# Binary units only, as the contract says: "32MB" is refused rather than guessed at.
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB)?")
_SIZE_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3}
HEADER_VALUE = re.compile(r"[\x20-\x7e]*")
_URL_PATH = re.compile(r"[\x21-\x7e]*")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# A cluster's duration_buckets: each bucket is a series per collection and outcome.
MAX_BUCKETS = 40


def parse_duration(value: Any) -> float:
    """Parse "30s", "5m", "1h30m", "250ms" or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"bad duration {text!r} (use 30s, 5m, 1h30m or seconds)")
    return total


def format_duration(seconds: float) -> str:
    if seconds and seconds == int(seconds):
        s = int(seconds)
        parts = [(s // 3600, "h"), (s % 3600 // 60, "m"), (s % 60, "s")]
        return "".join(f"{n}{u}" for n, u in parts if n)
    return f"{seconds:g}s"


def parse_size(value: Any) -> int:
    """Parse "512KiB", "32MiB", "1GiB" or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError("not a size")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"bad size {text!r} (use 512KiB, 32MiB, 1GiB or bytes)")
    number = float(match.group(1)) * _SIZE_UNITS[match.group(2) or "B"]
    if number != int(number):
        raise ValueError(f"bad size {text!r} (not a whole number of bytes)")
    return int(number)


def format_size(size: int) -> str:
    """The largest binary unit that divides ``size`` exactly: 33554432 -> "32MiB"."""
    for unit in ("GiB", "MiB", "KiB"):
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return str(size)


def expand_env(value: Any, environ: Mapping[str, str]) -> Any:
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in environ:
            raise KeyError(name)
        return environ[name]

    return _ENV_REF.sub(substitute, value)


def read_value(f: dataclasses.Field[Any], raw: Any, environ: Mapping[str, str]) -> Any:
    """One key's value by its kind; ValueError says what is wrong with it, without
    echoing the value of a secret."""
    kind = f.metadata["kind"]
    if kind in ("string", "regex"):
        value: Any = _string(raw, environ, f.metadata["secret"])
        choices = f.metadata["choices"]
        if value and choices and value not in choices:
            raise ValueError(f"{value!r} must be {' or '.join(choices)}")
        if kind == "regex":
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{value!r} is not a regular expression: {exc}") from None
        return value
    if kind == "strings":
        if not isinstance(raw, list):
            raise ValueError(f"must be a list of strings, got {raw!r}")
        return tuple(_string(item, environ, False) for item in raw)
    if kind == "proxy":
        if not isinstance(raw, str):
            raise ValueError("must be a string")
        try:
            return _proxy_url(expand_env(raw, environ))
        except KeyError as missing:
            raise ValueError(f"environment variable ${{{missing.args[0]}}} is not set") \
                from None
    if kind == "bool":
        if not isinstance(raw, bool):
            raise ValueError("must be true or false")
        return raw
    if kind == "durations":
        return _durations(f, raw)
    if kind == "duration":
        value = parse_duration(raw)
    elif kind == "size":
        value = parse_size(raw)
    elif kind == "number":
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ValueError(f"must be a number, got {raw!r}")
        value = float(raw)
    else:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ValueError(f"must be a whole number, got {raw!r}")
        value = raw
    low, high = f.metadata["range"]
    if not low <= value <= high:
        raise ValueError(f"{raw!r} is out of range ({low:g} to {high:g})")
    return value


def _durations(f: dataclasses.Field[Any], raw: Any) -> tuple[float, ...]:
    """A list of durations, each within the key's range, strictly increasing."""
    if not isinstance(raw, list) or not raw:
        raise ValueError("must be a non-empty list of durations, such as [30s, 1m, 5m]")
    if len(raw) > MAX_BUCKETS:
        raise ValueError(f"has {len(raw)} values, more than {MAX_BUCKETS} (each is a series "
                         "per collection)")
    values = tuple(parse_duration(item) for item in raw)
    low, high = f.metadata["range"]
    for item, value in zip(raw, values):
        if not low <= value <= high:
            raise ValueError(f"{item!r} is out of range ({format_duration(low)} to "
                             f"{format_duration(high)})")
    for (before, after), (value, previous) in zip(zip(raw, raw[1:]),
                                                   zip(values[1:], values)):
        if value <= previous:
            raise ValueError(f"must be strictly increasing: {after!r} comes after {before!r}")
    return values


def _string(raw: Any, environ: Mapping[str, str], secret: bool) -> str:
    """A scalar as a string, ``${VAR}`` expanded; a secret's value is never echoed."""
    if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
        raise ValueError("must be a string" + ("" if secret else f", got {raw!r}"))
    try:
        return str(expand_env(str(raw), environ))
    except KeyError as missing:
        raise ValueError(f"environment variable ${{{missing.args[0]}}} is not set") \
            from None


def proxy_password(url: str) -> str:
    """The password in a proxy URL, or ""."""
    try:
        return urlsplit(url).password or ""
    except ValueError:
        return ""


def _proxy_url(raw: str) -> str:
    """``http://`` or ``https://``, a host, an optional port and ``user:password@``; the
    errors never echo the URL, which may hold a password."""
    if not raw:
        return raw
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if url_problem(parts._replace(path=parts.path.rstrip("/"))):
        raise ValueError("must be an http(s) URL with a valid host and port")
    if not HEADER_VALUE.fullmatch(raw):
        raise ValueError("must be printable ASCII")
    return raw


def url_problem(parts: SplitResult) -> str:
    """Why the client could not send to this URL, or ""."""
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        return "has a port that is not a number from 1 to 65535"
    try:
        (parts.hostname or "").encode("idna")
    except UnicodeError:
        return "has a host name that is not a valid (internationalised) domain name"
    if not _URL_PATH.fullmatch(parts.path) or parts.query or parts.fragment:
        return "may have a path of printable ASCII without spaces, and no query"
    return ""


def shown_value(f: dataclasses.Field[Any], value: Any) -> Any:
    """A key's value as --check-config prints it (and as the file could say it)."""
    kind = f.metadata["kind"]
    if f.metadata["secret"]:
        return REDACTED if value else ""
    if kind == "proxy" and proxy_password(value):
        parts = urlsplit(value)
        return parts._replace(netloc=parts.netloc.replace(
            f":{parts.password}@", f":{REDACTED}@", 1)).geturl()
    if kind == "duration":
        return format_duration(value)
    if kind == "durations":
        return [format_duration(v) for v in value]
    if kind == "size":
        return format_size(value)
    if kind == "number" and value == int(value):
        return int(value)        # 10, not 10.0
    if kind == "strings":
        return list(value)
    return value
