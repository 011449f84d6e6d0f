"""Releasing held mail toward a customer's servers: flush, the release window, refresh, wait.

A release probes the customer's server first: a message released with
``postsuper -H`` keeps its creation time, and Postfix returns a message to
its sender as soon as an attempt fails after ``maximal_queue_lifetime``;
so nothing is released toward a server that does not answer, mail with an
old clock gets a new one first (``refresh``), and whatever fails after a
release is put back on hold (``holdback``) before Postfix tries it again.
The on-demand transport turns 5xx replies into deferrals (soft_bounce):
such mail comes back on hold marked *refused* with the server's reply.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time

from flushctl.config import Domain
from flushctl.heldmail import rules as rules
from flushctl.heldmail.ledger.schema import DomainState
from flushctl.heldmail.rules import Snapshot
from flushctl.heldmail.outcome import BACKING_OFF, NOTHING, NOWHERE, PAUSED, RELEASED, \
    UNREACHABLE, Outcome
from flushctl.poller import prober
from flushctl.mta.relays import CHECK_EVERY
from flushctl.mta.routing import relay_of
from flushctl.poller.prober import NOT_PROBED, UNROUTABLE, ProbeResult, probe, routable

RELEASE_WATCH = rules.RELEASE_WATCH
# How long a refresh waits for pickup and cleanup to bring requeued mail back,
# at most, and after the copies stop coming back.
REFRESH_WAIT = 60.0
REFRESH_QUIET = 5.0

log = logging.getLogger("flushctl.release")


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


def knocked_at(result: ProbeResult, relay) -> bool:
    """Did the probe knock where the route's mail goes now?  (A next hop
    without MX lookup names its host and port; through MX records, any.)"""
    if relay is None or relay.mx_lookup or not result.target:
        return True
    host, _, port = result.target.rpartition(":")
    return port == str(relay.port) and host.split("[")[0] == relay.host


class ReleasePart:
    """``HeldMail``'s releasing part (see ``library``)."""

    def flush(self, domain: str | Domain, trigger: str = "admin", client: str | None = None,
              probed: dict[str, ProbeResult] | None = None,
              probed_only: bool = False) -> Outcome:
        """Release the domain's held mail toward its servers, if they answer:
        what happened, as the one ``Outcome`` every front end maps.

        ``probed``: probes of routes the caller has just made (the poller),
        instead of probing them again; with ``probed_only`` a route it did
        not probe is taken as not answering (the release helper talks
        to no customer's server itself).
        """
        dom = self.domain(domain)
        name = dom.name
        if dom.odmr != (trigger == "odmr"):
            # an ODMR domain's mail goes out over its customer's session only
            # (the transport map names the session while it lasts), and a
            # session releases nothing else
            why = (f"{name}: its mail goes out over ODMR only, when its customer's client "
                   "connects (RFC 2645 ATRN); the mail stays held") if dom.odmr else \
                f"{name}: not delivered over ODMR"
            return Outcome(NOWHERE, detail=why)
        # the other backup MX hosts release too, whatever happens here
        forwarded = self.send_on(name, trigger)
        state = self.ledger.state(name)
        if state.paused:
            return Outcome(PAUSED, detail=f"{name}: paused; `flushctl resume {name}` first",
                           forwarded=forwarded)
        snap = self.hold_back(name, self.snapshot(name))
        state = self.ledger.state(name)   # as the re-hold left it (backoff, interrupted)
        candidates = rules.releasable(snap, trigger)
        if not candidates:
            return Outcome(NOTHING, forwarded=forwarded,
                           on_the_way=len(snap.of_kind(rules.IN_FLIGHT, rules.WAITING)))
        if trigger == "odmr":
            # the session is the route: nothing to probe, no window to share
            # (one session per domain at a time; the last one is over)
            released = self._release(name, snap, trigger, client, {i.route for i in candidates})
            return Outcome(RELEASED, released or 0, "odmr session")
        if self._window(name, snap, trigger, snap.now)(state):
            return self._shared(name, forwarded=forwarded)
        if trigger == "poller" and not rules.poller_may_release(state.backoff_until, snap.now):
            until = time.strftime('%H:%M:%S', time.localtime(state.backoff_until))
            return Outcome(BACKING_OFF, detail=f"{name}: backing off until {until} "
                           "after failed attempts", forwarded=forwarded)
        results, fresh = {}, {}
        # a probe made before the relay changed (or by a process that had
        # not looked at the file since: once a second) knocked at the old one
        changed = (self.overrides.entry(name) or {}).get("at", float("-inf")) + CHECK_EVERY
        for route in sorted({i.route for i in candidates}):
            if probed and route in probed and probed[route].when > changed \
                    and (not dom.relay_chosen or knocked_at(probed[route],
                                                             relay_of(dom, route))):
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
        unreachable = tuple((r, res.text()) for r, res in results.items() if not res.reachable)
        if not reachable:
            # not a release: the probe result (status: last_error) says why
            texts = "; ".join(text for _, text in unreachable)
            kind = NOWHERE if all(res.outcome in (prober.NOWHERE, UNROUTABLE)
                                  for res in results.values()) else UNREACHABLE
            return Outcome(kind, detail=f"{name}: mail server not reachable ({texts}); "
                           "the mail stays held", forwarded=forwarded)
        target = results[min(reachable)].target
        released = self._release(name, snap, trigger, client, reachable)
        if released is None:
            return self._shared(name, target, forwarded, unreachable)
        return Outcome(RELEASED, released, target, forwarded=forwarded, unreachable=unreachable)

    def _shared(self, name: str, target: str = "", forwarded: int = 0,
                unreachable: tuple = ()) -> Outcome:
        """A release that started moments ago, by any trigger, answers for this one."""
        state = self.ledger.state(name)
        return Outcome(RELEASED, 0, target, shared=True, forwarded=forwarded,
                       unreachable=unreachable, since=state.last_flush,
                       by=state.last_flush_trigger)

    def _window(self, dom: str, snap: Snapshot, trigger: str, now: float):
        """``shares(state)``: does a release that started moments ago (any
        trigger's, in any process: the ledger's row) answer for this one?"""
        window = self.config.gateway.release_window
        refused_held = bool(snap.refused())

        def shares(state: DomainState) -> bool:
            result = state.last_flush_result or ""
            last = state.last_flush if result.startswith("released") or (
                result.startswith("releasing") and claimant_alive(result)) else None
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
        if cluster is None or trigger not in ("admin", "finger", "etrn", "portal"):
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
        shares = self._window(dom, snap, trigger, now) if trigger != "odmr" \
            else (lambda state: False)
        if not self.ledger.claim_release(dom, now, trigger, client, includes_refused,
                                         now + RELEASE_WATCH, shares):
            log.info("event=release_shared domain=%s trigger=%s client=%s", dom, trigger,
                     client or "-")
            return None
        # Held mail whose lifetime clock is old gets a new one first.  A
        # copy may go out on its own meanwhile: while another release's
        # scan of new mail ignores defer_transports (a release asks for
        # one, scan_deferred), a copy that lands in it passes through.
        # Those are part of this release too.
        old = rules.stale(candidates, now, self.stale_after())
        sent_early = 0
        if old:
            back = self.refresh(dom, [i.queue_id for i in old])
            sent_early = max(0, len(old) - back)
            # a copy another process recorded (the keeper: it records, then
            # holds) may still lie in the deferred queue: held here first
            snap = self.hold_back(dom, self.snapshot(dom), releasing=True)
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

    def wait(self, domain: str, timeout: float, progress=None, interval: float = 0.5) -> bool:
        """Wait until nothing of the domain is queued; True if it got there.

        Gives up early when everything left is back on hold (its delivery
        failed and the sweep put it back): nothing more will go out.
        """
        name = self.domain(domain).name
        return wait_for(lambda: self.wait_step(name), timeout, progress, interval)[0]

    def wait_step(self, domain: str | Domain) -> tuple[int, bool | None]:
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


def claimant_alive(result: str) -> bool:
    """A release still marked "releasing (pid N)": is its process alive?
    (One killed midway shares nothing: the next trigger releases again.)"""
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
