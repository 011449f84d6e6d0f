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


def test_what_a_daemon_needs_after_giving_up_root_is_loaded_before():
    """A daemon that has given up root may not read the interpreter's
    library any more (installed under /root, a unit's ProtectHome): what
    it needs later must be loaded at start.  The idna codec (a finger or
    an ETRN for an international domain, getaddrinfo of a peer's name)
    came with dnspython, which the CLI and the daemons no longer import
    at start; it is loaded by the name rules themselves."""
    code = """
import sys, socket
import flushctl.cli.main, flushctl.heldmail.library, flushctl.gateway.daemon
sys.meta_path[:] = [m for m in sys.meta_path if getattr(m, "__name__", "") == "BuiltinImporter"]
sys.path_importer_cache.clear(); sys.path[:] = []   # no file can be imported now
from flushctl import names
print(names.wire_domain("b\u00fccher.example"))
print(bool(socket.getaddrinfo("localhost", 25, proto=socket.IPPROTO_TCP)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["xn--bcher-kva.example", "True"]
