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


UNITS = ROOT / "ansible/roles/flushctl/templates/units"
ALWAYS = ["helper", "milter", "gateway", "poller"]   # flushctl_daemons
DAEMONS = ALWAYS + ["odmr", "portal"]   # odmr: with flushctl_odmr; portal: with flushctl_portal


def _fill(text: str) -> str:
    values = {"ansible_managed": "managed", "flushctl_source": str(ROOT),
              "flushctl_config_path": "/etc/flushctl/flushctl.toml",
              "flushctl_state_directory": "/var/lib/flushctl",
              "flushctl_poller_user": "flushctl-poller",
              "flushctl_gateway_user": "flushctl-gateway",
              "flushctl_milter_user": "flushctl-milter",
              "flushctl_odmr_user": "flushctl-odmr",
              "flushctl_portal_user": "flushctl-portal",
              "flushctl_postfix_config_directory": "/etc/postfix"}
    text = re.sub(r"\{\{ (\w+) \}\}", lambda m: values[m.group(1)], text)
    assert "{{" not in text and "{%" not in text
    return text


def render(tmp_path, instance):
    """The template unit as instance ``instance``, with its drop-in beside it."""
    text = _fill(TEMPLATE.read_text()).replace("/usr/local/sbin/flushctl", str(FLUSHCTL))
    path = tmp_path / f"flushctl@{instance}.service"
    path.write_text(text)
    dropins = tmp_path / f"flushctl@{instance}.service.d"
    dropins.mkdir()
    (dropins / "privileges.conf").write_text(_fill((UNITS / f"{instance}.conf.j2").read_text()))
    return path


def test_every_daemon_has_its_drop_in_and_the_role_starts_them_all():
    assert sorted(p.name for p in UNITS.iterdir()) == sorted(f"{d}.conf.j2" for d in DAEMONS)
    defaults = (ROOT / "ansible/roles/flushctl/defaults/main.yml").read_text()
    listed = re.search(r"flushctl_daemons:\n((?:  - \w+\n)+)", defaults).group(1)
    # the helper first: the others ask it as they start
    assert re.findall(r"- (\w+)", listed) == ALWAYS
    # and the ODMR daemon and the portal after them, when set
    derived = (ROOT / "ansible/roles/flushctl/vars/main.yml").read_text()
    assert "flushctl_running_daemons: \"{{ flushctl_daemons + (['odmr'] if flushctl_odmr_enabled " \
        "else []) + (['portal'] if flushctl_portal_enabled else []) }}\"" in derived


@pytest.mark.parametrize("daemon", DAEMONS)
def test_unit_verifies(tmp_path, daemon):
    for other in DAEMONS:   # the gateway and the poller want the helper
        if other != daemon:
            render(tmp_path, other)
    unit = render(tmp_path, daemon)
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


def _exposure(tmp_path, daemon) -> tuple[float, str]:
    unit = render(tmp_path, daemon)
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                          capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout[-2000:] + proc.stderr
    return float(match.group(1)), proc.stdout


@pytest.mark.parametrize("daemon,limit", [("helper", 3.0), ("milter", 3.0),
                                          ("gateway", 3.0), ("poller", 2.0), ("odmr", 2.0)])
def test_unit_exposure(tmp_path, daemon, limit):
    # 10 is an unfenced root service; only the helper keeps root, with the
    # capabilities postsuper needs; the poller and the ODMR daemon are never root
    exposure, report = _exposure(tmp_path, daemon)
    assert exposure <= limit, report
    if daemon in ("poller", "odmr"):
        assert "Service runs under a static non-root user identity" in report, report


def test_the_helper_may_write_the_maps_and_nothing_else_of_etc(tmp_path):
    """ProtectSystem=strict makes /etc read-only to every daemon; the
    helper rewrites the transport map when a customer changes its relay
    (and takes the maps' lock there): that directory alone is writable."""
    path = render(tmp_path, "helper")
    unit = path.read_text() + (tmp_path / f"{path.name}.d" / "privileges.conf").read_text()
    assert "ProtectSystem=strict" in unit
    writable = [p for line in unit.splitlines() if line.startswith("ReadWritePaths=")
                for p in line.split("=", 1)[1].split()]
    assert "-/etc/postfix/flushctl" in writable
    assert [p for p in writable if p.lstrip("-").startswith("/etc")] == ["-/etc/postfix/flushctl"]
    for other in ("milter", "gateway", "poller", "odmr", "portal"):
        assert "ReadWritePaths" not in (UNITS / f"{other}.conf.j2").read_text()
