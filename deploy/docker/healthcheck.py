"""The image's HEALTHCHECK: probe /-/healthy where the running exporter listens.

It reads the exporter's own command line (/proc/1/cmdline, or the pid given as the
first argument) with the exporter's own parser, so `--web.listen-address` and a TLS
`--web.config.file` are followed whatever the container was started with. Exit 0 when
the exporter answers (401 counts: basic auth is on, the process is alive), else 1.
"""

from __future__ import annotations

import ssl
import sys
import urllib.error
import urllib.request

from exporter.cli import build_parser, parse_listen_address
from exporter.webconfig import load_web_config


def probe_url(argv: list[str]) -> tuple[str, ssl.SSLContext | None]:
    args, _ = build_parser().parse_known_args(argv)
    host, port = parse_listen_address(args.listen_address)
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    if args.web_config_file and load_web_config(args.web_config_file).tls is not None:
        # the exporter's own certificate need not name 127.0.0.1: liveness, not identity
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return f"https://{host}:{port}/-/healthy", context
    return f"http://{host}:{port}/-/healthy", None


def main() -> int:
    pid = sys.argv[1] if len(sys.argv) > 1 else "1"
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        argv = [a.decode() for a in fh.read().split(b"\0") if a]
    url, context = probe_url(argv)
    try:
        with urllib.request.urlopen(url, timeout=4, context=context) as response:
            return 0 if response.status == 200 else 1
    except urllib.error.HTTPError as error:
        return 0 if error.code == 401 else 1
    except OSError as error:
        print(f"{url}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
