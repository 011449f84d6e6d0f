"""The relays customers chose in the portal, the domains as they route now, and what a customer may point at.

A domain with ``relay_editable = true`` may have its next hop changed by
its customer (the portal's "where your mail goes"; ``relay_change``
makes the change).  The choices are kept in ``relays.json`` beside the
maps that ``flushctl apply`` writes: root's file, readable by all like the
transport map that says the same (it names no login).  Every process that
routes or probes a customer's mail (the milter, the poller, the release
helper, apply) takes its domains from here (``Overrides.domains``): the
configured domain, with the customer's relay in place of ``relay``.  A
choice holds only while the domain is ``relay_editable`` and its
configured ``relay`` and ``users`` are what they were when it was made
(its ``basis``): an admin who changes either, or who removes the domain,
takes the choice back, and apply drops it from the file.

The file: ``{"domains": {NAME: {"relay": NEXTHOP or null, "at": SECONDS,
"basis": HASH, "pending": BOOL}}}``; a null relay means "the configured
one" (kept so that the last change stays known); ``pending``: a change
whose reload and re-routing are not known to be done.

The rule of what a customer may point at (``target_refusal``, at the
change and again at every probe of its relay): a port an SMTP server
listens on, and addresses on the public internet only (or in ``[portal]
relay_allow``), never this host; a name whose lookups do not all succeed
is refused too.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import threading
import time
from dataclasses import replace

from flushctl.config import Config, Domain, relay_text

log = logging.getLogger("flushctl.relays")

FILE = "relays.json"
MAX_FILE = 8 * 1024 * 1024   # bytes: far more than a million domains' choices
CHECK_EVERY = 1.0            # seconds a process trusts its last look at the file


class RelaysError(Exception):
    """The file cannot be read or says something that is not a relay."""


def path_of(config: Config) -> str:
    from flushctl.mta.settings import map_dir
    return os.path.join(map_dir(config), FILE)


def basis(dom: Domain) -> str:
    """What a choice was made on: the configured relay and the users (hashed:
    the file is readable by all, and names no login)."""
    text = f"{dom.relay.nexthop if dom.relay else ''}\0{','.join(sorted(dom.users))}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse(text: str) -> dict[str, dict]:
    """The file's entries, each checked; ValueError says what is wrong."""
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("domains"), dict):
        raise ValueError('not {"domains": {...}}')
    entries = {}
    for name, entry in data["domains"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("at"), (int, float)) \
                or not isinstance(entry.get("basis"), str):
            raise ValueError(f"{name!r:.80}: not an entry")
        if entry.get("relay") is not None:
            if not isinstance(entry["relay"], str):
                raise ValueError(f"{name!r:.80}: not a relay")
            relay_text(entry["relay"])
        entries[name] = {"relay": entry.get("relay"), "at": float(entry["at"]),
                         "basis": entry["basis"], "pending": bool(entry.get("pending"))}
    return entries


def holds(dom: Domain | None, entry: dict) -> bool:
    """Does a choice still hold for the configured domain ``dom``?"""
    return dom is not None and dom.relay_editable and entry.get("basis") == basis(dom)


def render(entries: dict[str, dict]) -> str:
    return json.dumps({"domains": {n: entries[n] for n in sorted(entries)}}, indent=1) + "\n"


def read(config: Config) -> dict[str, dict]:
    """The entries now (none without a file); ``RelaysError`` for a file
    that cannot be read or is not ours."""
    path = path_of(config)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_FILE + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise RelaysError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE:
        raise RelaysError(f"{path}: larger than {MAX_FILE} bytes")
    try:
        return parse(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RelaysError(f"{path}: not a relays file: {exc}") from None


def effective(domains: dict[str, Domain], entries: dict[str, dict]) -> dict[str, Domain]:
    """``domains`` with each customer's chosen relay where it holds (pure)."""
    out = dict(domains.items())   # a DomainTable's pairs at once, not a lookup a name
    for name, entry in entries.items():
        dom = domains.get(name)
        if entry.get("relay") is not None and holds(dom, entry):
            out[name] = replace(dom, relay=relay_text(entry["relay"]), relay_chosen=True)
    return out


# -- what a customer may point at (pure) ----------------------------------------
SMTP_PORTS = (25, 587)     # below 1024, only these
# IPv6 forms that carry an IPv4 address a gateway may deliver to: NAT64
# (RFC 6052, RFC 8215), 6to4, IPv4-compatible, SIIT; and the old site-local
EMBEDDING = tuple(ipaddress.ip_network(n) for n in (
    "64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "::/96", "::ffff:0:0:0/96", "fec0::/10"))


def port_refusal(port: int) -> str | None:
    if port in SMTP_PORTS or port >= 1024:
        return None
    return f"port {port}: use 25, 587 or a port above 1023"


def address_refusal(host: str, addresses, allow, own=frozenset()) -> str | None:
    """Why mail may not go to these addresses: one of this host's (on any
    port: its other services are no customer's), or one that is not on
    the public internet (loopback, private, link-local, multicast, an IPv6
    form carrying an IPv4 address, ...) and not in ``allow``."""
    for text in addresses:
        addr = ipaddress.ip_address(text.split("%")[0])
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        # the address itself is not told: the customer could map the
        # provider's internal names with it
        name = host
        if str(addr) in own:
            return f"{name}: that is this host"
        embeds = addr.version == 6 and any(addr in net for net in EMBEDDING)
        public = addr.is_global and not addr.is_multicast and not embeds
        if not public and not any(addr in net for net in allow):
            return f"{name}: not an address on the internet"
    return None


def target_refusal(relay, candidates, problem: str, allow, own=frozenset()) -> str | None:
    """Why ``relay`` is refused: ``candidates`` and ``problem`` are a
    prober's strict ``targets`` for it (where Postfix would connect;
    nothing when that is this host, or when a lookup failed);
    ``own``: this host's addresses."""
    why = port_refusal(relay.port)
    if why:
        return why
    if not candidates:
        return problem or f"{relay.host}: no address"
    for host, _, addresses in candidates:
        why = address_refusal(host, addresses, allow, own)
        if why:
            return why
    return None


# -- one process's view, the file looked at no more than once a second --------
_lock = threading.Lock()
_files: dict[str, tuple[float, tuple | None, dict]] = {}   # path -> (looked, stamp, entries)


def _stamp(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns)


def forget(config: Config) -> None:
    """The next look reads the file again (this process just changed it)."""
    with _lock:
        looked = _files.get(path_of(config))
        if looked is not None:   # kept: a file that turns out broken changes nothing
            _files[path_of(config)] = (float("-inf"), ("forgotten",), looked[2])


_told: set[str] = set()   # problems already logged by this process


def _warn_once(text: str) -> None:
    if text not in _told:
        _told.add(text)
        log.warning("event=error stage=relays reason=%r", text)


def _entries(config: Config) -> tuple[tuple | None, dict]:
    path = path_of(config)
    now = time.monotonic()
    with _lock:
        looked = _files.get(path)
        if looked is not None and now - looked[0] < CHECK_EVERY:
            return looked[1], looked[2]
        try:
            stamp = _stamp(path)
        except OSError as exc:   # unreadable directory: what we knew stands
            _warn_once(f"{path}: {exc.strerror or exc}")
            stamp = looked[1] if looked else None
        if looked is not None and stamp == looked[1]:
            _files[path] = (now, stamp, looked[2])
            return stamp, looked[2]
        try:
            entries = read(config) if stamp is not None else {}
        except RelaysError as exc:
            _warn_once(str(exc))
            entries = looked[2] if looked else {}
        _files[path] = (now, stamp, entries)
        return stamp, entries


class Overrides:
    """The config's domains as they route now.  Costs nothing where no
    domain is editable."""

    def __init__(self, config: Config):
        self.config = config
        self.editable = bool(config.domains_where("relay_editable"))
        self._seen: tuple | None = None
        self._domains = config.domains

    def domains(self) -> dict[str, Domain]:
        if not self.editable:
            return self.config.domains
        stamp, entries = _entries(self.config)
        if stamp != self._seen:
            self._domains = effective(self.config.domains, entries)
            self._seen = stamp
        return self._domains

    def domain(self, dom: Domain) -> Domain:
        """``dom`` (a domain of the config) as it routes now."""
        return self.domains().get(dom.name, dom) if dom.relay_editable else dom

    def entry(self, name: str) -> dict | None:
        """The domain's last change, while it holds (None: there is none)."""
        dom = self.config.domains.get(name)
        if not self.editable or dom is None:
            return None
        entry = _entries(self.config)[1].get(name)
        return entry if entry is not None and holds(dom, entry) else None
