"""Tests that need a network of their own: several hosts, and a DNS server
that Postfix's own resolver uses.

A test function decorated with ``@in_netns`` runs, when called from the
ordinary test run, as a separate pytest run of that one test inside
``unshare --net --mount``: a fresh network namespace (only its own
loopback, nothing of the machine's network) and a private mount
namespace.  Inside, ``Lan`` brings loopback up with the addresses that
stand for the hosts of the test, starts dnsmasq (Debian's dnsmasq-base)
on 127.0.0.53 with the test's records, and bind-mounts a resolv.conf
naming it over /etc/resolv.conf, in that mount namespace only: Postfix's
smtp client, our prober and every other resolver in there see those
records and nothing else.  Mail servers of MX hosts listen on port 25,
as Postfix's smtp client expects them to: that port is the namespace's
own, never the machine's.  Everything ends with the namespace.

Decorated tests take no fixtures (the outer run must not build stacks
outside the namespace); they use ``Lan`` and ``stack.build_stack``
directly.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

INSIDE = os.environ.get("FLUSHCTL_IN_NETNS") == "1"
ROOT = Path(__file__).resolve().parent.parent
DNS_ADDRESS = "127.0.0.53"


def in_netns(fn):
    """Run the decorated test inside a network and mount namespace of its own."""

    @functools.wraps(fn)
    def outer():
        if INSIDE:
            return fn()
        if shutil.which("unshare") is None or shutil.which("dnsmasq") is None:
            pytest.skip("needs unshare (util-linux) and dnsmasq (dnsmasq-base)")
        nodeid = f"{fn.__code__.co_filename}::{fn.__name__}"
        proc = subprocess.run(
            ["unshare", "--net", "--mount", "--propagation", "private", "--",
             sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", nodeid],
            cwd=ROOT, env=dict(os.environ, FLUSHCTL_IN_NETNS="1"),
            capture_output=True, text=True, timeout=900)
        sys.stdout.write(proc.stdout[-20000:])
        assert proc.returncode == 0, (f"inside the namespace: exit {proc.returncode}\n"
                                      f"{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}")

    outer.__signature__ = __import__("inspect").Signature()   # no fixtures outside
    return outer


def run(*argv: str) -> None:
    subprocess.run(list(argv), check=True, capture_output=True, text=True, timeout=30)


class DNS:
    """One dnsmasq serving only the given records (authoritative for .test:
    any other name under it is NXDOMAIN)."""

    def __init__(self, address: str, records: dict):
        self.address = address
        self.dir = Path(tempfile.mkdtemp(prefix="flushctl-dns-"))
        self.log = self.dir / "queries.log"
        self.proc = None
        self.records = records

    def _conf(self) -> str:
        lines = ["no-resolv", "no-hosts", "bind-interfaces", f"listen-address={self.address}",
                 "port=53", "user=root", "local=/test/", "domain-needed",
                 f"log-facility={self.log}", "log-queries", f"pid-file={self.dir}/pid"]
        for (name, rtype), values in sorted(self.records.items()):
            for value in values:
                if rtype == "A" or rtype == "AAAA":
                    lines.append(f"host-record={name},{value}")
                elif rtype == "MX":
                    pref, host = value
                    lines.append(f"mx-host={name},{host},{pref}")
                else:
                    raise ValueError(f"record type {rtype} not supported")
        return "\n".join(lines) + "\n"

    def start(self) -> "DNS":
        conf = self.dir / "dnsmasq.conf"
        conf.write_text(self._conf())
        self.proc = subprocess.Popen(["dnsmasq", "--keep-in-foreground", f"--conf-file={conf}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        import dns.message
        import dns.query
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dnsmasq ended: {self.proc.stderr.read()}")
            try:
                dns.query.udp(dns.message.make_query("ready.test", "A"), self.address,
                              timeout=0.2)
                return self
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError("dnsmasq does not answer")
                time.sleep(0.1)

    def restart(self, records: dict) -> None:
        """Serve other records from now on (a DNS change, without waiting for TTLs)."""
        self.stop()
        self.records = records
        self.start()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        self.proc = None


class Lan:
    """Loopback with the test's addresses, dnsmasq for Postfix's resolver."""

    def __init__(self, addresses: list[str], records: dict):
        assert INSIDE, "Lan only runs inside a namespace of its own (@in_netns)"
        self.addresses = addresses
        self.dns = DNS(DNS_ADDRESS, records)
        self.extra: list[DNS] = []
        self.resolv = None

    def __enter__(self) -> "Lan":
        run("ip", "link", "set", "lo", "up")
        for address in self.addresses:
            if not address.startswith("127."):
                run("ip", "addr", "add", f"{address}/32", "dev", "lo")
        self.dns.start()
        fd, path = tempfile.mkstemp(prefix="flushctl-resolv-")
        with os.fdopen(fd, "w") as fh:
            fh.write(f"nameserver {DNS_ADDRESS}\noptions timeout:1 attempts:2\n")
        os.chmod(path, 0o644)
        self.resolv = path
        run("mount", "--bind", path, "/etc/resolv.conf")
        return self

    def second_dns(self, address: str, records: dict) -> DNS:
        """Another DNS server with other records (a resolver that disagrees)."""
        dns = DNS(address, records).start()
        self.extra.append(dns)
        return dns

    def __exit__(self, *exc) -> None:
        for dns in [self.dns, *self.extra]:
            dns.stop()
            shutil.rmtree(dns.dir, ignore_errors=True)
        subprocess.run(["umount", "/etc/resolv.conf"], capture_output=True)
        if self.resolv:
            os.unlink(self.resolv)
