"""The library of held mail: status, release, return, pause, purge.

Held mail lives in Postfix's hold queue, where it is never tried and never
expires.  Mail gets there two ways: the milter holds what arrives over
SMTP, and ``take_in`` holds every other message bound for a customer that
lands in the deferred queue (a local ``sendmail``, an alias or bcc
expansion, Postfix's own bounces and delay notices): the on-demand
transport is in ``defer_transports``, so such mail waits there, untried,
until it is taken in.

A release probes the customer's server first: a message released with
``postsuper -H`` keeps its creation time, and Postfix returns a message to
its sender as soon as an attempt fails after ``maximal_queue_lifetime``;
so nothing is released toward a server that does not answer, mail with an
old clock gets a new one first (``refresh``), and whatever fails after a
release is put back on hold (``sweep``) before Postfix tries it again.
The on-demand transport turns 5xx replies into deferrals (soft_bounce):
such mail comes back on hold marked *refused* with the server's reply.

Decisions are made by ``release_rules`` over one snapshot of a domain's
queue entries; this module carries them out.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field

from flushctl import names
from flushctl.heldmail import rules as rules
from flushctl.config import Config, Domain, UnknownDomain
from flushctl.heldmail.ledger import DomainState, Entry, Ledger
from flushctl.mta.commands import Postfix, PostfixError
from flushctl.poller.prober import NOT_PROBED, NOWHERE, UNROUTABLE, Prober, ProbeResult, is_ip, probe, routable
from flushctl.mta.queuefiles import (FORCED_EXPIRE_BIT, SET_ASIDE_AFTER, QueueLayout, QueueWatch,
                         QueuedMessage, parse_duration, parse_postcat, read_defer_log)
from flushctl.heldmail.rules import Item, Snapshot
from flushctl.mta.routing import route_of
from flushctl.heldmail.holdtag import TAG_HEADER, tag_of

RELEASE_WATCH = rules.RELEASE_WATCH
# How long a refresh waits for pickup and cleanup to bring requeued mail back,
# at most, and after the copies stop coming back.
REFRESH_WAIT = 60.0
REFRESH_QUIET = 5.0

log = logging.getLogger("flushctl.release")


class Refused(Exception):
    """A request that is understood but not carried out (paused, unreachable)."""

    def __init__(self, text: str, code: str):
        super().__init__(text)
        self.code = code


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
    refused: int = 0                      # held after the customer's server refused (5xx)
    refused_reply: str | None = None      # the last such reply
    backoff_until: float | None = None    # the poller waits until then (attempts tempfailed)
    hosts: dict[str, int] = field(default_factory=dict)   # held per destination
    configured: bool = True               # False: held mail of a domain no longer configured

    def as_json(self) -> dict:
        return {
            "domain": self.domain, "messages": self.messages, "bytes": self.bytes,
            "oldest_arrival": self.oldest_arrival, "reachable": self.reachable,
            "last_probe": self.last_probe, "last_error": self.last_error,
            "last_flush": self.last_flush, "last_flush_trigger": self.last_flush_trigger,
            "last_flush_result": self.last_flush_result,
            "last_flush_client": self.last_flush_client, "paused": self.paused,
            "queues": self.queues, "refused": self.refused,
            "refused_reply": self.refused_reply, "backoff_until": self.backoff_until,
            "hosts": self.hosts, "configured": self.configured,
        }


@dataclass(frozen=True)
class FlushResult:
    domain: str
    released: int
    probe: ProbeResult | None
    forwarded: int = 0   # peers of the cluster this release is sent on to
    shared: bool = False           # a release that started moments ago answers for it
    on_the_way: int = 0            # nothing to release, but so many an earlier one sends
    unreachable: tuple = ()        # (route, ProbeResult) of destinations that did not answer


def _item(entry: Entry, found) -> Item:
    if found is None:
        return Item(entry.queue_id, entry.domain, entry.route, entry.size, entry.arrival,
                    entry.ctime, None, released=entry.released, refused=entry.refused,
                    refused_since=entry.refused_since)
    queue, st = found
    return Item(entry.queue_id, entry.domain, entry.route, entry.size, entry.arrival,
                entry.ctime, queue, st.st_mtime, bool(st.st_mode & FORCED_EXPIRE_BIT),
                entry.released, entry.refused, entry.refused_since)


def wait_for(step, timeout: float, progress=None, interval: float = 0.5
             ) -> tuple[bool, int]:
    """Call ``step()`` (``HeldMail.wait_step``, here or through the release
    helper) until it says done or stuck, or ``timeout`` seconds pass:
    (True if nothing is left queued, messages left)."""
    deadline = time.monotonic() + timeout
    while True:
        present, verdict = step()
        if progress:
            progress(present)
        if verdict is not None:
            return verdict, present
        if time.monotonic() >= deadline:
            return False, present
        time.sleep(interval)


class HeldMail:
    def __init__(self, config: Config, postfix: Postfix | None = None,
                 layout: QueueLayout | None = None, ledger: Ledger | None = None):
        self.config = config
        self.postfix = postfix or Postfix(config.config_directory)
        self._layout = layout
        self._params: dict[str, str] | None = None
        self._prober: Prober | None = None
        self._postfix_prober: Prober | None = None
        self._watches: dict[str, QueueWatch] = {}
        self._seen: dict[str, set[str]] = {}      # ids take_in has looked up, per queue
        self._ours_deferred: set[str] = set()     # ours, in the deferred queue at last look
        self._fingerprint: tuple | None = None
        self._nudged_at = float("-inf")
        self._domains_text: str | None = None
        self._ledger: Ledger | None = None
        self._rebuilt = 0
        if ledger is not None:
            self._take(ledger)

    @property
    def ledger(self) -> Ledger:
        """The ledger, opened on first use: a process that only probes (the
        unprivileged poller) never opens it."""
        if self._ledger is None:
            self._take(Ledger(self.config.state_directory, as_uid=self._milter_uid()))
        return self._ledger

    def _milter_uid(self) -> int | None:
        """The milter's uid: a root process acts as it in the state directory
        the milter shares (see ``ledger._Guard``)."""
        if not self.config.milter_user or os.geteuid() != 0:
            return None
        import pwd
        try:
            return pwd.getpwnam(self.config.milter_user).pw_uid
        except KeyError:
            return None

    def _take(self, ledger: Ledger) -> None:
        self._ledger = ledger
        # a ledger file new to us (first run, removed, corrupt) is rebuilt
        # from the queue's tag headers before it is trusted
        self._rebuilt = 0 if ledger.fresh else ledger.generation

    def needs_rebuild(self) -> bool:
        """Is the ledger file new to us (removed, replaced, corrupt)? One stat."""
        self.ledger.check_file()
        return self._rebuilt != self.ledger.generation

    def rebuild_if_needed(self) -> dict[str, int]:
        """Rebuild the ledger from the hold queue if its file is new to us."""
        if not self.needs_rebuild():
            return {}
        self._rebuilt = self.ledger.generation
        return self.take_in(queues=("hold",))

    # -- Postfix's settings, read once per process --------------------------
    def params(self) -> dict[str, str]:
        if self._params is None:
            self._params = self.postfix.get(
                "queue_directory", "hash_queue_names", "hash_queue_depth",
                "maximal_queue_lifetime", "bounce_queue_lifetime",
                "minimal_backoff_time", "maximal_backoff_time",
                "disable_dns_lookups", "smtp_dns_support_level")
        return self._params

    @property
    def layout(self) -> QueueLayout:
        if self._layout is None:
            self._layout = QueueLayout.from_params(self.params())
        return self._layout

    def seconds(self, name: str) -> float:
        return parse_duration(self.params()[name])

    def stale_after(self) -> float:
        """Seconds after which held mail gets a new clock before a release."""
        return rules.stale_after([self.seconds("maximal_queue_lifetime"),
                                  self.seconds("bounce_queue_lifetime")])

    def domain(self, name: str) -> Domain:
        """The configured domain, or ``UnknownDomain``."""
        return self.config.domain(name)

    # -- reading ------------------------------------------------------------
    def snapshot(self, domain: str) -> Snapshot:
        """Where each of the domain's ledger entries is now: one ``stat``
        pass; rows whose message is gone are pruned."""
        self.rebuild_if_needed()
        return self._snapshot(self.ledger.entries(domain),
                              self.ledger.state(domain).releasing_until)

    def _snapshot(self, entries: list[Entry], releasing_until: float | None = None
                  ) -> Snapshot:
        items = tuple(_item(e, self.layout.locate(e.queue_id)) for e in entries)
        snap = Snapshot(items, time.time(), releasing_until)
        if snap.gone:
            self.ledger.forget(snap.gone)
        return snap

    locate = snapshot   # the name the milter's quota recount uses

    def status(self, domain: str) -> Status:
        dom = self._known_domain(domain)
        return self._status(dom, self.snapshot(dom), self.ledger.state(dom))

    def _known_domain(self, domain: str) -> str:
        """A configured domain, or one the ledger still holds mail for."""
        try:
            return self.domain(domain).name
        except UnknownDomain:
            name = names.domain(domain) if isinstance(domain, str) else domain
            if name in self.removed_domains():
                return name
            raise

    def status_if_empty(self, domain: str) -> Status | None:
        """The status of a domain the ledger records nothing for, from one row
        read (no queue access); None when it may hold mail or is paused."""
        dom = self.domain(domain).name
        self.rebuild_if_needed()
        state = self.ledger.state(dom)
        if state.messages > 0 or state.paused:
            return None
        return self._status(dom, Snapshot((), time.time()), state)

    def _status(self, dom: str, snap: Snapshot, state: DomainState) -> Status:
        messages, size, oldest = snap.figures()
        refused = snap.refused()
        last_refusal = max(refused, key=lambda i: i.refused_since or 0, default=None)
        return Status(
            domain=dom,
            messages=messages,
            bytes=size,
            oldest_arrival=oldest,
            reachable=state.reachable, last_probe=state.last_probe, last_error=state.last_error,
            last_flush=state.last_flush, last_flush_trigger=state.last_flush_trigger,
            last_flush_result=state.last_flush_result,
            last_flush_client=state.last_flush_client, paused=state.paused,
            queues=snap.per_queue(),
            refused=len(refused),
            refused_reply=last_refusal.refused if last_refusal else None,
            backoff_until=(state.backoff_until if state.backoff_until
                           and state.backoff_until > snap.now else None),
            hosts=snap.routes(),
            configured=dom in self.config.domains,
        )

    def status_all(self) -> list[Status]:
        """Every configured domain's status, then held mail of removed ones."""
        return [self._status(name, snap or Snapshot((), time.time()), state)
                for name, snap, state in self.located_all()]

    def located_all(self):
        """(domain, Snapshot or None, DomainState) for every configured
        domain and every removed one that still holds mail: one read of all
        the domains' rows, and the queue looked at only for those whose
        totals show mail (None: nothing held)."""
        self.rebuild_if_needed()
        states = self.ledger.states()
        removed = sorted(d for d, s in states.items()
                         if d not in self.config.domains and s.messages > 0)
        for name in [*sorted(self.config.domains), *removed]:
            state = states.get(name)
            if state is None or state.messages <= 0:
                yield name, None, state or DomainState(name)
            else:   # the row's other fields stand; the counts come from the queue
                yield name, self.snapshot(name), state

    def removed_domains(self) -> list[str]:
        """Domains the ledger holds mail for that the config does not name."""
        return sorted(d for d, s in self.ledger.states().items()
                      if d not in self.config.domains and s.messages > 0)

    # -- probing ------------------------------------------------------------
    @property
    def prober(self) -> Prober:
        """One prober (and DNS cache) for this process; our own hosts left out."""
        if self._prober is None:
            from flushctl.poller.prober import record_types
            try:
                protocols = self.postfix.get("inet_protocols")["inet_protocols"]
            except (PostfixError, KeyError):
                protocols = "all"
            self._prober = Prober(self.config.probe_timeout, self.own_hosts(),
                                  self.config.nameservers, self.own_addresses(),
                                  record_types(protocols))
        return self._prober

    def own_hosts(self) -> set[str]:
        """Names of our own MX hosts: [poller] own_hosts, Postfix's
        myhostname and the cluster's peers."""
        own = set(self.config.own_hosts)
        try:
            own.add(self.postfix.get("myhostname")["myhostname"].lower())
        except (PostfixError, KeyError):
            pass
        if self.config.cluster is not None:
            own.update(p.host for p in self.config.cluster.peers if not is_ip(p.host))
        return own

    def own_addresses(self) -> frozenset[str]:
        """Addresses Postfix takes for itself (inet_interfaces, proxy_interfaces)
        and the peers written as addresses."""
        from flushctl.mta.routing import own_addresses
        import psutil
        import socket
        try:
            values = self.postfix.get("inet_interfaces", "proxy_interfaces")
        except PostfixError:
            values = {"inet_interfaces": "all", "proxy_interfaces": ""}
        local = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                 if a.family in (socket.AF_INET, socket.AF_INET6)]

        def resolve(name):
            try:
                return [i[4][0] for i in socket.getaddrinfo(name, None)]
            except OSError:
                return []
        own = set(own_addresses(values.get("inet_interfaces", "all"),
                                values.get("proxy_interfaces", ""), local, resolve))
        if self.config.cluster is not None:
            own.update(p.host for p in self.config.cluster.peers if is_ip(p.host))
        return frozenset(own)

    def postfix_prober(self) -> Prober | None:
        """A prober that resolves as Postfix's smtp client does (the system's
        resolv.conf: the on-demand transport is not chrooted), when that can
        differ from ours: only with [poller] nameservers, and only when
        Postfix looks up MX records at all.  None otherwise."""
        if not self.config.nameservers:
            return None
        params = self.params()
        if params.get("disable_dns_lookups", "no") == "yes" or \
                params.get("smtp_dns_support_level", "") == "disabled":
            return None
        if self._postfix_prober is None:
            self._postfix_prober = self.prober.same_view()
        return self._postfix_prober

    def record_probe(self, domain: str, result: ProbeResult) -> None:
        self.ledger.record_probe(domain, result.reachable,
                                 None if result.reachable else result.text(), result.when,
                                 result.outcome.replace(" ", "_"))

    def probe(self, domain: str, route: str | None = None) -> ProbeResult:
        dom = self.domain(domain)
        result = probe(dom, self.prober, route)
        self.record_probe(dom.name, result)
        return result

    # -- releasing ----------------------------------------------------------
    def flush(self, domain: str, trigger: str = "admin", client: str | None = None,
              probed: dict[str, ProbeResult] | None = None,
              probed_only: bool = False) -> FlushResult:
        """Release the domain's held mail toward its servers, if they answer.

        ``probed``: probes of routes the caller has just made (the poller),
        instead of probing them again; with ``probed_only`` a route it did
        not probe is taken as not answering (the release helper talks
        to no customer's server itself).
        """
        dom = self.domain(domain)
        name = dom.name
        # the other backup MX hosts release too, whatever happens here
        forwarded = self.send_on(name, trigger)
        state = self.ledger.state(name)
        if state.paused:
            raise Refused(f"{name}: paused; `flushctl resume {name}` first", "paused")
        snap = self.hold_back(name, self.snapshot(name))
        state = self.ledger.state(name)   # as the re-hold left it (backoff, interrupted)
        candidates = rules.releasable(snap, trigger)
        if not candidates:
            return FlushResult(name, 0, None, forwarded,
                               on_the_way=len(snap.of_kind(rules.IN_FLIGHT, rules.WAITING)))
        if self._window(name, snap, trigger, snap.now)(state):
            return FlushResult(name, 0, None, forwarded, shared=True)
        if trigger == "poller" and not rules.poller_may_release(state.backoff_until, snap.now):
            raise Refused(f"{name}: backing off until "
                          f"{time.strftime('%H:%M:%S', time.localtime(state.backoff_until))} "
                          "after failed attempts", "backoff")
        results, fresh = {}, {}
        for route in sorted({i.route for i in candidates}):
            if probed and route in probed:
                results[route] = probed[route]   # the poller checked them as below
            elif probed_only:
                results[route] = ProbeResult(NOT_PROBED, "", "not probed by the poller",
                                             time.time())
            else:
                fresh[route] = probe(dom, self.prober, route)
        # Postfix's smtp client must be able to route them too (its resolver
        # may not be the poller's): else the mail stays held, and says why
        if fresh:
            results.update(asyncio.run(routable(self.postfix_prober(), dom, fresh)))
        # the domain's row shows the probe of its own route (or the first)
        shown = results.get(name) or next(iter(results.values()))
        self.record_probe(name, shown)
        reachable = {r for r, res in results.items() if res.reachable}
        unreachable = tuple((r, res) for r, res in results.items() if not res.reachable)
        if not reachable:
            # not a release: the probe result (status: last_error) says why
            texts = "; ".join(res.text() for _, res in unreachable)
            code = "nowhere" if all(res.outcome in (NOWHERE, UNROUTABLE)
                                    for _, res in unreachable) else "unreachable"
            raise Refused(f"{name}: mail server not reachable ({texts}); "
                          "the mail stays held", code)
        released = self._release(name, snap, trigger, client, reachable)
        if released is None:
            return FlushResult(name, 0, results[min(reachable)], forwarded, shared=True,
                               unreachable=unreachable)
        return FlushResult(name, released, results[min(reachable)], forwarded,
                           unreachable=unreachable)

    def _window(self, dom: str, snap: Snapshot, trigger: str, now: float):
        """``shares(state)``: does a release that started moments ago (any
        trigger's, in any process: the ledger's row) answer for this one?"""
        window = self.config.gateway.release_window
        refused_held = bool(snap.refused())

        def shares(state: DomainState) -> bool:
            result = state.last_flush_result or ""
            last = state.last_flush if result.startswith("released") or (
                result.startswith("releasing") and _claimant_alive(result)) else None
            return rules.shares_window(
                last, now, window,
                last is not None and self.ledger.arrived_since(dom, last),
                trigger, state.release_refused, refused_held)
        return shares

    def send_on(self, dom: str, trigger: str) -> int:
        """Queue the release of ``dom`` for every peer of the cluster (the
        gateway sends it as ETRN): a customer's or an admin's trigger, not
        one that came from a peer, and not the poller's (every host runs
        its own poller, with its own backoff; a peer's ETRN, like a
        customer's, would also retry refused mail)."""
        cluster = self.config.cluster
        if cluster is None or trigger not in ("admin", "finger", "etrn"):
            return 0
        self.ledger.queue_forwards(dom, cluster.peers)
        return len(cluster.peers)

    def _release(self, dom: str, snap: Snapshot, trigger: str, client: str | None,
                 routes: set[str]) -> int | None:
        """Send the held mail of ``routes``; None when a release that started
        moments ago (any trigger's, in any process) answers for this one."""
        candidates = rules.releasable(snap, trigger, routes)
        includes_refused = any(i.refused for i in candidates)
        now = time.time()
        shares = self._window(dom, snap, trigger, now)
        if not self.ledger.claim_release(dom, now, trigger, client, includes_refused,
                                         now + RELEASE_WATCH, shares):
            log.info("event=release_shared domain=%s trigger=%s client=%s", dom, trigger,
                     client or "-")
            return None
        # Held mail whose lifetime clock is old gets a new one first.  A
        # copy may go out on its own meanwhile: right after an earlier
        # release, qmgr's next scan of new mail ignores defer_transports
        # (Postfix's flush does that), and the copies pass through it.
        # Those are part of this release too.
        old = rules.stale(candidates, now, self.stale_after())
        sent_early = 0
        if old:
            back = self.refresh(dom, [i.queue_id for i in old])
            sent_early = max(0, len(old) - back)
            snap = self.snapshot(dom)
            candidates = rules.releasable(snap, trigger, routes)
        # A message that failed an attempt once has its retry time (the
        # file's mtime) in the future, and a deferred-queue scan would pass
        # it by: it is made due now first, as the flush service does for
        # `postqueue -i`.
        now = time.time()
        for item in rules.not_due(candidates, now):
            self.layout.make_due(item.queue_id, now)
        ids = [i.queue_id for i in candidates]
        # Recorded before the mail moves, so nobody sees a delivery without it.
        self.ledger.mark_released(ids, now)
        log.info("event=release domain=%s trigger=%s client=%s messages=%d%s",
                 dom, trigger, client or "-", len(ids),
                 f" renewed_sent_early={sent_early}" if sent_early else "")
        self.postfix.release(ids)
        self.postfix.scan_deferred()
        self.ledger.set_flush_result(dom, f"released {len(ids) + sent_early}")
        return len(ids) + sent_early

    def refresh(self, dom: str, queue_ids: list[str]) -> int:
        """Give held messages a new lifetime clock.

        ``postsuper -r`` sends them back through pickup and cleanup, under
        new queue ids, to the deferred queue (the on-demand transport is a
        deferred one), where ``take_in`` holds them again by their
        recipients: no header of theirs decides it.  Whoever records the
        copies (this process or the keeper), the ledger counts them: rows
        recorded since the start for mail that arrived before it.  Returns
        that count.
        """
        started = time.time()
        self.postfix.requeue(queue_ids)
        deadline = time.monotonic() + REFRESH_WAIT
        back, last_change = 0, time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if any(os.path.exists(self.layout.path("maildrop", q)) for q in queue_ids) \
                    or self.layout.ids("incoming"):
                last_change = time.monotonic()
                self.nudge_incoming()
                continue   # pickup has not taken them all yet, or qmgr not seen them
            self.take_in()
            now_back = self.ledger.recorded_since(dom, started, started)
            if now_back >= len(queue_ids):
                back = now_back
                break
            if now_back != back:
                back, last_change = now_back, time.monotonic()
            elif time.monotonic() - last_change > REFRESH_QUIET:
                break   # the rest went elsewhere (delivered, say): nothing to wait for
        self.snapshot(dom)  # the old ids are gone now: prune them
        return back

    def nudge_incoming(self) -> int:
        """Wake qmgr for mail it set aside in the incoming queue (a flush
        that raced a delivery agent's lock): else it waits there for
        qmgr's next wakeup, up to five minutes, neither held nor sent.
        Returns how many were waiting."""
        if time.monotonic() - self._nudged_at < SET_ASIDE_AFTER:
            return 0   # qmgr was just woken: give it the time it is given
        now = time.time()
        waiting = self.layout.set_aside(now)
        if waiting:
            self._nudged_at = time.monotonic()
            # due now: qmgr had taken it to deliver it now (a flush may have
            # taken it before its retry time, and qmgr's incoming scan
            # passes over files whose time is still to come)
            for queue_id in waiting:
                try:
                    os.utime(self.layout.path("incoming", queue_id), (now, now))
                except FileNotFoundError:
                    pass
            log.info("event=nudge queue=incoming messages=%d", len(waiting))
            self.postfix.scan_incoming()
        return len(waiting)

    # -- taking in what the milter did not see ------------------------------
    def take_in(self, queues=("deferred", "hold")) -> dict[str, int]:
        """Record, and hold, every message bound for a customer that the
        ledger lacks.

        - deferred: mail that never passed the milter (local submission,
          alias or bcc expansion, Postfix's own notices) and mail of ours
          the ledger lost; recorded first, then put on hold.
        - hold: mail of ours the ledger lacks (a lost ledger): what the
          milter held (its tag names the domain of one of the message's
          own recipients: a tag proves nothing by itself, though intake
          removes any a sender wrote) and what the keeper held (for a
          customer, with the defer log of its wait in the deferred
          queue).  Anything else held (an admin's, a filter's quarantine)
          is remembered as not ours and never read again.
        Only ids new since the last pass are looked up; each message is
        read once (postcat); listings are redone only for directories that
        changed.  Returns the messages taken in per domain.
        """
        counts: dict[str, int] = {}
        now = time.time()
        self._check_fingerprint()
        for queue in queues:
            watch = self._watches.get(queue)
            if watch is None:
                watch = self._watches[queue] = QueueWatch(self.layout, queue)
            present = watch.ids(now)
            seen = self._seen.setdefault(queue, set())
            if watch.last_full == now:
                seen.clear()   # look everything up again now and then: rows can be lost
            seen.intersection_update(present)
            if queue == "deferred":
                self._ours_deferred.intersection_update(present)
            new = present - seen
            if watch.last_full == now:
                self.ledger.prune_foreign(queue, present)
            if not new:
                continue
            ours = self.ledger.known(new)
            if queue == "deferred":
                self._ours_deferred.update(ours)
            unknown = new - ours - self.ledger.foreign_among(queue, new - ours)
            seen.update(new - unknown)
            if unknown:
                taken, classified = self._read_unknown(queue, sorted(unknown), now)
                seen.update(classified)
                for dom, n in taken.items():
                    counts[dom] = counts.get(dom, 0) + n
        return counts

    def _read_unknown(self, queue: str, unknown: list[str], now: float):
        """Read messages the ledger does not know; record ours, remember the
        rest.  Returns (taken in per domain, the ids classified)."""
        counts: dict[str, int] = {}
        mine, other, to_hold, classified = [], [], [], []
        for msg in parse_postcat(self.postfix.read_messages(unknown)):
            if msg.queue != queue:
                continue   # it moved meanwhile: the next pass sees it where it is
            dom, route = self._customer_of(msg)
            if queue == "hold":
                tagged = self._tagged(msg)
                if tagged is not None:
                    # held by the milter (for a domain no longer configured:
                    # ours, shown as removed)
                    mine.append((msg, *tagged, "adopted"))
                elif dom is not None and read_defer_log(self.layout, msg.queue_id):
                    # untagged, for a customer, and it waited in the deferred queue
                    # first (its defer log): the keeper took it in (a local
                    # submission, an alias, a DSN) and the ledger lost its row
                    mine.append((msg, dom, route, "adopted"))
                else:
                    other.append((msg.queue_id, dom))
            elif dom is not None and not self._forced(queue, msg.queue_id):
                mine.append((msg, dom, route, "queue"))
                to_hold.append(msg.queue_id)
            else:
                other.append((msg.queue_id, dom))
            classified.append(msg.queue_id)
        for msg, dom, route, origin in mine:
            if self.ledger.record(msg.queue_id, dom, msg.size, msg.arrival or now,
                                  msg.created or now, route=route, origin=origin):
                counts[dom] = counts.get(dom, 0) + 1
                log.info("event=taken_in queue_id=%s domain=%s from=%s origin=%s",
                         msg.queue_id, dom, queue, origin)
        if queue == "deferred":
            self._ours_deferred.update(m.queue_id for m, *_ in mine)
        if to_hold:
            self._hold(to_hold)
        if other:
            self.ledger.add_foreign(queue, other)
        return counts, classified

    def recheck_owners(self) -> int:
        """Forget every ledger row whose message has no pending recipient in
        the row's domain (or below it), and remember such held mail as not
        ours.  For the first apply after versions that adopted mail by a
        header a bounce could leak: mail planted with it was charged to a
        customer and would have gone out with the customer's next release.
        Returns the rows forgotten."""
        ids = sorted(self.ledger.all_ids())
        if not ids:
            return 0
        self._check_fingerprint()
        entries = self.ledger.entries_by_id(ids)
        stray, foreign = [], []
        for msg in parse_postcat(self.postfix.read_messages(ids)):
            entry = entries.get(msg.queue_id)
            if entry is None or any(_within(rcpt, entry.domain) for rcpt in msg.recipients):
                continue
            stray.append(msg.queue_id)
            foreign.append((msg.queue, msg.queue_id, self._customer_of(msg)[0]))
            log.warning("event=not_ours queue_id=%s domain=%s", msg.queue_id, entry.domain)
        if stray:
            self.ledger.forget(stray)
            for queue in {q for q, _, _ in foreign}:
                self.ledger.add_foreign(queue, [(i, d) for q, i, d in foreign if q == queue])
        return len(stray)

    def _tagged(self, msg: QueuedMessage) -> tuple[str, str] | None:
        """(domain, route) of held mail the milter tagged: one tag, naming
        the domain (or a parent domain) of one of its pending recipients."""
        tag = tag_of(msg.header(TAG_HEADER))
        if tag is None:
            return None
        dom = self.config.domains.get(tag)
        if dom is None and not self.ledger.has_domain(tag):
            return None   # neither configured nor a domain this host held mail for
        for rcpt in msg.recipients:
            if _within(rcpt, tag):
                domain = names.split_recipient(rcpt)[1].lower().rstrip(".")
                return tag, (route_of(dom, domain) if dom is not None else tag)
        return None

    def _check_fingerprint(self) -> None:
        """What was found not ours holds for this config only: a
        domain added later makes mail for it ours.  Also forget what this
        process saw when the ledger file is new."""
        import hashlib
        if self._domains_text is None:
            self._domains_text = repr(sorted((d.name, sorted(d.hosts))
                                             for d in self.config.domains.values()))
        text = self._domains_text
        fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
        if self._fingerprint != (fingerprint, self.ledger.generation):
            self.ledger.set_foreign_scope(fingerprint)
            self._fingerprint = (fingerprint, self.ledger.generation)
            self._seen.clear()
            self._ours_deferred.clear()

    def _customer_of(self, msg: QueuedMessage) -> tuple[str | None, str | None]:
        """The customer domain and route of a message's first pending
        recipient that is a customer's (None, None: no such recipient)."""
        for rcpt in msg.recipients:
            owner = self._customer_route(rcpt)
            if owner is not None:
                return owner
        return None, None

    def _forced(self, queue: str, queue_id: str) -> bool:
        try:
            return bool(os.stat(self.layout.path(queue, queue_id)).st_mode & FORCED_EXPIRE_BIT)
        except OSError:
            return False

    def _hold(self, queue_ids: list[str]) -> None:
        """postsuper -h; a message that moved on meanwhile is not an error."""
        try:
            self.postfix.hold(queue_ids)
        except PostfixError as exc:
            log.warning("event=hold_failed messages=%d error=%r", len(queue_ids), str(exc))

    # -- putting failed mail back on hold -----------------------------------
    def hold_back(self, dom: str, snap: Snapshot) -> Snapshot:
        """Put back on hold what failed after a release or lies in the
        deferred queue unreleased; mark it refused (5xx) or not; back the
        domain off after tempfails.  What the defer log shows waiting only
        for recipients that are no customer's is not ours any more: Postfix
        keeps trying it as ordinary mail.  Returns the snapshot afterwards."""
        items = snap.to_rehold()
        if not items:
            return snap
        # a release may have sent them since the snapshot read their rows:
        # rows are marked before the mail moves, so they tell
        strays = [i.queue_id for i in items if snap.kind(i) == rules.STRAY]
        if strays:
            fresh = self.ledger.entries_by_id(strays)
            items = [i for i in items if i.queue_id not in fresh
                     or not (fresh[i.queue_id].released
                             and snap.now - fresh[i.queue_id].released < rules.RELEASE_WATCH)]
        outcomes, tempfailed, refused, interrupted, moved = [], 0, 0, 0, []
        to_hold, let_go = [], []
        for item in items:
            records = read_defer_log(self.layout, item.queue_id)
            mine = [r for r in records if self._customer_route(r.recipient) is not None]
            if records and not mine:
                let_go.append(item.queue_id)   # only outside recipients left
                continue
            to_hold.append(item.queue_id)
            reasons = [r.reason for r in mine]
            if not reasons and snap.kind(item) == rules.STRAY:
                outcome = rules.NOT_ATTEMPTED   # due and never tried since its release
            else:
                outcome = rules.attempt_outcome(reasons)
            if outcome == rules.REFUSED:
                outcomes.append((item.queue_id, rules.refusal_text(reasons)))
                refused += 1
            elif outcome == rules.TEMPFAIL and item.released is not None:
                outcomes.append((item.queue_id, None))
                tempfailed += 1
            elif item.released is not None:
                outcomes.append((item.queue_id, item.refused))   # not tried: unchanged
                interrupted += 1
            # recipients left for another customer domain: the message is theirs now
            other = self._remaining_owner(mine, item)
            if other is not None:
                moved.append((item.queue_id, *other))
        self._hold(to_hold)
        now = time.time()
        if let_go:
            self.ledger.forget(let_go)
            log.info("event=let_go domain=%s messages=%d reason=only_outside_recipients_left",
                     dom, len(let_go))
        if outcomes:
            self.ledger.set_outcomes(outcomes, now)
        for qid, domain, route in moved:
            self.ledger.reassign(qid, domain, route)
        if tempfailed:
            self._back_off(dom, now)
        if interrupted:
            # the release never reached Postfix's delivery (a restart took its
            # scan request): it shares nothing with the next trigger
            self.ledger.set_flush_result(dom, f"interrupted: {interrupted} not attempted")
        if to_hold:
            log.info("event=reheld domain=%s messages=%d tempfailed=%d refused=%d",
                     dom, len(to_hold), tempfailed, refused)
        return self.snapshot(dom)

    def _customer_route(self, rcpt: str) -> tuple[str, str] | None:
        """(customer domain, route) of a recipient, or None: not a customer's."""
        parts = names.split_recipient(rcpt)
        if parts is None:
            return None
        customer = names.customer_of(parts[1], self.config.domains)
        if customer is None:
            return None
        return customer, route_of(self.config.domains[customer], parts[1])

    def _remaining_owner(self, records, item: Item):
        """Another customer domain (and route) whose recipients are the
        first left, or None."""
        for record in records:
            owner = self._customer_route(record.recipient)
            if owner is not None:
                return owner if owner != (item.domain, item.route) else None
        return None

    def _back_off(self, dom: str, now: float) -> None:
        """Attempts of a release tempfailed: the poller waits, doubling."""
        state = self.ledger.state(dom)
        started = state.last_flush or 0.0
        if state.backoff_until and state.backoff and state.backoff_until - state.backoff >= started:
            return   # already backed off for this release
        step = rules.next_backoff(state.backoff, self.seconds("minimal_backoff_time"),
                                  self.seconds("maximal_backoff_time"))
        self.ledger.set_backoff(dom, now + step, step)
        log.info("event=backoff domain=%s seconds=%d", dom, step)

    def in_flight(self, domain: str) -> bool:
        """Is mail of the domain being delivered right now (a release still at work)?

        Released mail that is due in the deferred queue while none of the
        domain's mail is active may be a release cut short: its releaser
        died after ``postsuper -H`` but before asking qmgr to scan, and the
        mail would wait for qmgr's own scan.  qmgr is asked again (harmless
        if the first request was on its way) and the release counts as
        still at work.
        """
        snap = self.snapshot(domain)
        if snap.of_kind(rules.IN_FLIGHT):
            return True
        if snap.of_kind(rules.WAITING):
            self.postfix.scan_deferred()
            return True
        return False

    def holding(self) -> list[str]:
        """Configured, unpaused domains the ledger says hold mail (no queue scan)."""
        self.rebuild_if_needed()
        return [d for d in self.ledger.domains_with_mail() if d in self.config.domains]

    def poller_candidates(self) -> tuple[dict[str, list[str]], dict[str, float]]:
        """What the poller looks at: {domain: routes} of configured, unpaused
        domains holding mail it may send (not refused), and {domain: until}
        of those it must leave alone while they back off.  Ledger reads only."""
        self.rebuild_if_needed()
        now = time.time()
        states = self.ledger.states()
        candidates, waiting = {}, {}
        for dom, routes in self.ledger.unrefused_routes().items():
            state = states.get(dom)
            if dom not in self.config.domains or state is None or state.paused:
                continue
            if not rules.poller_may_release(state.backoff_until, now):
                waiting[dom] = state.backoff_until
                continue
            candidates[dom] = routes
        return candidates, waiting

    def sweep(self, domain: str) -> dict[str, int]:
        """Put mail that failed after a release back on hold; end the watch
        when the release is done (and the backoff, if nothing tempfailed)."""
        dom = names.domain(domain)
        before = self.snapshot(dom)
        reheld = len(before.to_rehold())
        snap = self.hold_back(dom, before)
        busy = len(snap.of_kind(rules.IN_FLIGHT, rules.WAITING))
        state = self.ledger.state(dom)
        now = time.time()
        releasing = (state.last_flush_result or "").startswith("releasing") \
            and _claimant_alive(state.last_flush_result)
        if busy == 0 and state.releasing_until and not releasing:
            self.ledger.set_releasing_until(dom, None)
            started = state.last_flush or 0.0
            backed_off = state.backoff_until and state.backoff \
                and state.backoff_until - state.backoff >= started
            if state.backoff and not backed_off:
                self.ledger.set_backoff(dom, None, None)   # this release went through
        elif snap.of_kind(rules.IN_FLIGHT) and (state.releasing_until or 0) < now + 60:
            # Postfix is at work on it: mail still due waits its turn (qmgr
            # takes at most qmgr_message_active_limit at once)
            self.ledger.set_releasing_until(dom, now + 60)
        return {"reheld": reheld, "in_flight": busy}

    def recount_asked(self) -> list[str]:
        """Count again from the queue (pruning what is gone) every domain
        the milter asked for: it runs unprivileged, cannot read Postfix's
        queue, and answers 4xx at a quota by the ledger's running totals
        until a pass of this finds the mail an admin deleted or Postfix
        delivered."""
        done = []
        for name in self.ledger.recounts_asked():
            started = time.time()
            if name in self.config.domains:
                self.snapshot(name)
            self.ledger.recounted(name, started)
            done.append(name)
        return done

    def sweep_all(self) -> dict[str, dict[str, int]]:
        """Sweep every domain in a release, and any whose mail lies in the
        deferred queue (known from the last listing)."""
        domains = set(self.ledger.releasing_domains())
        if self._ours_deferred:
            domains.update(e.domain for e in
                           self.ledger.entries_by_id(self._ours_deferred).values())
        return {dom: self.sweep(dom) for dom in sorted(domains)}

    def wait(self, domain: str, timeout: float, progress=None, interval: float = 0.5) -> bool:
        """Wait until nothing of the domain is queued; True if it got there.

        Gives up early when everything left is back on hold (its delivery
        failed and the sweep put it back): nothing more will go out.
        """
        name = self.domain(domain).name
        return wait_for(lambda: self.wait_step(name), timeout, progress, interval)[0]

    def wait_step(self, domain: str) -> tuple[int, bool | None]:
        """One look for ``wait``: (messages still queued, True when none
        is, False when what is left is back on hold, None: still going)."""
        dom = self.domain(domain).name
        snap = self.snapshot(dom)
        if not snap.present:
            return 0, True
        if snap.of_kind(rules.FAILED):
            self.sweep(dom)
        elif not snap.of_kind(rules.IN_FLIGHT, rules.WAITING, rules.STRAY):
            return len(snap.present), False
        return len(snap.present), None

    # -- returning mail to its senders ----------------------------------------
    def return_to_senders(self, domain: str, refused_only: bool = False,
                          older_than: float | None = None) -> int:
        """Return held mail to its senders: Postfix's own DSN, which quotes
        each recipient's last failure (the customer server's reply, for
        refused mail).  ``postsuper -f`` forces expiry and releases it;
        the keeper leaves forced mail alone."""
        dom = self._known_domain(domain)
        snap = self.snapshot(dom)
        items = [i for i in snap.of_kind(rules.HELD)
                 if (not refused_only or i.refused is not None)
                 and (older_than is None or (i.refused_since or 0) < older_than)]
        if not items:
            return 0
        now = time.time()
        ids = [i.queue_id for i in items]
        for item in rules.not_due(items, now):
            self.layout.make_due(item.queue_id, now)
        log.info("event=return domain=%s messages=%d refused_only=%s", dom, len(ids),
                 refused_only)
        self.postfix.expire_release(ids)
        self.postfix.scan_deferred()
        return len(ids)

    def release_removed(self, domain: str) -> int:
        """Let the held mail of a domain no longer configured go as ordinary
        mail (after `apply` took the domain out of the maps): renewed first
        if its clock is old, released, and forgotten by the ledger."""
        dom = self._known_domain(domain)
        snap = self.snapshot(dom)
        old = rules.stale(snap.of_kind(rules.HELD), snap.now, self.stale_after())
        if old:
            self.refresh(dom, [i.queue_id for i in old])
            snap = self.snapshot(dom)
        held = snap.of_kind(rules.HELD)
        now = time.time()
        for item in rules.not_due(held, now):
            self.layout.make_due(item.queue_id, now)
        ids = [i.queue_id for i in held]
        log.info("event=release_removed domain=%s messages=%d", dom, len(ids))
        self.postfix.release(ids)
        self.postfix.scan_deferred()
        self.ledger.forget([i.queue_id for i in snap.present])
        return len(ids)

    # -- admin ----------------------------------------------------------------
    def pause(self, domain: str) -> int:
        """Stop releases; mail waiting in the deferred queue goes back on hold."""
        dom = self.domain(domain).name
        self.ledger.set_paused(dom, True)
        snap = self.snapshot(dom)
        waiting = [i.queue_id for i in snap.present
                   if i.queue == "deferred" and not i.forced]
        self._hold(waiting)
        return len(waiting)

    def resume(self, domain: str) -> None:
        self.ledger.set_paused(self.domain(domain).name, False)

    def purge(self, domain: str) -> int:
        dom = self._known_domain(domain)
        snap = self.snapshot(dom)
        ids = [i.queue_id for i in snap.present]
        self.postfix.delete(ids)
        self.snapshot(dom)  # prune what went
        return len(ids)


def _within(rcpt: str, domain: str) -> bool:
    """Is the recipient's domain ``domain`` or below it?"""
    parts = names.split_recipient(rcpt)
    if parts is None:
        return False
    name = parts[1].lower().rstrip(".")
    return name == domain or name.endswith("." + domain)


def _claimant_alive(result: str) -> bool:
    """A release still marked "releasing (pid N)": is its process alive?
    (One killed midway shares nothing: the next trigger releases again.)"""
    import re
    match = re.search(r"pid (\d+)", result)
    if not match:
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


