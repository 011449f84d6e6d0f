"""Does the customer's mail server answer?  Outcomes are values, not exceptions.

Where to knock: the domain's ``relay`` if set (``[host]:port`` as is,
``host:port`` through host's MX records), else the domain's own MX
records; our own MX hosts are left out; then each host's A and AAAA
records, in MX preference order.  A knock is a TCP connection and a 220
greeting within the timeout, then QUIT.

DNS goes through dnspython with its answers cached for their TTL; the
nameservers can be set (tests use a local server).  NXDOMAIN and Null MX
mean "nowhere to deliver": a result like any other.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
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


def choose_mx(domain: str, records: list[tuple[int, str]], own_hosts: frozenset[str]
              ) -> tuple[list[str], str]:
    """MX hosts to try, in preference order, without ours; and a problem text."""
    ordered = [host.rstrip(".").lower() for _, host in sorted(records, key=lambda r: r[0])]
    if not ordered or ordered == [""]:
        return [], f"{domain}: null MX (the domain accepts no mail)"
    hosts = [h for h in ordered if h and h not in own_hosts]
    if not hosts:
        return [], f"{domain}: every MX host is one of ours"
    return hosts, ""


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class Prober:
    """Probes with one resolver and its TTL cache; safe to share across probes."""

    def __init__(self, timeout: float = 10.0, own_hosts=(), nameservers=()):
        self.timeout = timeout
        self.own_hosts = frozenset(h.rstrip(".").lower() for h in own_hosts)
        if nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                                    for host, port in nameservers]
        else:
            resolver = dns.asyncresolver.Resolver()
        resolver.cache = dns.resolver.LRUCache(100_000)
        resolver.lifetime = timeout
        self.resolver = resolver

    async def query(self, name: str, rdtype: str):
        """(answer or None, problem text); NoAnswer is (None, '')."""
        try:
            return await self.resolver.resolve(name, rdtype), ""
        except dns.resolver.NXDOMAIN:
            return None, f"{name}: no such domain"
        except dns.resolver.NoAnswer:
            return None, ""
        except (dns.exception.DNSException, OSError) as exc:
            return None, f"{name}: DNS lookup failed ({exc.__class__.__name__})"

    async def hosts(self, dom: Domain) -> tuple[list[tuple[str, int]], str]:
        """(host, port) pairs to try, and a problem text when there are none."""
        if dom.relay is not None and not dom.relay.mx_lookup:
            return [(dom.relay.host, dom.relay.port)], ""
        name = dom.relay.host if dom.relay is not None else dom.name
        port = dom.relay.port if dom.relay is not None else 25
        answer, problem = await self.query(name, "MX")
        if answer is None:
            if problem:
                return [], problem
            return [(name, port)], ""  # no MX records: the name itself (RFC 5321)
        hosts, problem = choose_mx(name, [(r.preference, str(r.exchange)) for r in answer],
                                   self.own_hosts)
        return [(h, port) for h in hosts], problem

    async def addresses(self, host: str) -> tuple[list[str], str]:
        if is_ip(host):
            return [host], ""
        found, problems = [], []
        for rdtype in ("A", "AAAA"):
            answer, problem = await self.query(host, rdtype)
            if answer is not None:
                found.extend(r.address for r in answer)
            elif problem:
                problems.append(problem)
        if not found:
            return [], problems[0] if problems else f"{host}: no address records"
        return found, ""

    async def greet(self, address: str, port: int) -> tuple[str, str]:
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(address, port), self.timeout)
            line = await asyncio.wait_for(reader.readline(), self.timeout)
            text = line.decode("ascii", "replace").strip()
            if not text.startswith("220"):
                return BAD_GREETING, (text or "connection closed")[:80]
            writer.write(b"QUIT\r\n")
            await asyncio.wait_for(writer.drain(), self.timeout)
            return REACHABLE, text[:80]
        except asyncio.TimeoutError:
            return TIMEOUT, f"no greeting within {self.timeout:g}s"
        except ConnectionRefusedError:
            return REFUSED, "connection refused"
        except OSError as exc:
            return REFUSED, exc.strerror or str(exc)
        finally:
            if writer is not None:
                writer.close()

    async def probe(self, dom: Domain) -> ProbeResult:
        now = time.time()
        candidates, problem = await self.hosts(dom)
        result = ProbeResult(NO_ADDRESS, "", problem, now)
        for host, port in candidates:
            addresses, problem = await self.addresses(host)
            if not addresses:
                result = ProbeResult(NO_ADDRESS, f"{host}:{port}", problem, now)
                continue
            for address in addresses:
                outcome, detail = await self.greet(address, port)
                target = f"{host}:{port}" if host == address else f"{host}[{address}]:{port}"
                result = ProbeResult(outcome, target, detail, now)
                if outcome == REACHABLE:
                    return result
        return result


def probe(dom: Domain, prober: Prober) -> ProbeResult:
    """One probe from synchronous code (its own event loop)."""
    return asyncio.run(prober.probe(dom))
