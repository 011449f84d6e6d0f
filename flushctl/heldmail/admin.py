"""An admin's actions on a domain's held mail: pause, resume, purge, return it to its senders.

Also letting the held mail of a domain no longer configured go as ordinary
mail (``release_removed``, after ``apply`` took it out of the maps).  The
keeper returns refused mail through ``return_to_senders`` as well.
"""

from __future__ import annotations

import logging
import time

from flushctl.config import Domain
from flushctl.heldmail import rules as rules

log = logging.getLogger("flushctl.release")


class AdminPart:
    """``HeldMail``'s admin part (see ``library``)."""

    def pause(self, domain: str | Domain) -> int:
        """Stop releases; mail waiting in the deferred queue goes back on hold."""
        dom = self.domain(domain).name
        self.ledger.set_paused(dom, True)
        snap = self.snapshot(dom)
        waiting = [i.queue_id for i in snap.present
                   if i.queue == "deferred" and not i.forced]
        self._hold(waiting)
        return len(waiting)

    def resume(self, domain: str | Domain) -> None:
        self.ledger.set_paused(self.domain(domain).name, False)

    def route_anew(self, domain: str | Domain) -> int:
        """The domain's relay changed: each held message's route as it is
        now (see ``routing.route_of``), and nothing of the old target kept
        (its probe, its backoff).  Returns the messages whose route changed."""
        from flushctl.mta.queuefiles import parse_postcat
        dom = self.domain(domain)
        self.ledger.forget_target(dom.name)
        items = {i.queue_id: i for i in self.snapshot(dom.name).present}
        moved = []
        if dom.relay is not None:
            # every host not listed in ``hosts`` goes through the relay
            moved = [(qid, dom.name) for qid, i in items.items()
                     if i.route not in dom.hosts and i.route != dom.name]
        elif items:
            # routed by each host's own DNS: the recipients say which host
            for msg in parse_postcat(self.postfix.read_messages(sorted(items))):
                owner = self._customer_of(msg)
                item = items.get(msg.queue_id)
                if item is not None and owner[0] == dom.name and owner[1] != item.route:
                    moved.append((msg.queue_id, owner[1]))
        for qid, route in moved:
            self.ledger.reassign(qid, dom.name, route, from_domain=dom.name)
        return len(moved)

    def purge(self, domain: str) -> int:
        dom = self._known_domain(domain)
        snap = self.snapshot(dom)
        ids = [i.queue_id for i in snap.present]
        self.postfix.delete(ids)
        self.snapshot(dom)  # prune what went
        return len(ids)

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
