"""The example alert rules (promtool) and the Grafana dashboard name only
metrics that flushctl serves."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from flushctl.metrics import METRIC_NAMES

DOCS = Path(__file__).resolve().parents[2] / "docs"
RULES = DOCS / "prometheus" / "flushctl-alerts.yml"
DASHBOARD = DOCS / "grafana" / "flushctl-dashboard.json"


def _names(text: str) -> set[str]:
    return set(re.findall(r"\bflushctl_[a-z_]+", text))


@pytest.fixture
def promtool():
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    return path


def test_alert_rules_are_valid_and_fire_as_meant(promtool):
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    tested = subprocess.run([promtool, "test", "rules", "flushctl-alerts.test.yml"],
                            cwd=RULES.parent, capture_output=True, text=True, timeout=120)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    print(check.stdout.strip().splitlines()[-1].strip(), "| promtool test rules: SUCCESS")


def test_alert_rules_use_served_metrics():
    used = _names(RULES.read_text())
    assert used and used <= set(METRIC_NAMES), used - set(METRIC_NAMES)


def test_dashboard_is_grafana_json_on_served_metrics():
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    assert len(exprs) >= 10 and all(p["datasource"]["uid"] == "${datasource}"
                                    for p in board["panels"])
    used = _names(" ".join(exprs))
    assert used <= set(METRIC_NAMES), used - set(METRIC_NAMES)
    # the per-domain figures the dashboard is for
    assert {"flushctl_held_messages", "flushctl_held_bytes", "flushctl_oldest_held_age_seconds",
            "flushctl_domain_reachable", "flushctl_releases_total"} <= used


def test_log_lines_are_one_line_of_key_value_fields():
    import logging

    from flushctl.cli.main import KeyValueFormatter
    fmt = KeyValueFormatter()
    record = logging.LogRecord("flushctl.gateway", logging.INFO, __file__, 1,
                               "event=request trigger=%s client=%s", ("finger", "192.0.2.7"), None)
    line = fmt.format(record)
    assert re.fullmatch(r"ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=info src=gateway "
                        r"event=request trigger=finger client=192\.0\.2\.7", line), line
    try:
        raise ValueError("two\nlines")
    except ValueError:
        import sys
        record = logging.LogRecord("flushctl.milter", logging.ERROR, __file__, 1,
                                   "event=error stage=eom", (), sys.exc_info())
    line = fmt.format(record)
    assert "\n" not in line and line.startswith("ts=") and " traceback=\"Traceback" in line
