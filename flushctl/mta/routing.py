"""Where a customer's mail goes, as Postfix will route it (pure).

- A *route* is the destination one message goes to.  Mail for a customer
  domain with a ``relay`` goes to the relay, except hosts listed in
  ``hosts``, which have routes of their own; without a relay every host
  name under the domain (``pc1.customer.example``) is routed by its own
  DNS, as Postfix routes any domain (its MX records, else its address).
  The route's key is the domain itself when mail goes through its relay,
  else the host name (see ``route_of``).
- ``transport_entries``: the transport_maps lines that make Postfix route
  exactly so (an empty next hop means "the recipient's own domain").
- ``mx_targets``: the smtp client's rule for a domain's MX hosts.  It
  drops every MX host that is this host (Postfix compares addresses:
  inet_interfaces, proxy_interfaces) and every one of equal or worse
  preference; when this host is the best MX nothing is left and Postfix
  says "mail for DOMAIN loops back to myself".  We also treat as ours the
  names we know are ours (myhostname, [poller] own_hosts, the cluster's
  peers).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from flushctl.config import Domain, Relay


def route_of(dom: Domain, rcpt_domain: str) -> str:
    """The route key of mail for ``rcpt_domain`` (the domain or one of its hosts)."""
    host = rcpt_domain.lower().rstrip(".")
    best = None
    for listed in dom.hosts:
        if host == listed or host.endswith("." + listed):
            if best is None or len(listed) > len(best):
                best = listed
    if best is not None:
        return best
    if dom.relay is not None:
        return dom.name
    return host


def relay_of(dom: Domain, route: str) -> Relay | None:
    """The configured next hop of a route; None: the route name's own MX records."""
    if route in dom.hosts:
        return dom.hosts[route]
    if route == dom.name or dom.relay is not None:
        return dom.relay
    return None


def nexthop_text(relay: Relay | None) -> str:
    """A next hop as transport_maps writes it (empty: the recipient's domain)."""
    return relay.nexthop if relay is not None else ""


ODMR_TRANSPORT = "odmr"


def odmr_address(name: str) -> str:
    """The loopback address of an ODMR domain's relay: 127.A.B.C from a
    hash of the name, the same in every process and after every restart
    (never 127.0.x.x, where other services listen).  Two domains may share
    one; the relay takes only the recipients of the session's own domains."""
    import hashlib
    a, b, c = hashlib.sha256(name.encode()).digest()[:3]
    return f"127.{a or 1}.{b}.{c}"


def transport_entries(dom: Domain, transport: str, relay_port: int = 0) -> list[tuple[str, str]]:
    """(key, value) lines of transport_maps for one customer domain: the
    domain and its subdomains, then each listed host and its subdomains
    (an exact or nearer entry wins over a parent's in Postfix's lookup).
    An ODMR domain's mail goes to its relay on loopback, whose port only
    root may bind: it never leaves this host but over the customer's session."""
    if dom.odmr:
        value = f"{ODMR_TRANSPORT}:[{odmr_address(dom.name)}]:{relay_port}"
        return [(dom.name, value), ("." + dom.name, value)]
    entries = []
    value = f"{transport}:{nexthop_text(dom.relay)}"
    entries += [(dom.name, value), ("." + dom.name, value)]
    for host in sorted(dom.hosts):
        value = f"{transport}:{nexthop_text(dom.hosts[host])}"
        entries += [(host, value), ("." + host, value)]
    return entries


# -- our own addresses ------------------------------------------------------
def own_addresses(inet_interfaces: str, proxy_interfaces: str,
                  interface_addresses: list[str], resolve) -> frozenset[str]:
    """The addresses Postfix takes for itself (own_inet_addr_list plus
    proxy_inet_addr_list): every interface address for ``all``, the
    loopback ones for ``loopback-only``, else the listed names and
    addresses; then the proxy_interfaces.  ``resolve(name)`` gives a
    name's addresses."""
    found: set[str] = set()
    spec = inet_interfaces.replace(",", " ").split()
    if spec == ["all"] or not spec:
        found.update(_norm(a) for a in interface_addresses)
    elif spec == ["loopback-only"]:
        found.update(_norm(a) for a in interface_addresses if _is_loopback(a))
    else:
        for item in spec:
            found.update(_addresses_of(item, resolve))
    for item in proxy_interfaces.replace(",", " ").split():
        found.update(_addresses_of(item, resolve))
    found.discard("")
    return frozenset(found)


def _norm(address: str) -> str:
    try:
        addr = ipaddress.ip_address(address.split("%")[0].strip("[]"))
    except ValueError:
        return ""
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def _addresses_of(item: str, resolve) -> set[str]:
    text = item.strip("[]")
    if _norm(text):
        return {_norm(text)}
    return {_norm(a) for a in resolve(text)}


# -- Postfix's MX rule --------------------------------------------------------
@dataclass(frozen=True)
class MXChoice:
    targets: tuple[tuple[str, tuple[str, ...]], ...]   # (host, addresses), best first
    problem: str = ""      # why there are none
    ours_best: bool = False  # this host (or a peer) is the best MX: nowhere to deliver


def mx_targets(domain: str, records: list[tuple[int, str]],
               addresses: dict[str, list[str]], own_names: frozenset[str],
               own_addrs: frozenset[str]) -> MXChoice:
    """The MX hosts Postfix's smtp client would try for ``domain``, best first.

    ``records``: (preference, host); ``addresses``: each host's addresses
    (missing or empty: it has none).  Like smtp(8), hosts without an
    address are skipped; the first host (by preference) that is ours
    truncates the list at its preference.
    """
    ordered = sorted(((pref, host.rstrip(".").lower()) for pref, host in records),
                     key=lambda r: r[0])
    if not ordered or [h for _, h in ordered] == [""]:
        return MXChoice((), f"{domain}: null MX (the domain accepts no mail)")
    best_pref = ordered[0][0]
    self_pref = None
    for pref, host in ordered:
        addrs = {_norm(a) for a in addresses.get(host, [])}
        # like smtp(8), only among hosts with an address
        if addrs and (host in own_names or addrs & own_addrs):
            self_pref = pref
            break
    candidates = [(pref, host, tuple(addresses.get(host, [])))
                  for pref, host in ordered if host and addresses.get(host)]
    if self_pref is not None:
        candidates = [c for c in candidates if c[0] < self_pref]
    if candidates:
        return MXChoice(tuple((host, addrs) for _, host, addrs in candidates))
    if self_pref is not None and self_pref == best_pref:
        return MXChoice((), f"{domain}: this host is its best MX (Postfix would say: "
                            f"mail for {domain} loops back to myself)", ours_best=True)
    if self_pref is not None:
        return MXChoice((), f"{domain}: no MX host more preferred than ours has an address")
    return MXChoice((), f"{domain}: no MX host has an address")


def host_is_ours(host: str, addrs: list[str], own_names: frozenset[str],
                 own_addrs: frozenset[str]) -> bool:
    """A host without MX records (or a relay host): is it this host?"""
    return host.rstrip(".").lower() in own_names or bool({_norm(a) for a in addrs} & own_addrs)
