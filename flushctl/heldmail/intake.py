"""Taking in mail the milter did not see: recording and holding all mail bound for a customer.

Held mail lives in Postfix's hold queue, where it is never tried and never
expires.  Mail gets there two ways: the milter holds what arrives over
SMTP, and ``take_in`` holds every other message bound for a customer that
lands in the deferred queue (a local ``sendmail``, an alias or bcc
expansion, Postfix's own bounces and delay notices): the on-demand
transport is in ``defer_transports``, so such mail waits there, untried,
until it is taken in.  Mail set aside in the incoming queue is nudged on
(``nudge_incoming``); ``recheck_owners`` forgets rows whose message has no
recipient in the row's domain.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time

from flushctl import names
from flushctl.heldmail.holdtag import TAG_HEADER, tag_of
from flushctl.mta.queuefiles import (FORCED_EXPIRE_BIT, SET_ASIDE_AFTER, QueuedMessage, QueueWatch,
                                     parse_postcat, read_defer_log)
from flushctl.mta.routing import route_of

log = logging.getLogger("flushctl.release")


class IntakePart:
    """``HeldMail``'s intake part (see ``library``)."""

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
            if queue == "hold":
                self._hold_listing = (present, watch.current_at, watch.version)
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
        recorded = set()
        for msg, dom, route, origin in mine:
            if self.ledger.record(msg.queue_id, dom, msg.size, msg.arrival or now,
                                  msg.created or now, route=route, origin=origin):
                recorded.add(msg.queue_id)
                counts[dom] = counts.get(dom, 0) + 1
                log.info("event=taken_in queue_id=%s domain=%s from=%s origin=%s",
                         msg.queue_id, dom, queue, origin)
        if queue == "deferred":
            self._ours_deferred.update(m.queue_id for m, *_ in mine)
        if to_hold:
            # the rows this pass recorded had no mark; one another process
            # recorded first, that process holds (and looks at) itself
            self._hold_unless_released(to_hold, dict.fromkeys(recorded))
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
        dom = self.overrides.domains().get(tag)
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


def _within(rcpt: str, domain: str) -> bool:
    """Is the recipient's domain ``domain`` or below it?"""
    parts = names.split_recipient(rcpt)
    if parts is None:
        return False
    name = parts[1].lower().rstrip(".")
    return name == domain or name.endswith("." + domain)
