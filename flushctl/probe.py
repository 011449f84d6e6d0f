"""Does the customer's mail server answer?  Outcomes are values, not exceptions.

A probe connects to each candidate address in turn and waits for a 220
greeting, then says QUIT.  Where the candidates come from: the domain's
``relay`` (``[host]:port`` as is; ``host:port`` through its MX records),
else the domain's own MX records.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import dns.exception
import dns.resolver

from .config import Domain

REACHABLE = "reachable"
REFUSED = "refused"
TIMEOUT = "timeout"
BAD_GREETING = "bad greeting"
NO_ADDRESS = "no address"


@dataclass(frozen=True)
class ProbeResult:
    outcome: str
    target: str = ""
    detail: str = ""
    when: float = 0.0

    @property
    def reachable(self) -> bool:
        return self.outcome == REACHABLE

    def text(self) -> str:
        where = f" ({self.target})" if self.target else ""
        return f"{self.outcome}{where}" + (f": {self.detail}" if self.detail else "")


def mx_hosts(domain: str, own_hosts: frozenset[str], resolver=None) -> tuple[list[str], str]:
    """MX hosts in preference order without our own; (hosts, problem)."""
    res = resolver or dns.resolver.Resolver()
    try:
        answer = res.resolve(domain, "MX")
    except dns.resolver.NXDOMAIN:
        return [], f"{domain}: no such domain"
    except dns.resolver.NoAnswer:
        return [domain], ""  # RFC 5321 implicit MX
    except (dns.exception.DNSException, OSError) as exc:
        return [], f"{domain}: DNS lookup failed: {exc.__class__.__name__}"
    records = sorted(answer, key=lambda r: r.preference)
    hosts = [str(r.exchange).rstrip(".").lower() for r in records]
    if hosts == [""]:
        return [], f"{domain}: null MX (the domain accepts no mail)"
    hosts = [h for h in hosts if h not in own_hosts]
    if not hosts:
        return [], f"{domain}: every MX host is one of ours"
    return hosts, ""


def targets(dom: Domain, own_hosts: frozenset[str] = frozenset(), resolver=None
            ) -> tuple[list[tuple[str, int]], str]:
    """(host, port) pairs to try, and a problem text when there are none."""
    if dom.relay is not None and not dom.relay.mx_lookup:
        return [(dom.relay.host, dom.relay.port)], ""
    lookup = dom.relay.host if dom.relay is not None else dom.name
    port = dom.relay.port if dom.relay is not None else 25
    hosts, problem = mx_hosts(lookup, own_hosts, resolver)
    return [(h, port) for h in hosts], problem


def _greeting(host: str, port: int, timeout: float) -> tuple[str, str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return NO_ADDRESS, str(exc)
    last = (NO_ADDRESS, f"{host} has no address")
    for family, stype, proto, _, addr in infos:
        try:
            with socket.socket(family, stype, proto) as sock:
                sock.settimeout(timeout)
                sock.connect(addr)
                reply = b""
                while not reply.endswith(b"\n") and len(reply) < 4096:
                    chunk = sock.recv(1024)
                    if not chunk:
                        break
                    reply += chunk
                # multi-line greeting: the last line starts "220 "
                lines = reply.decode("ascii", "replace").splitlines()
                if lines and lines[0].startswith("220"):
                    try:
                        sock.sendall(b"QUIT\r\n")
                    except OSError:
                        pass
                    return REACHABLE, lines[0][:80]
                last = (BAD_GREETING, (lines[0] if lines else "connection closed")[:80])
        except socket.timeout:
            last = (TIMEOUT, f"no greeting within {timeout:g}s")
        except ConnectionRefusedError:
            last = (REFUSED, "connection refused")
        except OSError as exc:
            last = (REFUSED, exc.strerror or str(exc))
    return last


def probe(dom: Domain, timeout: float = 10.0, own_hosts: frozenset[str] = frozenset(),
          resolver=None) -> ProbeResult:
    now = time.time()
    candidates, problem = targets(dom, own_hosts, resolver)
    if not candidates:
        return ProbeResult(NO_ADDRESS, "", problem, now)
    result = ProbeResult(NO_ADDRESS, "", problem, now)
    for host, port in candidates:
        outcome, detail = _greeting(host, port, timeout)
        result = ProbeResult(outcome, f"{host}:{port}", detail, now)
        if outcome == REACHABLE:
            return result
    return result
