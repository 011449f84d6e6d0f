"""The ledger's releases still to be sent on to the cluster's peers (as ETRN).

A release here queues one forward per peer; each is retried until the
peer acknowledges it (or refuses it for good).
"""

from __future__ import annotations

import time

from flushctl.heldmail.ledger.connection import LedgerFile
from flushctl.heldmail.ledger.schema import Forward


class Forwards(LedgerFile):
    """The ledger's part that keeps the forwards to peers."""

    def queue_forwards(self, domain: str, peers, now: float | None = None) -> None:
        """A release happened here: each peer is to get it now (again, if one
        was still pending: the retry period starts afresh)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.executemany(
                "INSERT INTO forwards (domain, peer, since, due) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (domain, peer) DO UPDATE SET since = excluded.since,"
                " due = excluded.due, attempts = 0",
                [(domain, str(peer), now, now) for peer in peers])

    def forwards(self, due_by: float | None = None) -> list[Forward]:
        """Pending forwards, the earliest due first (only those due by ``due_by``)."""
        sql = "SELECT domain, peer, since, due, attempts, last_error FROM forwards"
        args: tuple = ()
        if due_by is not None:
            sql += " WHERE due <= ?"
            args = (due_by,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY due", args).fetchall()
        return [Forward(*row) for row in rows]

    def next_forward_due(self, except_peers=frozenset()) -> float | None:
        """When the next pending forward is due, to a peer not in ``except_peers``."""
        sql, args = "SELECT MIN(due) FROM forwards", tuple(except_peers)
        if args:
            sql += f" WHERE peer NOT IN ({', '.join('?' * len(args))})"
        with self._lock:
            return self._db.execute(sql, args).fetchone()[0]

    def forward_done(self, domain: str, peer: str, since: float) -> None:
        """The peer acknowledged (or refused for good) the release of ``since``;
        a newer one queued meanwhile stays."""
        with self._tx() as db:
            db.execute("DELETE FROM forwards WHERE domain = ? AND peer = ? AND since = ?",
                       (domain, peer, since))

    def forward_retry(self, domain: str, peer: str, since: float, due: float,
                      error: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE forwards SET due = ?, attempts = attempts + 1, last_error = ?"
                       " WHERE domain = ? AND peer = ? AND since = ?",
                       (due, error, domain, peer, since))
