"""The ledger's verdicts on held mail that is not ours, so each message is read once.

Each verdict holds for the config it was made under (``scope``: a
fingerprint of the domains): a process still running an older config
never decides for one running the newer.
"""

from __future__ import annotations

from flushctl.heldmail.ledger.connection import LedgerFile


class ForeignMail(LedgerFile):
    """The ledger's part that remembers which held mail is not ours."""

    foreign_scope = ""

    def set_foreign_scope(self, scope: str) -> None:
        """Judge under ``scope`` from now on; verdicts made under other
        scopes are dropped (a config changed: what was not ours may be)."""
        self.foreign_scope = scope
        with self._tx() as db:
            db.execute("DELETE FROM foreign_mail WHERE scope != ?", (scope,))

    def foreign(self, queue: str) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute(
                "SELECT queue_id FROM foreign_mail WHERE scope = ? AND queue = ?",
                (self.foreign_scope, queue))}

    def foreign_among(self, queue: str, queue_ids) -> set[str]:
        return {r[0] for r in self._rows_in(
            "SELECT queue_id FROM foreign_mail WHERE scope = ? AND queue = ?"
            " AND queue_id IN ({})", queue_ids, self.foreign_scope, queue)}

    def foreign_for_customers(self) -> dict[str, int]:
        """Held mail for customer domains that is not ours, per domain."""
        with self._lock:
            rows = self._db.execute(
                "SELECT domain, COUNT(*) FROM foreign_mail WHERE scope = ? AND"
                " domain IS NOT NULL AND queue = 'hold' GROUP BY domain",
                (self.foreign_scope,)).fetchall()
        return dict(rows)

    def add_foreign(self, queue: str, items) -> None:
        """``items``: (queue_id, customer domain or None)."""
        with self._tx() as db:
            db.executemany("INSERT OR IGNORE INTO foreign_mail VALUES (?, ?, ?, ?)",
                           [(self.foreign_scope, queue, qid, dom) for qid, dom in items])

    def prune_foreign(self, queue: str, present: set[str]) -> None:
        gone = self.foreign(queue) - present
        if gone:
            with self._tx() as db:
                db.executemany("DELETE FROM foreign_mail WHERE scope = ? AND queue = ?"
                               " AND queue_id = ?",
                               [(self.foreign_scope, queue, qid) for qid in gone])
