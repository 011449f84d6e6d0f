"""Holding back failed mail: back on hold after a failed attempt, refused or backed off.

The on-demand transport turns 5xx replies into deferrals (soft_bounce), so
every failed attempt leaves the message in the deferred queue, where
``hold_back`` finds it (by its defer log) and puts it back on hold before
Postfix tries it again: marked *refused* with the server's reply, or
backing the domain off after tempfails.  ``sweep`` ends a release's watch.
"""

from __future__ import annotations

import logging
import time

from flushctl import names
from flushctl.heldmail import rules as rules
from flushctl.heldmail.release import claimant_alive
from flushctl.heldmail.rules import Item, Snapshot
from flushctl.mta.queuefiles import read_defer_log

log = logging.getLogger("flushctl.release")


class HoldBackPart:
    """``HeldMail``'s part that holds back failed mail (see ``library``)."""

    def hold_back(self, dom: str, snap: Snapshot, releasing: bool = False) -> Snapshot:
        """Put back on hold what failed after a release or lies in the
        deferred queue unreleased; mark it refused (5xx) or not; back the
        domain off after tempfails.  What the defer log shows waiting only
        for recipients that are no customer's is not ours any more: Postfix
        keeps trying it as ordinary mail.  ``releasing``: called by a
        release under way, whose claim the domain's result must keep.
        Returns the snapshot afterwards."""
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
            # tempfailed: a released message, or any whose defer log shows a
            # real attempt (a renewed copy that qmgr sent before the release
            # marked it: the customer's server answered 4xx all the same)
            elif outcome == rules.TEMPFAIL and (item.released is not None or reasons):
                outcomes.append((item.queue_id, None))
                tempfailed += 1
            elif item.released is not None:
                outcomes.append((item.queue_id, item.refused))   # not tried: unchanged
                interrupted += 1
            # recipients left for another customer domain: the message is theirs now
            other = self._remaining_owner(mine, item)
            if other is not None:
                moved.append((item.queue_id, *other))
        # a release that marked one after the snapshot may have released it
        # before this hold landed: it goes out again, and its outcome here
        # (which would clear the new mark) is not written
        holding = set(to_hold)
        again = self._hold_unless_released(
            to_hold, {i.queue_id: i.released for i in items if i.queue_id in holding})
        if again:
            outcomes = [o for o in outcomes if o[0] not in again]
            moved = [m for m in moved if m[0] not in again]
            to_hold = [q for q in to_hold if q not in again]
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
        if interrupted and not releasing:
            # the release never reached Postfix's delivery (a restart took its
            # scan request): it shares nothing with the next trigger
            self.ledger.set_flush_result(dom, f"interrupted: {interrupted} not attempted")
        if to_hold:
            log.info("event=reheld domain=%s messages=%d tempfailed=%d refused=%d",
                     dom, len(to_hold), tempfailed, refused)
        return self.snapshot(dom)

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
            and claimant_alive(state.last_flush_result)
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

    def sweep_all(self) -> dict[str, dict[str, int]]:
        """Sweep every domain in a release, and any whose mail lies in the
        deferred queue (known from the last listing)."""
        domains = set(self.ledger.releasing_domains())
        if self._ours_deferred:
            domains.update(e.domain for e in
                           self.ledger.entries_by_id(self._ours_deferred).values())
        return {dom: self.sweep(dom) for dom in sorted(domains)}
