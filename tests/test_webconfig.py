"""The web config: exporter-toolkit's format, TLS material loaded up front, every
problem at once; and basic auth without a timing oracle."""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path

import bcrypt
import pytest
import yaml

from conftest import run_cli
from exporter.web import _UNKNOWN_USER_HASH, _AuthCache
from exporter.config import ConfigError
from exporter.webconfig import ALLOWED_HEADERS, load_web_config


def write(tmp_path: Path, doc: object, name: str = "web.yml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def problems(tmp_path: Path, doc: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_web_config(write(tmp_path, doc, "bad-web.yml"))
    assert all("\n" not in line for line in info.value.lines)
    return info.value.lines


def test_web_config(tmp_path: Path, pki: dict[str, str]) -> None:
    (tmp_path / "c.pem").write_text("x")
    good = write(tmp_path, {"tls_server_config": {"cert_file": pki["server_cert"],
                                                  "key_file": pki["server_key"]},
                            "basic_auth_users": {"alice": _UNKNOWN_USER_HASH.decode()},
                            "http_server_config": {"headers": {"X-Frame-Options": "deny"}}},
                 "web.yml")
    web = load_web_config(good)
    assert web.tls is not None and web.tls.min_version == "TLS12"
    assert web.headers == {"X-Frame-Options": "deny"}
    for doc, key in [({"tls_server_config": {"cert_file": "c.pem", "key_file": "c.pem",
                                             "foo": 1}}, "tls_server_config.foo"),
                     ({"http_server_config": {"headers": {"Server": "x"}}},
                      "http_server_config.headers.Server"),
                     ({"tls_server_config": {"cert_file": "c.pem"}},
                      "tls_server_config.key_file"),
                     ({"basic_auth_users": {"bob": "plain"}}, "basic_auth_users.bob"),
                     ({"basic_auth_users": {"bob": "$2b$12$abcdefghijklmnopqrstuv"}},
                      "basic_auth_users.bob"),         # truncated: bcrypt would raise
                     ({"tls_server_config": {"cert_file": "c.pem", "key_file": "c.pem",
                                             "client_auth_type": "Maybe"}},
                      "tls_server_config.client_auth_type"),
                     ({"http_server_config": {"http2": True}}, "http_server_config.http2"),
                     ({"tls_config": {}}, "tls_config")]:
        with pytest.raises(ConfigError) as info:
            load_web_config(write(tmp_path, doc, "bad-web.yml"))
        assert f"key '{key}'" in str(info.value)


def test_a_bad_certificate_or_key_names_its_key(tmp_path: Path, pki: dict[str, str]) -> None:
    (tmp_path / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnope\n")
    cases = [({"cert_file": "garbage.pem", "key_file": pki["server_key"]}, "cert_file"),
             ({"cert_file": pki["server_key"], "key_file": pki["server_key"]}, "cert_file"),
             ({"cert_file": pki["server_cert"], "key_file": pki["client_key"]}, "key_file"),
             ({"cert_file": pki["server_cert"], "key_file": "garbage.pem"}, "key_file"),
             ({"cert_file": pki["server_cert"], "key_file": pki["server_key"],
               "client_ca_file": "garbage.pem"}, "client_ca_file")]
    for tls, key in cases:
        (line,) = problems(tmp_path, {"tls_server_config": tls})
        assert f"key 'tls_server_config.{key}': " in line, (tls, line)


def test_a_bad_certificate_exits_2_with_one_line(tmp_path: Path, pki: dict[str, str]) -> None:
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    web = write(tmp_path, {"tls_server_config": {"cert_file": "garbage.pem",
                                                 "key_file": pki["server_key"]}})
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump({"clusters": [{"name": "a", "url": "http://x",
                                                    "api": "v2"}]}))
    result = run_cli("-c", str(config), "--web.config.file", web,
                     "--web.listen-address", "127.0.0.1:0")
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"{web}: key 'tls_server_config.cert_file': 'garbage.pem'")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    lines = problems(tmp_path, {
        "tls_server_config": {"cert_file": "/nope.pem", "min_version": "TLS9"},
        "basic_auth_users": {"alice": "plain", "bob": "also-plain"},
        "http_server_config": {"headers": {"X-Frame-Options": "allow", "Server": "x"},
                               "http2": True},
        "extra": 1})
    keys = sorted(line.split(": key ", 1)[1].split(":", 1)[0] for line in lines)
    assert keys == sorted(repr(k) for k in (
        "extra", "tls_server_config.cert_file", "tls_server_config.key_file",
        "tls_server_config.min_version", "basic_auth_users.alice", "basic_auth_users.bob",
        "http_server_config.headers.X-Frame-Options", "http_server_config.headers.Server",
        "http_server_config.http2")), lines


def test_only_the_headers_exporter_toolkit_allows() -> None:
    assert set(ALLOWED_HEADERS) == {"Strict-Transport-Security", "X-Content-Type-Options",
                                    "X-Frame-Options", "X-XSS-Protection",
                                    "Content-Security-Policy"}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_unknown_users_cost_a_bcrypt_check_and_checks_run_one_at_a_time() -> None:
    hashed = bcrypt.hashpw(b"right", bcrypt.gensalt(rounds=4))
    checked: list[bytes] = []
    running = [0, 0]                  # now, most at once
    lock = threading.Lock()

    def checkpw(password: bytes, against: bytes) -> bool:
        with lock:
            running[0] += 1
            running[1] = max(running)
        time.sleep(0.01)              # long enough for the threads to overlap
        with lock:
            running[0] -= 1
            checked.append(against)
        return bcrypt.checkpw(password, against)
    auth = _AuthCache({"alice": hashed.decode()}, checkpw=checkpw)
    assert not auth.check(basic("mallory", "right"))
    assert checked == [_UNKNOWN_USER_HASH]            # same work as for a known user
    assert not auth.check(basic("alice", "wrong")) and auth.check(basic("alice", "right"))
    assert auth.check(basic("alice", "right")) and len(checked) == 3     # cached
    assert not auth.check(basic("alice", "x" * 100))     # bcrypt refuses over 72 bytes
    threads = [threading.Thread(target=auth.check, args=(basic(f"u{i}", "x"),))
               for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(checked) == 10 and running[1] == 1


def test_the_unknown_user_hash_is_a_bcrypt_hash_of_no_common_password() -> None:
    for guess in (b"", b"password", b"fakepassword", b"admin"):
        assert not bcrypt.checkpw(guess, _UNKNOWN_USER_HASH)
