"""The ledger's rows of held messages: record, read, mark and forget them.

A row is an index into Postfix's queue, not a copy of it; the domain's
running totals (``domains``) change in the same transaction as its rows.
"""

from __future__ import annotations

import time

from flushctl.heldmail.ledger.connection import LedgerFile
from flushctl.heldmail.ledger.counters import count
from flushctl.heldmail.ledger.schema import ENTRY_SELECT, Entry, Totals


class Records(LedgerFile):
    """The ledger's part that keeps the rows of held messages."""

    def record(self, queue_id: str, domain: str, size: int, arrival: float | None = None,
               ctime: float | None = None, counted: tuple | None = None,
               route: str | None = None, origin: str = "smtpd") -> bool:
        """Add a held message; False if the id was already recorded.
        ``counted``: (counter name, *labels) to count in the same transaction."""
        now = time.time()
        when = now if arrival is None else arrival
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO messages (queue_id, domain, size, arrival, ctime, route,"
                " recorded, origin) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (queue_id, domain, int(size), when, when if ctime is None else ctime,
                 None if route == domain else route, now, origin))
            if cur.rowcount == 0:
                return False
            if counted:
                count(db, counted[0], counted[1:])
            self._ensure_domain(db, domain)
            db.execute("UPDATE domains SET messages = messages + 1, bytes = bytes + ?"
                       " WHERE domain = ?", (int(size), domain))
            return True

    def entries(self, domain: str) -> list[Entry]:
        with self._lock:
            rows = self._db.execute(ENTRY_SELECT + " WHERE domain = ? ORDER BY arrival",
                                    (domain,)).fetchall()
        return [Entry(*row) for row in rows]

    def rows(self, domain: str) -> list[tuple]:
        """The domain's rows as Entry's fields, without an Entry each (the
        all-domains views read a million)."""
        with self._lock:
            return self._db.execute(ENTRY_SELECT + " WHERE domain = ?", (domain,)).fetchall()

    def totals(self, present: set[str] | None) -> Totals:
        """What the all-domains views count, in one read transaction and
        without a row of Python per message: the domains with a recorded
        id not in ``present`` (a listing of the hold queue; None: the rows
        stand, as the keeper checked them lately: ``heldmail.verify``); each
        holding domain's messages (counted on its index), bytes (its
        running total, kept with the rows; a domain whose running count is
        off is counted row by row too) and oldest arrival; the mail routed
        elsewhere than the domain, per route; the refused mail's rows."""
        with self._lock:
            db = self._db
            db.execute("BEGIN")
            try:
                missing = () if present is None else _missing(db, present)[0]
                uneven = {domain for (domain,) in self._rows_in(
                    "SELECT domain FROM messages WHERE queue_id IN ({})", missing)}
                held = {}
                for domain, messages, total in db.execute(
                        "SELECT domain, messages, bytes FROM domains WHERE messages > 0"
                ).fetchall():
                    count, oldest = db.execute(
                        "SELECT COUNT(*), MIN(arrival) FROM messages WHERE domain = ?",
                        (domain,)).fetchone()
                    held[domain] = (count, total, oldest)
                    if count != messages:   # running totals off: its rows decide
                        uneven.add(domain)
                routed: dict[str, dict[str, int]] = {}
                for domain, route, count in db.execute(
                        "SELECT domain, route, COUNT(*) FROM messages WHERE route IS NOT NULL"
                        " GROUP BY 1, 2"):
                    routed.setdefault(domain, {})[route] = count
                refused = db.execute(ENTRY_SELECT + " WHERE refused_since IS NOT NULL"
                                     " AND refused IS NOT NULL").fetchall()
            finally:
                db.execute("COMMIT")
        return Totals(uneven, held, routed, refused)

    def missing_from(self, present: set[str]) -> tuple[set[str], int]:
        """The recorded ids not in ``present`` (a listing of the hold
        queue), and how many rows there are."""
        with self._lock:
            return _missing(self._db, present)

    def entries_by_id(self, queue_ids) -> dict[str, Entry]:
        return {row[0]: Entry(*row) for row in
                self._rows_in(ENTRY_SELECT + " WHERE queue_id IN ({})", queue_ids)}

    def all_ids(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT queue_id FROM messages")}

    def recorded_since(self, domain: str, recorded_after: float, arrived_before: float) -> int:
        """Rows recorded after a moment for mail that arrived before it:
        copies of held mail requeued meanwhile (a refresh keeps the arrival)."""
        with self._lock:
            return self._db.execute(
                "SELECT COUNT(*) FROM messages WHERE domain = ? AND recorded > ?"
                " AND arrival <= ?", (domain, recorded_after, arrived_before)).fetchone()[0]

    def unrefused_routes(self) -> dict[str, list[str]]:
        """{domain: routes} of recorded mail not refused (the poller's work)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT domain, COALESCE(route, domain) FROM messages"
                " WHERE refused IS NULL ORDER BY 1, 2").fetchall()
        result: dict[str, list[str]] = {}
        for dom, route in rows:
            result.setdefault(dom, []).append(route)
        return result

    def refused_before(self, domain: str, when: float) -> bool:
        """Does the domain hold mail first refused before ``when``?"""
        with self._lock:
            return self._db.execute(
                "SELECT 1 FROM messages WHERE domain = ? AND refused_since < ? LIMIT 1",
                (domain, when)).fetchone() is not None

    def mark_released(self, queue_ids, when: float) -> None:
        ids = list(queue_ids)
        with self._tx() as db:
            db.executemany("UPDATE messages SET released = ? WHERE queue_id = ?",
                           [(when, q) for q in ids])

    def set_outcomes(self, outcomes, when: float) -> None:
        """``outcomes``: (queue_id, refusal text or None) of mail put back on
        hold after a failed attempt: a refusal is kept (first time kept too),
        a temporary failure clears it; either way the message is not in a
        release any more."""
        rows = list(outcomes)
        with self._tx() as db:
            for qid, refusal in rows:
                if refusal is None:
                    db.execute("UPDATE messages SET refused = NULL, refused_since = NULL,"
                               " released = NULL WHERE queue_id = ?", (qid,))
                else:
                    db.execute("UPDATE messages SET refused = ?, released = NULL,"
                               " refused_since = COALESCE(refused_since, ?) WHERE queue_id = ?",
                               (refusal, when, qid))

    def reassign(self, queue_id: str, domain: str, route: str,
                 from_domain: str | None = None) -> None:
        """A message whose remaining recipients belong to another customer
        domain, or whose route changed; ``from_domain``: only if its row
        is still that domain's (a queue id reused meanwhile is another's)."""
        with self._tx() as db:
            row = db.execute("SELECT domain, size FROM messages WHERE queue_id = ?",
                             (queue_id,)).fetchone()
            if row is None or from_domain is not None and row[0] != from_domain:
                return
            db.execute("UPDATE messages SET domain = ?, route = ? WHERE queue_id = ?",
                       (domain, None if route == domain else route, queue_id))
            if row[0] != domain:
                self._ensure_domain(db, domain)
                db.execute("UPDATE domains SET messages = messages - 1, bytes = bytes - ?"
                           " WHERE domain = ?", (row[1], row[0]))
                db.execute("UPDATE domains SET messages = messages + 1, bytes = bytes + ?"
                           " WHERE domain = ?", (row[1], domain))

    def arrived_since(self, domain: str, when: float) -> bool:
        """Has mail for the domain been recorded with an arrival after ``when``?"""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM messages WHERE domain = ? AND arrival > ? LIMIT 1",
                (domain, when)).fetchone()
        return row is not None

    def known(self, queue_ids) -> set[str]:
        """Which of these ids the ledger has."""
        return {r[0] for r in self._rows_in(
            "SELECT queue_id FROM messages WHERE queue_id IN ({})", queue_ids)}

    def forget(self, queue_ids) -> int:
        """Drop rows (their messages are gone); totals follow."""
        ids = list(queue_ids)
        removed = 0
        with self._tx() as db:
            for qid in ids:
                row = db.execute("DELETE FROM messages WHERE queue_id = ? RETURNING domain, size",
                                 (qid,)).fetchone()
                if row is None:
                    continue
                removed += 1
                db.execute("UPDATE domains SET messages = messages - 1, bytes = bytes - ?"
                           " WHERE domain = ?", (row[1], row[0]))
        return removed


def _missing(db, present: set[str]) -> tuple[set[str], int]:
    """The recorded ids not in ``present``, and how many rows there are:
    one string of all the ids, split in C and compared as sets (a third
    of reading a row each; queue ids have no spaces, and one that had
    would only be missing)."""
    (ids,) = db.execute("SELECT group_concat(queue_id, ' ') FROM messages").fetchone()
    recorded = set(ids.split(" ")) if ids else set()
    recorded.discard("")
    rows = len(recorded)
    recorded.difference_update(present)
    return recorded, rows
