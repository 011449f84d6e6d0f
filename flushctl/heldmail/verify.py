"""Checking every ledger row against the queue, so the all-domains views need not.

The status of one domain looks at the queue each time (a ``stat`` per
message).  The status of every domain and the metrics scrape cannot, with
a million held: listing the hold queue and reading every recorded id take
seconds on their own.  So the release helper's keeper, which lists the
hold queue anyway (intake: ``take_in``), checks each row against its
listing, looks up the ones the listing lacks (forgetting those whose
message is gone), and keeps in memory as of when the rows are right, for
which ledger file, and which domains had mail elsewhere than the hold
queue: a ``Check``.  Only the helper holds it (root's process, not the
ledger the milter may write): its scrape reads it in place, and a CLI
asks the helper for it over its socket (``{"op": "check"}``).

For ``VERIFIED_FOR`` seconds after that moment the views count from the
rows as they stand (``StatusPart.located_all``), and look up message by
message only the domains with mail outside the hold queue at the check,
in a release, or released since.  With no helper, or its check too old,
they list the queue themselves, as before.

What the views may then show late: mail deleted behind our back
(``postsuper -d``) until the next check, and mail the milter recorded
that never reached the queue (a later milter refused it), until the next
check too.  The keeper checks again whenever its listing of the hold
queue is redone, and every ``RECHECK_EVERY`` seconds at least.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger("flushctl.release")

# How long after the keeper's check the all-domains views trust the rows.
VERIFIED_FOR = 90.0
# A check at least this often, and, after a change, not sooner than
# MIN_GAP or COST_SHARE times the last one's cost (a million rows: 0.3 s).
RECHECK_EVERY = 30.0
MIN_GAP = 5.0
COST_SHARE = 20
# A check that found more domains than this with mail elsewhere (an admin's
# postsuper -H ALL, say) vouches for nothing: the views list the queue.
MAX_OUTSIDE = 10_000
# A check that would forget more than this share of the rows first reads
# Postfix's queue layout again: a hold queue hashed since (an admin's
# hash_queue_names) looks empty through the old one.
SUSPECT_SHARE = 0.5
# How long a CLI waits for the helper's answer (a helper that stalls: list).
ASK_TIMEOUT = 2.0


@dataclass(frozen=True)
class Check:
    at: float                 # the rows were right as of then (the listing's moment)
    ledger: int               # the ledger file's inode: another file, no check
    outside: frozenset[str]   # domains with mail outside the hold queue then

    def as_json(self) -> dict:
        return {"at": self.at, "ledger": self.ledger, "outside": sorted(self.outside)}

    @classmethod
    def from_json(cls, data) -> "Check | None":
        """The check ``as_json`` wrote; None for anything else."""
        try:
            return cls(float(data["at"]), int(data["ledger"]),
                       frozenset(str(d) for d in data["outside"]))
        except (TypeError, ValueError, KeyError):
            return None


def ask_helper(config) -> Check | None:
    """The helper's keeper's last check, asked over its socket; None when
    there is no helper, this user may not ask, or it has none."""
    from flushctl.privsep import client, wire
    from flushctl.privsep.errors import PrivsepError
    try:
        sock = client.connect(config, "admin")
    except (PrivsepError, OSError):
        return None
    try:
        sock.settimeout(ASK_TIMEOUT)
        reply = wire.Channel(sock).call({"op": "check"})
    except (PrivsepError, OSError, ValueError, TypeError):   # TimeoutError, garbage
        return None
    finally:
        sock.close()
    if not isinstance(reply, dict) or not reply.get("check"):
        return None
    return Check.from_json(reply["check"])


class VerifyPart:
    """``HeldMail``'s part that checks the whole ledger (see ``library``)."""

    def current_check(self) -> Check | None:
        """This process's own check (the keeper's), if it has one."""
        return self._check

    def trusted_check(self, now: float) -> Check | None:
        """A check of this ledger file recent enough to count from its rows
        (``check_source``: the helper's, asked; in the helper, the keeper's);
        None: list the queue."""
        check = self.check_source()
        if check is None or check.ledger != self.ledger.file_id:
            return None
        return check if check.at <= now + 5.0 and now - check.at <= VERIFIED_FOR else None

    def verify_ledger(self) -> int:
        """Check every row against the last listing of the hold queue
        (``take_in``'s), forgetting the rows whose message is gone: again
        when that listing was redone or the ledger file is new (not
        sooner than ``MIN_GAP``), and every ``RECHECK_EVERY`` s.  Returns
        the rows forgotten."""
        listing = self._hold_listing
        if listing is None:
            return 0
        present, current_at, version = listing
        key = (version, self.ledger.generation)
        started = time.time()
        since = started - self._checked_at
        gap = COST_SHARE * self._check_cost
        if not (key != self._verified_key and since >= max(MIN_GAP, gap)
                or since >= max(RECHECK_EVERY, gap) or since < 0):
            return 0
        missing, rows = self.ledger.missing_from(present)
        entries = list(self.ledger.entries_by_id(missing).values())
        snap = self._snapshot(entries, prune=False)
        gone = snap.gone
        if gone and len(gone) > SUSPECT_SHARE * rows:
            # first, Postfix's queue layout again (the listing goes with it)
            log.warning("event=verify_suspect rows=%d reason=reading_the_queue_layout_again",
                        len(gone))
            self._params = self._layout = None
            self._watches.clear()
            self._hold_listing = None
            self._check = None
            return len(self._snapshot(entries).gone)   # those gone all the same, forgotten
        if gone:
            self.ledger.forget(gone)
        outside = frozenset(i.domain for i in snap.present if i.queue != "hold")
        self._verified_key = key
        self._checked_at = started
        self._check_cost = time.time() - started
        self._check = Check(min(current_at, started), self.ledger.file_id, outside) \
            if len(outside) <= MAX_OUTSIDE else None
        return len(gone)
