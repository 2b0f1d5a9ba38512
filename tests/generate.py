"""Regenerate the deploy files derived from others:  .venv/bin/python tests/generate.py

deploy/kubernetes/base/prometheusrule.yaml wraps deploy/prometheus/alerts.yml (Kustomize
cannot read a file outside its directory); tests/test_kubernetes.py fails when they differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUSRULE = ROOT / "deploy" / "kubernetes" / "base" / "prometheusrule.yaml"


def prometheusrule() -> dict[str, Any]:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "zilliz-import-exporter",
                         "labels": {"app.kubernetes.io/name": "zilliz-import-exporter"}},
            "spec": yaml.safe_load(ALERTS.read_text())}


def main() -> None:
    PROMETHEUSRULE.write_text(
        "# Generated from deploy/prometheus/alerts.yml by tests/generate.py; tests check the\n"
        "# two stay equal.\n" + yaml.safe_dump(prometheusrule(), sort_keys=False, width=100))
    print(f"wrote {PROMETHEUSRULE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
