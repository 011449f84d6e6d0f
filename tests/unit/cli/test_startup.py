"""What a CLI call loads before it does anything: at 100,000 domains every
part of its start shows in every command (docs/benchmarks.md, P7)."""

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return set(out.split())


def test_the_cli_does_not_import_the_resolver_until_a_prober_is_made():
    # dnspython's resolver was a tenth of `flushctl status DOMAIN`
    loaded = _modules_after("import flushctl.cli.main\nimport flushctl.heldmail.library")
    assert "flushctl.poller.prober" in loaded   # the release still imports the prober
    assert not {m for m in loaded if m == "dns" or m.startswith("dns.")}
    made = _modules_after("from flushctl.poller.prober import Prober\nProber()")
    assert {"dns.asyncresolver", "dns.resolver", "dns.nameserver"} <= made
