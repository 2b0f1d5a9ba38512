"""The web config (--web.config.file), in exporter-toolkit's format.

Loading it also loads the TLS material, so a bad certificate or key is a configuration
error naming the key (exit 2 at startup) rather than a server that cannot listen.
Every problem of the file is reported at once, one line each, as for the main config.
"""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from exporter.config import ConfigError, Problems

CLIENT_AUTH_TYPES = ("NoClientCert", "RequestClientCert", "RequireAnyClientCert",
                     "VerifyClientCertIfGiven", "RequireAndVerifyClientCert")
TLS_VERSIONS = ("TLS10", "TLS11", "TLS12", "TLS13")
_TLS_FILES = ("cert_file", "key_file", "client_ca_file")
_TLS_KEYS = {*_TLS_FILES, "client_auth_type", "min_version", "max_version"}
# $2b$<cost>$<22 characters of salt and 31 of hash>, as bcrypt.Cost() accepts them.
_BCRYPT_HASH = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")

# The headers exporter-toolkit lets http_server_config.headers set (web/handler.go),
# with the values it allows where they are an enumeration (empty: any value).
ALLOWED_HEADERS: Mapping[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}


@dataclass(frozen=True)
class TLSServerConfig:
    cert_file: str
    key_file: str
    client_ca_file: str = ""
    client_auth_type: str = "NoClientCert"
    min_version: str = "TLS12"
    max_version: str = ""


@dataclass(frozen=True)
class WebConfig:
    tls: TLSServerConfig | None = None
    basic_auth_users: Mapping[str, str] = field(default_factory=dict, repr=False)
    headers: Mapping[str, str] = field(default_factory=dict)


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise ValueError("the key is encrypted; give an unencrypted key")


def tls_context(config: TLSServerConfig) -> ssl.SSLContext:
    """An SSL context with exporter-toolkit's meaning of client_auth_type."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(config.cert_file, config.key_file, password=_no_password)
    versions = {"TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
                "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
    ctx.minimum_version = versions[config.min_version or "TLS12"]
    if config.max_version:
        ctx.maximum_version = versions[config.max_version]
    if config.client_ca_file:
        ctx.load_verify_locations(config.client_ca_file)
    # Python's ssl verifies any certificate it asks for, so "request"/"require any"
    # behave as their verifying siblings when a client CA is configured.
    mode = {"NoClientCert": ssl.CERT_NONE,
            "RequestClientCert": ssl.CERT_OPTIONAL if config.client_ca_file else ssl.CERT_NONE,
            "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
            "RequireAnyClientCert": ssl.CERT_REQUIRED,
            "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}[config.client_auth_type]
    if mode != ssl.CERT_NONE and not config.client_ca_file:
        ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH)
    ctx.verify_mode = mode
    return ctx


def _why(exc: Exception) -> str:
    return getattr(exc, "reason", None) or str(exc)


def _check_tls_material(tls: TLSServerConfig, shown: Mapping[str, str],
                        problems: Problems) -> None:
    """Load each file as the server will, blaming the key that names the bad one."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for key, path in (("cert_file", tls.cert_file), ("client_ca_file", tls.client_ca_file)):
        if not path:
            continue
        try:
            probe.load_verify_locations(cafile=path)
        except (ssl.SSLError, OSError) as exc:
            problems.add("", f"tls_server_config.{key}",
                         f"{shown[key]!r} holds no usable PEM certificate ({_why(exc)})")
            return
    try:
        probe.load_cert_chain(tls.cert_file, tls.key_file, password=_no_password)
    except (ssl.SSLError, OSError, ValueError) as exc:
        problems.add("", "tls_server_config.key_file",
                     f"{shown['key_file']!r} is not the unencrypted PEM private key of "
                     f"cert_file ({_why(exc)})")


def _tls(raw: Any, base_dir: str, problems: Problems) -> TLSServerConfig | None:
    if not isinstance(raw, dict):
        problems.add("", "tls_server_config", "must be a mapping")
        return None
    start = len(problems.lines)
    for key in raw:
        if key not in _TLS_KEYS:
            problems.add("", f"tls_server_config.{key}", "unknown key")
    shown = {key: str(raw.get(key) or "") for key in _TLS_FILES}
    files = {}
    for key, value in shown.items():
        path = value if not value or os.path.isabs(value) else os.path.join(base_dir, value)
        if path and not os.path.isfile(path):
            problems.add("", f"tls_server_config.{key}", f"{value!r} does not exist")
        elif not path and key != "client_ca_file":
            problems.add("", f"tls_server_config.{key}", "is required")
        files[key] = path
    auth_type = str(raw.get("client_auth_type") or "NoClientCert")
    if auth_type not in CLIENT_AUTH_TYPES:
        problems.add("", "tls_server_config.client_auth_type",
                     f"{auth_type!r} must be one of {', '.join(CLIENT_AUTH_TYPES)}")
    elif auth_type in ("RequireAndVerifyClientCert", "VerifyClientCertIfGiven") \
            and not files["client_ca_file"]:
        problems.add("", "tls_server_config.client_ca_file", f"is required by {auth_type}")
    versions = {}
    for key, default in (("min_version", "TLS12"), ("max_version", "")):
        value = str(raw.get(key) or default)
        if value and value not in TLS_VERSIONS:
            problems.add("", f"tls_server_config.{key}",
                         f"{value!r} must be one of {', '.join(TLS_VERSIONS)}")
        versions[key] = value
    if len(problems.lines) != start:
        return None
    tls = TLSServerConfig(client_auth_type=auth_type, **files, **versions)
    _check_tls_material(tls, shown, problems)
    return tls


def _users(raw: Any, problems: Problems) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        problems.add("", "basic_auth_users", "must map user names to bcrypt hashes")
        return {}
    for user, hashed in raw.items():
        match = _BCRYPT_HASH.fullmatch(hashed)
        if match is None or not 4 <= int(match.group(1)) <= 31:
            problems.add("", f"basic_auth_users.{user}", "is not a bcrypt hash")
    return dict(raw)


def _headers(raw: Any, problems: Problems) -> dict[str, str]:
    if not isinstance(raw, dict):
        problems.add("", "http_server_config", "must be a mapping")
        return {}
    for key in raw:
        if key != "headers":
            problems.add("", f"http_server_config.{key}", "unknown key")
    headers = raw.get("headers") or {}
    if not isinstance(headers, dict):
        problems.add("", "http_server_config.headers", "must be a mapping")
        return {}
    out = {}
    for name, value in headers.items():
        name, value = str(name), str(value)
        where = f"http_server_config.headers.{name}"
        if name not in ALLOWED_HEADERS:
            problems.add("", where, f"can not be configured (allowed: "
                         f"{', '.join(ALLOWED_HEADERS)})")
        elif ALLOWED_HEADERS[name] and value not in ALLOWED_HEADERS[name]:
            problems.add("", where, f"{value!r} must be one of "
                         f"{', '.join(ALLOWED_HEADERS[name])}")
        out[name] = value
    return out


def load_web_config(path: str) -> WebConfig:
    """Read an exporter-toolkit web config and load its TLS material; ConfigError lists
    every problem, one line each naming the key."""
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the file: {exc.strerror}"]) from None
    except yaml.YAMLError:
        raise ConfigError([f"{path}: not valid YAML"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the file must hold a mapping"])
    problems = Problems(path)
    for key in raw:
        if key not in ("tls_server_config", "basic_auth_users", "http_server_config"):
            problems.add("", str(key), "unknown key")
    base_dir = os.path.dirname(os.path.abspath(path))
    tls = None if raw.get("tls_server_config") is None else \
        _tls(raw["tls_server_config"], base_dir, problems)
    users = _users(raw.get("basic_auth_users") or {}, problems)
    headers = _headers(raw.get("http_server_config") or {}, problems)
    if problems.lines:
        raise ConfigError(problems.lines)
    return WebConfig(tls=tls, basic_auth_users=users, headers=headers)
