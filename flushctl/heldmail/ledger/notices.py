"""When each domain's notices went out, and the webhook deliveries still to make.

A webhook delivery is made by the poller's unprivileged half (it reads
the receiver's answer): it takes due ones (``take_webhooks``), each
handed out again only after ``TAKEN_FOR`` seconds without an answer, and
reports each result (``webhook_result``); a failure is retried with a
doubling delay until its ``until``.
"""

from __future__ import annotations

from flushctl.heldmail.ledger.connection import LedgerFile
from flushctl.heldmail.ledger.counters import count

TAKEN_FOR = 120.0
FIRST_RETRY = 5.0
MAX_RETRY = 3600.0
MAX_TAKE = 20


class Notices(LedgerFile):
    """The ledger's part that remembers notices."""

    def notices(self, domain: str) -> dict[str, float]:
        with self._lock:
            return dict(self._db.execute("SELECT kind, sent FROM notices WHERE domain = ?",
                                         (domain,)))

    def notice_sent(self, domain: str, kind: str, when: float, counted=None) -> None:
        """Record that ``kind`` went out (or, "empty", that nothing was held);
        ``counted``: (kind, channel, result) to add to the counters."""
        with self._tx() as db:
            db.execute("INSERT INTO notices (domain, kind, sent) VALUES (?, ?, ?)"
                       " ON CONFLICT (domain, kind) DO UPDATE SET sent = excluded.sent",
                       (domain, kind, when))
            if counted:
                count(db, "notifications", (domain, *counted))

    def queue_webhook(self, domain: str, kind: str, url: str, body: bytes, signature: str,
                      now: float, retry_for: float) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO webhooks (domain, kind, url, body, signature, due, until)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (domain, kind, url, body, signature, now, now + retry_for))

    def take_webhooks(self, now: float) -> list[dict]:
        """Deliveries due now (at most ``MAX_TAKE``), marked as taken;
        expired ones are dropped and counted."""
        with self._tx() as db:
            for domain, kind in db.execute("SELECT domain, kind FROM webhooks WHERE until < ?",
                                           (now,)).fetchall():
                count(db, "notifications", (domain, kind, "webhook", "expired"))
            db.execute("DELETE FROM webhooks WHERE until < ?", (now,))
            rows = db.execute(
                "SELECT id, domain, url, body, signature FROM webhooks WHERE due <= ?"
                " AND (taken IS NULL OR taken < ?) ORDER BY due LIMIT ?",
                (now, now - TAKEN_FOR, MAX_TAKE)).fetchall()
            db.executemany("UPDATE webhooks SET taken = ? WHERE id = ?",
                           [(now, r[0]) for r in rows])
        out = []
        for i, d, u, b, s in rows:
            try:   # rows are the helper's; one of another shape is no delivery
                body = b.decode() if isinstance(b, bytes) else str(b)
                out.append({"id": i, "domain": d, "url": u, "body": body, "signature": s})
            except (UnicodeDecodeError, TypeError):
                continue
        return out

    def webhook_result(self, delivery: int, ok: bool, error: str, now: float) -> bool:
        """The poller's report of one delivery; False for one it was not given."""
        with self._tx() as db:
            row = db.execute("SELECT domain, kind, attempts FROM webhooks WHERE id = ?"
                             " AND taken IS NOT NULL", (delivery,)).fetchone()
            if row is None:
                return False
            domain, kind, attempts = row
            if ok:
                db.execute("DELETE FROM webhooks WHERE id = ?", (delivery,))
                count(db, "notifications", (domain, kind, "webhook", "sent"))
            else:
                delay = min(MAX_RETRY, FIRST_RETRY * 2 ** attempts)
                db.execute("UPDATE webhooks SET attempts = attempts + 1, due = ?, taken = NULL,"
                           " last_error = ? WHERE id = ?", (now + delay, error[:500], delivery))
                count(db, "notifications", (domain, kind, "webhook", "failed"))
        return True
