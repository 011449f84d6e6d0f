"""The library behind every command: status, flush, pause, resume, purge.

Held mail lives in Postfix's hold queue (the milter quarantines it), where
it never expires.  A release probes the customer's server first: a message
released with ``postsuper -H`` keeps its creation time, and Postfix returns
a message to its sender as soon as an attempt fails after
``maximal_queue_lifetime``; so nothing is released toward a server that
does not answer, and whatever fails after a release is put back on hold
(``sweep``) before Postfix tries it again.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from . import names
from . import holdsecret
from .settings import HOLD_HEADER, TAG_HEADER, hold_table
from .config import Config, Domain
from .ledger import DomainState, Ledger
from .postfix import Postfix, PostfixError
from .probe import Prober, ProbeResult, probe
from .queuefiles import QueueLayout, parse_duration, parse_postcat

# How long after a release the sweep watches the domain at least.
RELEASE_WATCH = 900.0
# How long a refresh waits for pickup and cleanup to bring requeued mail back.
REFRESH_WAIT = 60.0


log = logging.getLogger("flushctl.release")

class Refused(Exception):
    """A request that is understood but not carried out (paused, unreachable)."""

    def __init__(self, text: str, code: str):
        super().__init__(text)
        self.code = code


@dataclass(frozen=True)
class Located:
    """Where each of a domain's ledger entries is right now."""

    by_queue: dict[str, list[str]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    arrivals: dict[str, float] = field(default_factory=dict)
    mtimes: dict[str, float] = field(default_factory=dict)
    ctimes: dict[str, float] = field(default_factory=dict)
    gone: list[str] = field(default_factory=list)

    def ids(self, *queues: str) -> list[str]:
        return [qid for q in queues for qid in self.by_queue.get(q, [])]

    @property
    def present(self) -> list[str]:
        return [qid for ids in self.by_queue.values() for qid in ids]

    def figures(self) -> tuple[int, int, float | None]:
        """Held messages, bytes, and the oldest arrival (None: nothing held)."""
        present = self.present
        return (len(present), sum(self.sizes[q] for q in present),
                min((self.arrivals[q] for q in present), default=None))


@dataclass(frozen=True)
class Status:
    domain: str
    messages: int
    bytes: int
    oldest_arrival: float | None
    reachable: bool | None
    last_probe: float | None
    last_error: str | None
    last_flush: float | None
    last_flush_trigger: str | None
    last_flush_result: str | None
    last_flush_client: str | None
    paused: bool
    queues: dict[str, int]

    def as_json(self) -> dict:
        return {
            "domain": self.domain, "messages": self.messages, "bytes": self.bytes,
            "oldest_arrival": self.oldest_arrival, "reachable": self.reachable,
            "last_probe": self.last_probe, "last_error": self.last_error,
            "last_flush": self.last_flush, "last_flush_trigger": self.last_flush_trigger,
            "last_flush_result": self.last_flush_result,
            "last_flush_client": self.last_flush_client, "paused": self.paused,
            "queues": self.queues,
        }


@dataclass(frozen=True)
class FlushResult:
    domain: str
    released: int
    probe: ProbeResult | None
    forwarded: int = 0   # peers of the cluster this release is sent on to


class OnDemand:
    def __init__(self, config: Config, postfix: Postfix | None = None,
                 layout: QueueLayout | None = None, ledger: Ledger | None = None):
        self.config = config
        self.postfix = postfix or Postfix(config.config_directory)
        self._layout = layout
        self._stale_after: float | None = None
        self._prober: Prober | None = None
        self.ledger = ledger or Ledger(config.state_directory)
        # a ledger file new to us (first run, removed, corrupt) is rebuilt
        # from the queue's tag headers before it is trusted
        self._rebuilt = 0 if self.ledger.fresh else self.ledger.generation

    def needs_rebuild(self) -> bool:
        """Is the ledger file new to us (removed, replaced, corrupt)? One stat."""
        self.ledger.check_file()
        return self._rebuilt != self.ledger.generation

    def rebuild_if_needed(self) -> dict[str, int]:
        """Rebuild the ledger from the hold queue if its file is new to us."""
        if not self.needs_rebuild():
            return {}
        self._rebuilt = self.ledger.generation
        return self.adopt()

    @property
    def layout(self) -> QueueLayout:
        if self._layout is None:
            self._layout = QueueLayout.from_params(self.postfix.get(
                "queue_directory", "hash_queue_names", "hash_queue_depth"))
        return self._layout

    def domain(self, name: str) -> Domain:
        return self.config.domain(name)

    def stale_after(self) -> float:
        """Seconds after which held mail is refreshed before a release.

        Postfix returns a message once an attempt fails after
        create_time + maximal_queue_lifetime (bounce_queue_lifetime for
        bounces).  Held mail older than half of that gets a new clock
        first, so a failed attempt right after a release never returns it.
        """
        if self._stale_after is None:
            values = self.postfix.get("maximal_queue_lifetime", "bounce_queue_lifetime")
            self._stale_after = min(parse_duration(v) for v in values.values()) / 2
        return self._stale_after

    # -- reading -----------------------------------------------------------
    def locate(self, domain: str) -> Located:
        self.rebuild_if_needed()
        located = Located()
        for entry in self.ledger.entries(domain):
            found = self.layout.locate(entry.queue_id)
            if found is None:
                located.gone.append(entry.queue_id)
                continue
            queue, st = found
            located.by_queue.setdefault(queue, []).append(entry.queue_id)
            located.sizes[entry.queue_id] = entry.size
            located.arrivals[entry.queue_id] = entry.arrival
            located.mtimes[entry.queue_id] = st.st_mtime
            located.ctimes[entry.queue_id] = entry.ctime
        if located.gone:
            self.ledger.forget(located.gone)
        return located

    def status(self, domain: str) -> Status:
        dom = self.domain(domain).name
        located = self.locate(dom)
        return self._status(dom, located, self.ledger.state(dom))

    def status_if_empty(self, domain: str) -> Status | None:
        """The status of a domain the ledger records nothing for, from one row
        read (no queue access); None when it may hold mail or is paused."""
        dom = self.domain(domain).name
        self.rebuild_if_needed()
        state = self.ledger.state(dom)
        if state.messages > 0 or state.paused:
            return None
        return self._status(dom, Located(), state)

    @staticmethod
    def _status(dom: str, located: Located, state) -> Status:
        messages, size, oldest = located.figures()
        return Status(
            domain=dom,
            messages=messages,
            bytes=size,
            oldest_arrival=oldest,
            reachable=state.reachable, last_probe=state.last_probe, last_error=state.last_error,
            last_flush=state.last_flush, last_flush_trigger=state.last_flush_trigger,
            last_flush_result=state.last_flush_result,
            last_flush_client=state.last_flush_client, paused=state.paused,
            queues={q: len(ids) for q, ids in sorted(located.by_queue.items())},
        )

    def status_all(self) -> list[Status]:
        """Every configured domain's status (see ``located_all``)."""
        return [self._status(name, located or Located(), state)
                for name, located, state in self.located_all()]

    def located_all(self):
        """(domain, Located or None, DomainState) for every configured domain:
        one read of all the domains' rows, and the queue looked at only for
        those whose totals show mail (None: nothing held); the cost follows
        the domains with mail, not the configured ones."""
        self.rebuild_if_needed()
        states = self.ledger.states()
        for name in sorted(self.config.domains):
            state = states.get(name)
            if state is None or state.messages <= 0:
                yield name, None, state or DomainState(name)
            else:   # the row's other fields stand; the counts come from the queue
                yield name, self.locate(name), state

    # -- releasing ---------------------------------------------------------
    @property
    def prober(self) -> Prober:
        """One prober (and DNS cache) for this process; our own hosts left out."""
        if self._prober is None:
            self._prober = Prober(self.config.probe_timeout, self.own_hosts(),
                                  self.config.nameservers)
        return self._prober

    def own_hosts(self) -> set[str]:
        """Our MX hosts: [poller] own_hosts and Postfix's myhostname."""
        own = set(self.config.own_hosts)
        try:
            own.add(self.postfix.get("myhostname")["myhostname"].lower())
        except (PostfixError, KeyError):
            pass
        return own

    def record_probe(self, domain: str, result: ProbeResult) -> None:
        self.ledger.record_probe(domain, result.reachable,
                                 None if result.reachable else result.text(), result.when,
                                 result.outcome.replace(" ", "_"))

    def probe(self, domain: str) -> ProbeResult:
        dom = self.domain(domain)
        result = probe(dom, self.prober)
        self.record_probe(dom.name, result)
        return result

    def flush(self, domain: str, trigger: str = "admin", client: str | None = None,
              probed: ProbeResult | None = None) -> FlushResult:
        """Release the domain's held mail toward its server, if that answers.

        ``probed``: a probe the caller has just made (the poller), instead
        of probing again.
        """
        dom = self.domain(domain).name
        # the other backup MX hosts release too, whatever happens here
        forwarded = self.send_on(dom, trigger)
        if self.ledger.state(dom).paused:
            raise Refused(f"{dom}: paused; `flushctl resume {dom}` first", "paused")
        if not self.locate(dom).present:
            return FlushResult(dom, 0, None, forwarded)
        result = probed if probed is not None else self.probe(dom)
        if not result.reachable:
            # not a release: the probe result (status: last_error) says why
            raise Refused(f"{dom}: mail server not reachable ({result.text()}); "
                          "the mail stays held", "unreachable")
        released = self._release(dom, trigger, client)
        return FlushResult(dom, released, result, forwarded)

    def send_on(self, dom: str, trigger: str) -> int:
        """Queue the release of ``dom`` for every peer of the cluster (the
        gateway sends it as ETRN); not one that came from a peer."""
        cluster = self.config.cluster
        if cluster is None or trigger == "peer":
            return 0
        self.ledger.queue_forwards(dom, cluster.peers)
        return len(cluster.peers)

    def _release(self, dom: str, trigger: str, client: str | None) -> int:
        # 1. Mail that failed after an earlier release and still waits in
        #    the deferred queue goes back on hold first.
        located = self.locate(dom)
        now = time.time()
        failed = [q for q in located.ids("deferred") if located.mtimes[q] > now]
        self.postfix.hold(failed)
        # 2. Held mail whose lifetime clock is old gets a new one.
        if failed:
            located = self.locate(dom)
        limit = time.time() - self.stale_after()
        stale = [q for q in located.ids("hold") if located.ctimes[q] < limit]
        if stale:
            self.refresh(dom, stale)
            located = self.locate(dom)
        # 3. Release.  A message that failed an attempt once has its retry
        #    time (the file's mtime) in the future, and a deferred-queue scan
        #    would pass it by: it is made due now first, as the flush
        #    service does for `postqueue -i`.
        held = located.ids("hold")
        now = time.time()
        for qid in held:
            if located.mtimes[qid] > now:
                self.layout.make_due(qid, now)
        # Recorded before the mail moves, so nobody sees a delivery without it.
        self.ledger.record_flush(dom, trigger, f"released {len(held)}",
                                 time.time() + RELEASE_WATCH, client=client)
        log.info("event=release domain=%s trigger=%s client=%s messages=%d",
                 dom, trigger, client or "-", len(held))
        self.postfix.release(held)
        self.postfix.scan_deferred()
        return len(held)

    def refresh(self, dom: str, queue_ids: list[str]) -> int:
        """Give held messages a new lifetime clock; the ledger follows their new ids.

        ``postsuper -r`` sends them back through pickup and cleanup; the
        hold header (header_checks) puts them straight back on hold, under
        new queue ids, which ``adopt`` then finds by their tag header.
        """
        # Only mail that carries the current hold header comes back on hold:
        # anything else would leave the hold queue untracked.  Such mail is
        # released as it is (see README: held before the header existed).
        secret = holdsecret.read(self.config.state_directory, hold_table(self.config))
        if not secret:
            return 0
        queue_ids = [m.queue_id for m in parse_postcat(self.postfix.read_messages(queue_ids))
                     if m.queue == "hold" and secret in m.header(HOLD_HEADER)]
        if not queue_ids:
            return 0
        self.postfix.requeue(queue_ids)
        deadline = time.monotonic() + REFRESH_WAIT
        adopted = 0
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if any(os.path.exists(self.layout.path("maildrop", q)) for q in queue_ids):
                continue
            adopted += self.adopt().get(dom, 0)
            if adopted >= len(queue_ids):
                break
        self.locate(dom)  # the old ids are gone now: prune them
        return adopted

    def adopt(self) -> dict[str, int]:
        """Record held messages that carry our tag but are not in the ledger.

        Such messages come from a refresh, or from a ledger that lost rows.
        Cost: one listing of the hold queue, one postcat for the unknown ids.
        """
        hold_dir = os.path.join(self.layout.queue_directory, "hold")
        try:
            present = [n for n in os.listdir(hold_dir) if names.is_queue_id(n)]
        except FileNotFoundError:
            return {}
        unknown = sorted(set(present) - self.ledger.known(present))
        counts: dict[str, int] = {}
        secret = holdsecret.read(self.config.state_directory, hold_table(self.config))
        if not unknown or not secret:
            return counts
        for msg in parse_postcat(self.postfix.read_messages(unknown)):
            tags = msg.header(TAG_HEADER)
            # only what our milter held: the tag and the hold header with our secret
            if len(tags) != 1 or secret not in msg.header(HOLD_HEADER):
                continue
            dom = tags[0].lower()
            if dom not in self.config.domains:
                continue
            if self.ledger.record(msg.queue_id, dom, msg.size, msg.arrival or time.time(),
                                  msg.created or time.time()):
                counts[dom] = counts.get(dom, 0) + 1
        return counts

    def in_flight(self, domain: str) -> bool:
        """Is mail of the domain being delivered right now (a release still at work)?

        Released mail that is due in the deferred queue while none of the
        domain's mail is active may be a release cut short: its releaser
        died after ``postsuper -H`` but before asking qmgr to scan, and the
        mail would wait for qmgr's own scan.  qmgr is asked again (harmless
        if the first request was on its way) and the release counts as
        still at work.
        """
        located = self.locate(domain)
        if located.ids("active", "incoming"):
            return True
        now = time.time()
        if any(located.mtimes[q] <= now for q in located.ids("deferred")):
            self.postfix.scan_deferred()
            return True
        return False

    def holding(self) -> list[str]:
        """Configured, unpaused domains the ledger says hold mail (no queue scan)."""
        self.rebuild_if_needed()
        return [d for d in self.ledger.domains_with_mail() if d in self.config.domains]

    def sweep(self, domain: str) -> dict[str, int]:
        """Put mail that failed after a release back on hold; end the watch when done.

        A message in the deferred queue with its retry time in the future
        has had a failed attempt; one with a past retry time is waiting to
        be delivered and is left alone.
        """
        dom = names.domain(domain)
        located = self.locate(dom)
        now = time.time()
        failed = [q for q in located.ids("deferred") if located.mtimes[q] > now]
        in_flight = len(located.ids("active", "incoming")) + \
            len(located.ids("deferred")) - len(failed)
        if failed:
            self.postfix.hold(failed)
        state = self.ledger.state(dom)
        if in_flight == 0 and state.releasing_until and state.releasing_until < now:
            self.ledger.set_releasing_until(dom, None)
        elif in_flight and (state.releasing_until or 0) < now + 60:
            self.ledger.set_releasing_until(dom, now + 60)
        return {"reheld": len(failed), "in_flight": in_flight}

    def sweep_all(self) -> dict[str, dict[str, int]]:
        return {dom: self.sweep(dom) for dom in self.ledger.releasing_domains()}

    def wait(self, domain: str, timeout: float, progress=None, interval: float = 0.5) -> bool:
        """Wait until nothing of the domain is queued; True if it got there.

        Gives up early when everything left is back on hold (its delivery
        failed and the sweep put it back): nothing more will go out.
        """
        dom = self.domain(domain).name
        deadline = time.monotonic() + timeout
        while True:
            located = self.locate(dom)
            if progress:
                progress(len(located.present))
            if not located.present:
                return True
            now = time.time()
            if any(located.mtimes[q] > now for q in located.ids("deferred")):
                self.sweep(dom)
            elif not located.ids("deferred", "active", "incoming"):
                return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)

    # -- admin -------------------------------------------------------------
    def pause(self, domain: str) -> int:
        """Stop releases; mail waiting in the deferred queue goes back on hold."""
        dom = self.domain(domain).name
        self.ledger.set_paused(dom, True)
        located = self.locate(dom)
        waiting = located.ids("deferred")
        self.postfix.hold(waiting)
        return len(waiting)

    def resume(self, domain: str) -> None:
        self.ledger.set_paused(self.domain(domain).name, False)

    def purge(self, domain: str) -> int:
        dom = self.domain(domain).name
        located = self.locate(dom)
        ids = located.ids("hold", "deferred", "incoming", "active")
        self.postfix.delete(ids)
        self.locate(dom)  # prune what went
        return len(ids)
