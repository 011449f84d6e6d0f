"""Checking every ledger row against the queue, so the all-domains views need not.

The status of one domain looks at the queue each time (a ``stat`` per
message).  The status of every domain and the metrics scrape cannot, with
a million held: listing the hold queue and reading every recorded id take
seconds on their own.  So the keeper, which lists the hold queue anyway
(intake: ``take_in``), checks each row against its listing, looks up the
ones the listing lacks (pruning those whose message is gone), and writes
down as of when the rows are right and which domains had mail elsewhere
than the hold queue (``Records.set_verified``).  For ``VERIFIED_FOR``
seconds after that moment the views count from the rows as they stand
(``StatusPart.located_all``); with no keeper running, or its check too
old, they list the queue themselves, as before.

What the views may then show late, by at most that long: mail an admin
deleted with ``postsuper -d`` and mail that vanished some other way
outside our releases.  Mail recorded since is counted as it is recorded;
a release's mail is counted where it is (its domain is looked at message
by message).
"""

from __future__ import annotations

# How long after the keeper's check the all-domains views trust the rows:
# the hold queue's listing is redone at least once a minute (``QueueWatch``).
VERIFIED_FOR = 90.0
# A check that found more domains than this with mail elsewhere (an admin's
# postsuper -H ALL, say) is not written: the views list the queue meanwhile.
MAX_OUTSIDE = 10_000
# A check whose listing has not changed is written again at most this often.
REWRITE_EVERY = 10.0


class VerifyPart:
    """``HeldMail``'s part that checks the whole ledger (see ``library``)."""

    def verify_ledger(self) -> int:
        """Check every row against the last listing of the hold queue
        (``take_in``'s); rows whose message is gone are forgotten.  Again
        only when the listing was redone or the ledger file is new; else
        the check's time moves on while the listing still holds.  Returns
        the rows forgotten."""
        listing = self._hold_listing
        if listing is None:
            return 0
        present, current_at, version = listing
        key = (version, self.ledger.generation)
        forgotten = 0
        if key != self._verified_key:
            missing = self.ledger.missing_from(present)
            snap = self._snapshot(list(self.ledger.entries_by_id(missing).values()))
            forgotten = len(snap.gone)
            self._outside = sorted({i.domain for i in snap.present if i.queue != "hold"})
            self._verified_key = key
            self._verified_written = None
        if len(self._outside) > MAX_OUTSIDE:
            return forgotten
        written = self._verified_written
        # (a listing changed but not yet redone holds as of an earlier moment
        # than the one written while it still held: that one stays true)
        if written is None or current_at - written >= REWRITE_EVERY:
            self.ledger.set_verified(current_at, self._outside)
            self._verified_written = current_at
        return forgotten

    def verified_outside(self, now: float) -> frozenset[str] | None:
        """The domains with mail outside the hold queue at the keeper's last
        check, if that check is recent enough to count from the rows; None:
        list the queue."""
        found = self.ledger.verified()
        if found is None:
            return None
        at, outside = found
        return outside if at <= now + 5.0 and now - at <= VERIFIED_FOR else None
