"""A customer's change of where its mail goes: put into the transport map, made to reach held mail.

``change`` (the release helper, for the portal), all under the maps' lock
(a root-only file beside the maps; ``flushctl apply`` takes it too):
1. only while the helper's config is the one apply made live (its digest
   in applied.json): the map's other lines are apply's, and a config
   edited since says nothing yet;
2. the domain's two lines of the live transport map (the domain and its
   subdomains) are rewritten and the map built under a temporary name,
   then moved into place: the text first, then the table Postfix reads;
3. ``relays.json`` is replaced, the change marked pending: every process
   routes and probes by it;
4. Postfix is reloaded if it runs (at most one reload every 2 s).  Nothing
   in a queue file names a next hop: qmgr asks trivial-rewrite for every
   message it takes in, and the reload ends the processes that still hold
   the old answer, so mail held, deferred, or in the active queue all
   goes to the new target.
Then the caller re-routes the ledger's rows (``HeldMail.route_anew``) and
marks the change ``settled``.  A helper stopped anywhere in between is
mended at its next start: ``reconcile`` makes the lines of every editable
domain say what the config and relays.json say, reloads, and names the
domains whose rows are to be routed anew.  A change to where the mail
goes already changes nothing.
"""

from __future__ import annotations

import fcntl
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

LOCK = ".flushctl.lock"
LOCK_WAIT = 60.0           # seconds to wait for another apply or change
MIN_INTERVAL = 10.0        # seconds between two changes of one domain
RELOAD_EVERY = 2.0         # seconds between two reloads for changes, whatever the domain


class RelayChangeError(Exception):
    """Why the relay stays as it was, in words for the customer; ``busy``:
    nothing is wrong with the request, only its time (try again later)."""

    def __init__(self, text: str, busy: bool = False):
        super().__init__(text)
        self.busy = busy


@contextmanager
def maps_lock(config: Config, wait: float = LOCK_WAIT):
    """The maps of this config, one writer at a time (apply, a relay
    change): a file of root's alone beside the maps (no other user can
    take the lock and stall them)."""
    from flushctl.mta.settings import map_dir
    directory = map_dir(config)
    if not os.path.isdir(directory):
        os.makedirs(directory, exist_ok=True)
        os.chmod(directory, 0o755)   # whatever the umask: the milter and poller read here
    fd = os.open(os.path.join(directory, LOCK),
                 os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RelayChangeError("another apply or change of a relay is under way; "
                                           "try again shortly", busy=True) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


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


DIGEST = "applied-config"   # beside the maps: the digest of the config apply made live


def stage_digest(config: Config) -> tuple[str, str]:
    """For apply: the config's digest under a temporary name, and the name
    to move it to once everything else is in place."""
    from flushctl.mta.settings import map_dir
    path = os.path.join(map_dir(config), DIGEST)
    fd, tmp = tempfile.mkstemp(prefix=".applied-config.", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as fh:
        fh.write(config.digest + "\n")
    os.chmod(tmp, 0o644)
    return tmp, path


def live(config: Config) -> bool:
    """Is ``config`` the one the last apply made live?  (Read from root's
    directory beside the maps: nothing another user wrote.)"""
    from flushctl.mta.settings import map_dir
    try:
        fd = os.open(os.path.join(map_dir(config), DIGEST),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    with os.fdopen(fd) as fh:
        return bool(config.digest) and fh.read(200).strip() == config.digest


# -- the files ----------------------------------------------------------------------
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


def _read(config: Config) -> dict[str, dict]:
    try:
        return relays.read(config)
    except relays.RelaysError as exc:
        log.error("event=error stage=relays reason=%r", str(exc))
        raise RelayChangeError("the provider's record of relays is damaged; "
                               "ask your provider") from None


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


_last_reload = float("-inf")


def _reload(pf: Postfix) -> str:
    """Reload a running Postfix, at most every RELOAD_EVERY seconds (the
    caller holds the lock: changes wait their turn); a warning when that
    failed ("" when done)."""
    global _last_reload
    time.sleep(max(0.0, RELOAD_EVERY - (time.monotonic() - _last_reload)))
    try:
        if pf.running():
            pf.reload()
        return ""
    except PostfixError as exc:
        log.error("event=error stage=relay_reload reason=%r", str(exc))
        return ("Postfix could not be reloaded: mail already on its way may go to the "
                "old target until it is")
    finally:
        _last_reload = time.monotonic()


# -- the change -----------------------------------------------------------------------
def check_rate(config: Config, name: str, now: float) -> None:
    """``RelayChangeError`` (busy) when the domain changed too recently:
    before anything slow is done for a new change."""
    entry = _read(config).get(name)
    if entry is not None and relays.holds(config.domains.get(name), entry) \
            and 0 <= now - entry["at"] < MIN_INTERVAL:
        raise RelayChangeError(f"{name}: changed {now - entry['at']:.0f} s ago; wait "
                               f"{MIN_INTERVAL:.0f} s between changes", busy=True)


def change(config: Config, pf: Postfix, name: str, relay: Relay | None,
           now: float | None = None) -> tuple[Domain, str, bool]:
    """Send the domain's mail to ``relay`` from now on (None: to the
    configured relay again), held mail included.  Returns the domain as it
    routes now, a warning ("" when none), and whether anything changed
    (then the caller routes the held mail anew and calls ``settled``);
    ``RelayChangeError`` when nothing changed and something was wrong."""
    dom = config.domains[name]
    if not dom.relay_editable:
        raise RelayChangeError(f"{name}: where its mail goes is set by the provider")
    try:
        return _change(config, pf, dom, relay, now)
    except OSError as exc:
        log.error("event=error stage=relay_change domain=%s reason=%r", name, str(exc))
        raise RelayChangeError("the change could not be made here; nothing changed "
                               "(the provider's log says why)") from None


def _change(config: Config, pf: Postfix, dom: Domain, relay: Relay | None,
            now: float | None) -> tuple[Domain, str, bool]:
    name = dom.name
    with maps_lock(config):
        now = time.time() if now is None else now   # the change starts once it has the lock
        if not live(config):
            raise RelayChangeError("the provider is changing this host's configuration; "
                                   "try again later", busy=True)
        entries = _read(config)
        last = entries.get(name)
        if last is not None and not relays.holds(dom, last):
            last = None
        current = relays.effective({name: dom}, {name: last} if last else {})[name]
        wanted = relay if relay is not None else dom.relay
        routed = replace(dom, relay=wanted, relay_chosen=relay is not None)
        if _text(current.relay) == _text(wanted) and not (last and last["pending"]):
            return routed, "", False
        check_rate(config, name, now)
        entries[name] = {"relay": relay.nexthop if relay is not None else None, "at": now,
                         "basis": relays.basis(dom), "pending": True}
        _write_transport(config, pf, [routed])
        _write_entries(config, entries)
        warning = _reload(pf)
    return routed, warning, True


def _text(relay: Relay | None) -> str | None:
    return relay.nexthop if relay is not None else None


def settled(config: Config, name: str) -> None:
    """The domain's change is done (reloaded, its mail routed anew)."""
    with maps_lock(config):
        entries = _read(config)
        if name in entries and entries[name]["pending"]:
            entries[name]["pending"] = False
            _write_entries(config, entries)


def applied(given: Config) -> None:
    """For apply, once it is whole (under the lock): drop the customers'
    choices that no longer hold (they route nothing already)."""
    dropped = prune(given)
    if dropped:
        log.info("event=relay_choice_dropped domains=%s", ",".join(dropped))


def prune(config: Config) -> list[str]:
    """Drop the choices that no longer hold (the domain gone, not editable,
    or its configured relay or users changed).  For apply, which holds the
    lock; the domains dropped."""
    try:
        entries = relays.read(config)
    except relays.RelaysError as exc:
        raise RelayChangeError(str(exc)) from None
    gone = sorted(n for n, e in entries.items() if not relays.holds(config.domains.get(n), e))
    if gone:
        _write_entries(config, {n: e for n, e in entries.items() if n not in gone})
    return gone


def reconcile(config: Config, pf: Postfix) -> list[str]:
    """At the helper's start: make the transport map's lines of every
    editable domain say what the config and relays.json say (after a
    change cut short), and reload when they did not or a change is still
    pending.  Returns the domains whose held mail is to be routed anew
    (then ``settled``).  Nothing when the config is not the applied one."""
    if not config.domains_where("relay_editable"):
        return []
    with maps_lock(config):
        if not live(config):
            log.warning("event=relay_reconcile_skipped reason=config_not_applied")
            return []
        try:
            entries = relays.read(config)
            domains = relays.effective(config.domains, entries)
            editable = [d for d in domains.values() if d.relay_editable]
            changed = _write_transport(config, pf, editable, applied_only=True)
        except (relays.RelaysError, RelayChangeError) as exc:
            log.warning("event=error stage=relay_reconcile reason=%r", str(exc))
            return []
        pending = [n for n, e in entries.items()
                   if e["pending"] and relays.holds(config.domains.get(n), e)]
        if changed or pending:
            if changed:
                log.warning("event=relay_reconciled domains=%s", ",".join(changed))
            _reload(pf)
    return sorted(set(changed) | set(pending))
