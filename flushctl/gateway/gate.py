"""Who may trigger a release, and how often (pure; the clock is passed in).

- a domain's ``flush_from`` networks (empty: anyone) decide who may;
  so does an SMTP AUTH login the domain names in ``users`` (ETRN after
  AUTH: Postfix tells the policy service its ``sasl_username``), in
  addition to the networks;
- a per-client token bucket stops floods; its size and refill are far
  above ordinary use (a dozen triggers a minute);
- triggers for one domain inside ``release_window`` seconds of the last
  release share its result instead of starting another;
- the cluster's peers (by address) may trigger any configured domain,
  whatever its ``flush_from``, and are not rate-limited: they pass on
  releases that were authorised where they started.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from flushctl.config import Domain

ALLOWED = "allowed"
NOT_ALLOWED = "not allowed"  # unknown domain or client outside flush_from: one answer for both
RATE_LIMITED = "rate limited"


def _address(client: str):
    """The client's address (an IPv4-mapped IPv6 one as IPv4), or None."""
    try:
        addr = ipaddress.ip_address(client)
    except ValueError:
        return None
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr


def client_allowed(dom: Domain | None, client: str) -> bool:
    addr = _address(client)
    if dom is None or addr is None:
        return False
    if not dom.flush_from:
        return True
    return any(addr in net for net in dom.flush_from)


def bucket_key(client: str) -> str:
    """IPv6 clients share a bucket per /64: one host can change its address within it."""
    try:
        addr = ipaddress.ip_address(client)
    except ValueError:
        return client
    if addr.version == 4:
        return str(addr)
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(ipaddress.ip_network(f"{addr}/64", strict=False))


@dataclass
class TokenBucket:
    capacity: float
    per_second: float
    tokens: float
    stamp: float

    def take(self, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.per_second)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


@dataclass
class Gate:
    domains: dict[str, Domain]
    per_minute: float = 60.0      # refill; a burst of ``burst`` is allowed at once
    burst: float = 30.0
    max_clients: int = 10000      # remembered buckets; the oldest go first
    buckets: dict[str, TokenBucket] = field(default_factory=dict)
    peers: frozenset[str] = frozenset()   # the cluster's peers' addresses

    def is_peer(self, client: str) -> bool:
        return bool(self.peers) and str(_address(client)) in self.peers

    def check(self, client: str, domain: str, now: float, login: str = "") -> str:
        """ALLOWED, NOT_ALLOWED or RATE_LIMITED for one trigger (``login``:
        the client's SMTP AUTH name, "" for none)."""
        if self.is_peer(client):
            return ALLOWED if domain in self.domains else NOT_ALLOWED
        if not self._take(client, now):
            return RATE_LIMITED
        dom = self.domains.get(domain)
        if login and dom is not None and login in dom.users:
            return ALLOWED
        if not client_allowed(dom, client):
            return NOT_ALLOWED
        return ALLOWED

    def _take(self, client: str, now: float) -> bool:
        client = bucket_key(client)
        bucket = self.buckets.get(client)
        if bucket is None:
            if len(self.buckets) >= self.max_clients:
                del self.buckets[next(iter(self.buckets))]  # the longest known
            bucket = self.buckets[client] = TokenBucket(self.burst, self.per_minute / 60.0,
                                                        self.burst, now)
        return bucket.take(now)
