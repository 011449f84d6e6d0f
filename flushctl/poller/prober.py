"""Does the customer's mail server answer?  Outcomes are values, not exceptions.

Where to knock: where Postfix will send the mail of one route (see
``routing``): the configured next hop if there is one (``[host]:port``
as is, ``host:port`` through host's MX records), else the route name's
own MX records; then each host's A and AAAA records, in MX preference
order.  MX hosts are chosen by Postfix's own rule (``routing.mx_targets``):
our hosts, and every MX of equal or worse preference than the best of
ours, are left out; when nothing is left there is nowhere to deliver
(NOWHERE), and nothing is released.  A knock is a TCP connection and a
220 greeting within the timeout, then QUIT.

DNS goes through dnspython with its answers cached for their TTL; the
nameservers can be set (tests use a local server).  NXDOMAIN and Null MX
mean "nowhere to deliver": a result like any other.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from dataclasses import dataclass

from flushctl.config import Domain, Relay
from flushctl.mta.routing import host_is_ours, mx_targets, relay_of

REACHABLE = "reachable"
REFUSED = "refused"
TIMEOUT = "timeout"
BAD_GREETING = "bad greeting"
NO_ADDRESS = "no address"
NOWHERE = "nowhere to deliver"   # every MX left is ours, or the next hop is this host
SMTP_PORT = 25


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


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class Prober:
    """Probes with one resolver and its TTL cache; safe to share across probes."""

    def __init__(self, timeout: float = 10.0, own_hosts=(), nameservers=(),
                 own_addresses=frozenset(), record_types=("A", "AAAA")):
        self.timeout = timeout
        self.record_types = tuple(record_types)   # Postfix's inet_protocols
        self.own_hosts = frozenset(h.rstrip(".").lower() for h in own_hosts)
        self.own_addresses = frozenset(own_addresses)
        # dnspython when a Prober is made, not when this module is imported:
        # every CLI call imports it (through the release), and dnspython's
        # resolver was a tenth of `flushctl status DOMAIN`
        import dns.asyncresolver
        import dns.nameserver
        import dns.resolver
        if nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [dns.nameserver.Do53Nameserver(n.host, n.port)
                                    for n in nameservers]
        else:
            resolver = dns.asyncresolver.Resolver()
        resolver.cache = dns.resolver.LRUCache(100_000)
        resolver.lifetime = timeout
        self.resolver = resolver
        # fence(relay, targets, problem): why a relay a customer chose may
        # not be used where it resolves now (None: it may); see mta.relays
        self.fence = None

    async def query(self, name: str, rdtype: str):
        """(answer or None, problem text); NoAnswer is (None, '')."""
        import dns.exception
        import dns.resolver
        try:
            return await self.resolver.resolve(name, rdtype), ""
        except dns.resolver.NXDOMAIN:
            return None, f"{name}: no such domain"
        except dns.resolver.NoAnswer:
            return None, ""
        except (dns.exception.DNSException, OSError) as exc:
            return None, f"{name}: DNS lookup failed ({exc.__class__.__name__})"

    async def targets(self, relay: Relay | None, name: str, strict: bool = False
                      ) -> tuple[list[tuple[str, int, list[str]]], str, str]:
        """(host, port, addresses) to try for a next hop, best first; else an
        outcome (NO_ADDRESS or NOWHERE) and the problem text.  ``relay``:
        the configured next hop; None: ``name``'s own MX records.
        ``strict``: a lookup that failed (not "no such name", not "no such
        record") fails it all, even when others answered."""
        if relay is not None and not relay.mx_lookup:
            addrs, problem = await self.addresses(relay.host, strict)
            if not addrs:
                return [], NO_ADDRESS, problem
            if self._ours(relay.host, addrs, relay.port):
                return [], NOWHERE, f"{relay.host}: the next hop is this host"
            return [(relay.host, relay.port, addrs)], "", ""
        lookup = relay.host if relay is not None else name
        port = relay.port if relay is not None else SMTP_PORT
        answer, problem = await self.query(lookup, "MX")
        if answer is None:
            if problem:
                return [], NO_ADDRESS, problem
            # no MX records: the name itself (RFC 5321)
            addrs, problem = await self.addresses(lookup, strict)
            if not addrs:
                return [], NO_ADDRESS, problem
            if self._ours(lookup, addrs, port):
                return [], NOWHERE, (f"{lookup}: has no MX records and is this host "
                                     f"(Postfix would say: loops back to myself)")
            return [(lookup, port, addrs)], "", ""
        records = [(r.preference, str(r.exchange).rstrip(".").lower()) for r in answer]
        hosts = sorted({h for _, h in records if h})
        found = await asyncio.gather(*(self.addresses(h, strict) for h in hosts))
        # a host that does not exist is passed over as Postfix does; one
        # whose lookup failed could be anything
        failed = [problem for addrs, problem in found
                  if strict and problem and not problem.endswith("no such domain")]
        if failed:
            return [], NO_ADDRESS, failed[0]
        addresses = {h: addrs for h, (addrs, _) in zip(hosts, found)}
        own_addrs = self.own_addresses if port == SMTP_PORT else frozenset()
        choice = mx_targets(lookup, records, addresses, self.own_hosts, own_addrs)
        if not choice.targets:
            return [], NOWHERE if choice.ours_best else NO_ADDRESS, choice.problem
        return [(h, port, list(addrs)) for h, addrs in choice.targets], "", ""

    def _ours(self, host: str, addrs: list[str], port: int) -> bool:
        """Is this next hop this host?  Names we know always; addresses only
        on port 25, where Postfix's smtp client looks for itself too."""
        own_addrs = self.own_addresses if port == SMTP_PORT else frozenset()
        return host_is_ours(host, addrs, self.own_hosts, own_addrs)

    async def addresses(self, host: str, strict: bool = False) -> tuple[list[str], str]:
        """(addresses, "") or ([], why not); ``strict``: ([], why) also when
        one of the lookups failed while another answered."""
        if is_ip(host):
            return [host], ""
        found, problems = [], []
        for rdtype in self.record_types:
            answer, problem = await self.query(host, rdtype)
            if answer is not None:
                found.extend(r.address for r in answer)
            elif problem:
                problems.append(problem)
        if strict and problems and not all(p.endswith("no such domain") for p in problems):
            return [], next(p for p in problems if not p.endswith("no such domain"))
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

    def same_view(self) -> "Prober":
        """A prober that resolves with the system's resolver, as Postfix's
        smtp client does, with this one's idea of ours, its families and
        its fence."""
        other = Prober(self.timeout, self.own_hosts, (), self.own_addresses, self.record_types)
        other.fence = self.fence
        return other

    async def route_targets(self, dom: Domain, route: str | None = None):
        """``targets`` for one route of a domain (default: the domain's own).
        A relay its customer chose is looked up strictly and must pass the
        fence where it resolves now: else there is nowhere to deliver."""
        route = route or dom.name
        relay = relay_of(dom, route)
        if self.fence is None or not dom.relay_chosen or route in dom.hosts:
            return await self.targets(relay, route)
        found, outcome, problem = await self.targets(relay, route, strict=True)
        why = self.fence(relay, found, problem) if found else None
        if why:
            return [], NOWHERE, f"{why} (the relay chosen in the portal)"
        return found, outcome, problem

    async def probe(self, dom: Domain, route: str | None = None) -> ProbeResult:
        """Knock where the mail of ``route`` (default: the domain) goes."""
        now = time.time()
        candidates, outcome, problem = await self.route_targets(dom, route)
        if not candidates:
            return ProbeResult(outcome, "", problem, now)
        result = ProbeResult(NO_ADDRESS, "", problem, now)
        for host, port, addresses in candidates:
            for address in addresses:
                outcome, detail = await self.greet(address, port)
                target = f"{host}:{port}" if host == address else f"{host}[{address}]:{port}"
                result = ProbeResult(outcome, target, detail, now)
                if outcome == REACHABLE:
                    return result
        return result


def probe(dom: Domain, prober: Prober, route: str | None = None) -> ProbeResult:
    """One probe from synchronous code (its own event loop)."""
    return asyncio.run(prober.probe(dom, route))


UNROUTABLE = "unroutable"   # ours resolves it, Postfix's smtp client cannot
NOT_PROBED = "not probed"
OUTCOMES = frozenset({REACHABLE, REFUSED, TIMEOUT, BAD_GREETING, NO_ADDRESS, NOWHERE,
                      UNROUTABLE, NOT_PROBED})


async def routable(other: Prober | None, dom: Domain,
                   results: dict[str, ProbeResult]) -> dict[str, ProbeResult]:
    """``results`` with each reachable route that ``other`` (a prober that
    resolves as Postfix's smtp client does, or None when the two cannot
    differ) cannot send anywhere marked UNROUTABLE: then the mail stays
    held, and says why."""
    reachable = [r for r, res in results.items() if res.reachable]
    if other is None or not reachable:
        return results
    found = await asyncio.gather(*(other.route_targets(dom, r) for r in reachable))
    checked = dict(results)
    for route, (targets, outcome, problem) in zip(reachable, found):
        if not targets:
            checked[route] = ProbeResult(
                UNROUTABLE, "", f"Postfix cannot route {route}: {problem or outcome} (the "
                "poller's nameservers can: see `flushctl check`)", time.time())
    return checked


def record_types(inet_protocols: str) -> tuple[str, ...]:
    """The address records Postfix uses under ``inet_protocols`` (pure)."""
    spec = set(inet_protocols.replace(",", " ").split())
    if not spec or "all" in spec:
        return ("A", "AAAA")
    return tuple(t for t, p in (("A", "ipv4"), ("AAAA", "ipv6")) if p in spec) or ("A",)


def describe(targets) -> str:
    """Targets as a short text: host[addr,addr]:port, best first."""
    return ", ".join(f"{h}[{','.join(sorted(a))}]:{p}" for h, p, a in targets) or "nothing"
