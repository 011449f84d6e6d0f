"""The role's systemd unit: valid for systemd, and as tight as the daemons allow.

No systemd runs on these machines, but systemd-analyze reads unit files
offline. What the unit's capability set and no-new-privileges allow is
proven by the integration tests, which run every daemon under exactly
those (tests/integration/conftest.py).
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "ansible/roles/flushctl/templates/flushctl@.service.j2"
FLUSHCTL = Path(sys.executable).with_name("flushctl")

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="needs systemd-analyze (Debian package systemd)")


def render(tmp_path, instance):
    values = {"ansible_managed": "managed", "flushctl_source": str(ROOT),
              "flushctl_config_path": "/etc/flushctl/flushctl.toml",
              "flushctl_state_directory": "/var/lib/flushctl"}
    text = re.sub(r"\{\{ (\w+) \}\}", lambda m: values[m.group(1)], TEMPLATE.read_text())
    assert "{{" not in text and "{%" not in text
    text = text.replace("/usr/local/sbin/flushctl", str(FLUSHCTL))
    path = tmp_path / f"flushctl@{instance}.service"
    path.write_text(text)
    return path


@pytest.mark.parametrize("daemon", ["milter", "gateway", "poller"])
def test_unit_verifies(tmp_path, daemon):
    unit = render(tmp_path, daemon)
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


def test_unit_exposure(tmp_path):
    unit = render(tmp_path, "gateway")
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                          capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout[-2000:] + proc.stderr
    # 10 is an unfenced root service; the daemons start as root and keep
    # only the capabilities the queue and port 79 need.
    assert float(match.group(1)) <= 3.0, proc.stdout
