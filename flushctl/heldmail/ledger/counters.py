"""The ledger's event counters: Prometheus counters that outlive any process.

``count`` adds to one inside a transaction already open (a release or a
probe is counted with the row it changes); ``Counters`` adds many at once
and reads them all.
"""

from __future__ import annotations

import json

from flushctl.heldmail.ledger.connection import LedgerFile


def count(db, name: str, labels, n: int = 1) -> None:
    """Add ``n`` to the counter ``name{labels}``, in the caller's transaction."""
    db.execute("INSERT INTO counters (name, labels, value) VALUES (?, ?, ?)"
               " ON CONFLICT (name, labels) DO UPDATE SET value = value + excluded.value",
               (name, json.dumps(list(labels)), int(n)))


class Counters(LedgerFile):
    """The ledger's part that adds to and reads the event counters."""

    def add_counts(self, items) -> None:
        """``items``: (name, labels tuple, n) each, added in one transaction."""
        items = list(items)
        if not items:
            return
        with self._tx() as db:
            for name, labels, n in items:
                count(db, name, labels, n)

    def counters(self) -> list[tuple[str, tuple, int]]:
        with self._lock:
            rows = self._db.execute("SELECT name, labels, value FROM counters"
                                    " ORDER BY name, labels").fetchall()
        return [(name, tuple(json.loads(labels)), value) for name, labels, value in rows]
