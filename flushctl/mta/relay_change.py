"""A customer's change of where its mail goes: checked, put into the transport map, made to reach held mail.

``change`` (the release helper, for the portal):
1. under the maps' lock (``flushctl apply`` takes it too), the domain's two
   lines of the live transport map (the domain and its subdomains) are
   rewritten and the map built under a temporary name, then moved into
   place: the text first, then the table Postfix reads;
2. ``relays.json`` is replaced: every process routes and probes by it;
3. Postfix is reloaded if it runs.  Nothing in a queue file names a next
   hop: qmgr asks trivial-rewrite for every message it takes in, and the
   reload ends the processes that still hold the old answer, so mail held,
   deferred, or in the active queue all goes to the new target.
A helper killed between 1 and 2 leaves a map that relays.json does not
explain; ``reconcile``, at the helper's start, makes the lines of every
editable domain say what the config and relays.json say.

``target_refusal`` is the rule of what a customer may point its mail at:
a port an SMTP server listens on, and addresses on the public internet
(or in ``[portal] relay_allow``), never this host.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace

from flushctl.config import Config, Domain, Relay
from flushctl.mta import relays
from flushctl.mta.commands import Postfix, PostfixError
from flushctl.mta.routing import transport_entries

log = logging.getLogger("flushctl.relays")

MIN_INTERVAL = 10.0        # seconds between two changes of one domain (each reloads Postfix)
SMTP_PORTS = (25, 587)     # below 1024, only these


class RelayChangeError(Exception):
    """Why the relay stays as it was, in words for the customer."""


@contextmanager
def maps_lock(config: Config):
    """The maps of this config, one writer at a time (apply, a relay
    change): a lock on the Postfix config directory itself, which leaves
    no file behind."""
    fd = os.open(config.config_directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- what a customer may point at (pure) ----------------------------------------
def port_refusal(port: int) -> str | None:
    if port in SMTP_PORTS or port >= 1024:
        return None
    return f"port {port}: use 25, 587 or a port above 1023"


def address_refusal(host: str, addresses, allow, own=frozenset()) -> str | None:
    """Why mail may not go to these addresses: one of this host's (on any
    port: its other services are no customer's), or one that is not on
    the public internet (loopback, private, link-local, ...) and not in
    ``allow``."""
    for text in addresses:
        addr = ipaddress.ip_address(text.split("%")[0])
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        name = f"{host} ({addr})" if host != str(addr) else str(addr)
        if str(addr) in own:
            return f"{name}: that is this host"
        public = addr.is_global and not addr.is_multicast
        if not public and not any(addr in net for net in allow):
            return f"{name}: not an address on the internet"
    return None


def target_refusal(relay: Relay, candidates, problem: str, allow,
                   own=frozenset()) -> str | None:
    """Why ``relay`` is refused: ``candidates`` and ``problem`` are the
    prober's ``targets`` for it (where Postfix would connect, nothing when
    that is this host); ``own``: this host's addresses."""
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


def with_lines(text: str, name: str, lines: list[str]) -> str:
    """The transport map ``text`` with the entries of ``name`` and
    ``.name`` replaced by ``lines`` where the first of them stood (pure);
    ValueError when it has none (the domain was never applied)."""
    keys = {name, "." + name}
    out, placed = [], False
    for line in text.splitlines(keepends=True):
        fields = line.split(None, 1)
        if fields and not line.startswith("#") and fields[0] in keys:
            if not placed:
                out.extend(lines)
                placed = True
            continue
        out.append(line)
    if not placed:
        raise ValueError(f"{name}: not in the transport map (run `flushctl apply`)")
    return "".join(out)


def _lines(config: Config, dom: Domain) -> list[str]:
    port = config.odmr.relay_port if config.odmr else 0
    return [f"{key}\t{value}\n"
            for key, value in transport_entries(dom, config.transport_name, port)[:2]]


# -- the map ------------------------------------------------------------------------
def _write_transport(config: Config, pf: Postfix, doms: list[Domain],
                     applied_only: bool = False) -> list[str]:
    """Make the live map route ``doms`` so; the names it changed.  With
    ``applied_only``, a domain the map does not have yet is left out."""
    from flushctl.mta.settings import map_dir
    directory = map_dir(config)
    final = os.path.join(directory, "transport")
    try:
        with open(final) as fh:
            text = fh.read()
    except FileNotFoundError:
        raise RelayChangeError("there is no transport map yet (run `flushctl apply`)") from None
    changed, new = [], text
    for dom in doms:
        try:
            after = with_lines(new, dom.name, _lines(config, dom))
        except ValueError as exc:
            if applied_only:
                continue
            raise RelayChangeError(str(exc)) from None
        if after != new:
            changed.append(dom.name)
        new = after
    if not changed and os.path.exists(final + ".db"):
        return []
    fd, tmp = tempfile.mkstemp(prefix=".transport.", dir=directory)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(new)
        os.chmod(tmp, 0o644)
        pf.postmap(f"hash:{tmp}")
        os.replace(tmp, final)             # the text first: a stop here, and
        os.replace(tmp + ".db", final + ".db")   # reconcile sees the difference
    except PostfixError as exc:
        raise RelayChangeError(f"the transport map could not be built: {exc}") from None
    finally:
        for leftover in (tmp, tmp + ".db"):
            if os.path.lexists(leftover):
                os.unlink(leftover)
    return changed


def _write_entries(config: Config, entries: dict) -> None:
    path = relays.path_of(config)
    fd, tmp = tempfile.mkstemp(prefix=".relays.", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(relays.render(entries))
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    relays.forget(config)


def _reload(pf: Postfix) -> str:
    """Reload a running Postfix; a warning when that failed ("" when done)."""
    try:
        if pf.running():
            pf.reload()
        return ""
    except PostfixError as exc:
        log.error("event=error stage=relay_reload reason=%r", str(exc))
        return ("Postfix could not be reloaded: mail already on its way may go to the "
                "old target until it is")


def change(config: Config, pf: Postfix, name: str, relay: Relay | None, by: str,
           now: float | None = None) -> tuple[Domain, str]:
    """Send the domain's mail to ``relay`` from now on (None: to the
    configured relay again), held mail included.  Returns the domain as it
    routes now, and a warning ("" when none); ``RelayChangeError`` when
    nothing changed."""
    now = time.time() if now is None else now
    dom = config.domains[name]
    if not dom.relay_editable:
        raise RelayChangeError(f"{name}: where its mail goes is set by the provider")
    with maps_lock(config):
        try:
            entries = relays.read(config)
        except relays.RelaysError as exc:
            raise RelayChangeError(str(exc)) from None
        last = entries.get(name)
        if last is not None and 0 <= now - last["at"] < MIN_INTERVAL:
            raise RelayChangeError(f"{name}: changed {now - last['at']:.0f} s ago; "
                                   f"wait {MIN_INTERVAL:.0f} s between changes")
        entries[name] = {"relay": relay.nexthop if relay is not None else None,
                         "by": by, "at": now}
        routed = replace(dom, relay=relay if relay is not None else dom.relay)
        _write_transport(config, pf, [routed])
        _write_entries(config, entries)
    return routed, _reload(pf)


def reconcile(config: Config, pf: Postfix) -> list[str]:
    """Make the transport map's lines of every editable domain say what the
    config and relays.json say (after a change cut short); the domains
    whose lines changed."""
    if not any(d.relay_editable for d in config.domains.values()):
        return []
    with maps_lock(config):
        try:
            domains = relays.effective(config.domains, relays.read(config))
            editable = [d for d in domains.values() if d.relay_editable]
            changed = _write_transport(config, pf, editable, applied_only=True)
        except (relays.RelaysError, RelayChangeError) as exc:
            log.warning("event=error stage=relay_reconcile reason=%r", str(exc))
            return []
    if changed:
        log.warning("event=relay_reconciled domains=%s", ",".join(changed))
        _reload(pf)
    return changed
