"""The Grafana dashboard (deployments/grafana-dashboard.json) is valid JSON and queries only series that the
Prometheus endpoint (alya/api/prometheus.py) serves."""

from __future__ import annotations

import json
import re
from pathlib import Path

import alya.api.prometheus as prom

ROOT = Path(__file__).resolve().parents[2]


def test_the_dashboard_queries_only_served_series() -> None:
    dash = json.loads((ROOT / "deployments" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert exprs and len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    served = set(re.findall(r"``(alya_[a-z_]+)``", prom.__doc__ or ""))
    served |= {f"{n}_total" for n in ("alya_rows_finished", "alya_rows_failed")}
    histograms = ("alya_claim_seconds", "alya_write_back_seconds")
    served |= {f"{h}_{s}" for h in histograms for s in ("bucket", "sum", "count")}
    used = {m for e in exprs for m in re.findall(r"\balya_[a-z_]+", e)}
    assert used <= served, used - served
