"""Held messages per domain, hour by hour, for the last week (the portal's chart).

The keeper samples the domains' totals once an hour: one row per domain
that holds mail (an hour without a row held nothing), rows older than
``KEEP`` are dropped in the same transaction.
"""

from __future__ import annotations

from flushctl.heldmail.ledger.connection import LedgerFile

HOUR = 3600
KEEP = 8 * 24   # hours of history kept (the chart shows 7 days)


class History(LedgerFile):
    """The ledger's part that keeps the hourly samples."""

    def sample_history(self, now: float) -> bool:
        """Record this hour's held messages per domain, once per hour; True
        when it did (a second call within the hour does nothing)."""
        hour = int(now // HOUR)
        with self._tx() as db:
            if db.execute("SELECT 1 FROM history WHERE domain = '' AND hour = ?",
                          (hour,)).fetchone():
                return False
            db.execute("INSERT INTO history (domain, hour, messages)"
                       " SELECT domain, ?, messages FROM domains WHERE messages > 0", (hour,))
            # a marker row: this hour was sampled even if nothing was held
            db.execute("INSERT OR IGNORE INTO history (domain, hour, messages) VALUES ('', ?, 0)",
                       (hour,))
            db.execute("DELETE FROM history WHERE hour < ?", (hour - KEEP,))
        return True

    def history(self, domain: str, now: float,
                hours: int = 7 * 24) -> list[tuple[int, int | None]]:
        """(hour start, held messages) for each of the last ``hours`` hours,
        oldest first; None for an hour that was not sampled (nothing ran)."""
        last = int(now // HOUR)
        first = last - hours + 1
        with self._lock:
            sampled = {h for (h,) in self._db.execute(
                "SELECT hour FROM history WHERE domain = '' AND hour >= ?", (first,))}
            held = dict(self._db.execute(
                "SELECT hour, messages FROM history WHERE domain = ? AND hour >= ?",
                (domain, first)))
        return [(h * HOUR, held.get(h, 0) if h in sampled else None)
                for h in range(first, last + 1)]
