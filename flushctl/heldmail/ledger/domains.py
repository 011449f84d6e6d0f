"""The ledger's per-domain state: running totals, pause, releases, probes, backoff.

One row per customer domain; a release and a probe are counted (see
``counters``) in the same transaction as the row they change.
"""

from __future__ import annotations

import os
import time

from flushctl.heldmail.ledger.connection import LedgerFile
from flushctl.heldmail.ledger.counters import count
from flushctl.heldmail.ledger.schema import STATE_SELECT, DomainState, domain_state


class DomainStates(LedgerFile):
    """The ledger's part that keeps each domain's row."""

    def state(self, domain: str) -> DomainState:
        with self._lock:
            row = self._db.execute(STATE_SELECT + " WHERE domain = ?", (domain,)).fetchone()
        if row is None:
            return DomainState(domain)
        return domain_state(row)

    def _update(self, domain: str, _counted: tuple | None = None, **fields) -> None:
        cols = ", ".join(f"{name} = ?" for name in fields)
        with self._tx() as db:
            self._ensure_domain(db, domain)
            db.execute(f"UPDATE domains SET {cols} WHERE domain = ?", (*fields.values(), domain))
            if _counted:
                count(db, _counted[0], _counted[1:])

    def has_domain(self, domain: str) -> bool:
        """Has this ledger ever had a row for ``domain``?"""
        with self._lock:
            return self._db.execute("SELECT 1 FROM domains WHERE domain = ?",
                                    (domain,)).fetchone() is not None

    def states(self) -> dict[str, DomainState]:
        """Every domain's row, in one read."""
        with self._lock:
            rows = self._db.execute(STATE_SELECT).fetchall()
        return {row[0]: domain_state(row) for row in rows}

    def ask_recount(self, domain: str, when: float) -> None:
        """The milter refused mail at the domain's quota by running totals it
        cannot check against the queue: the keeper counts it again."""
        self._update(domain, recount_asked=when)

    def recounts_asked(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT domain FROM domains WHERE recount_asked IS NOT NULL")]

    def recounted(self, domain: str, asked_before: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE domains SET recount_asked = NULL WHERE domain = ? "
                       "AND recount_asked <= ?", (domain, asked_before))

    def set_paused(self, domain: str, paused: bool) -> None:
        self._update(domain, paused=int(paused))

    def record_flush(self, domain: str, trigger: str, result: str,
                     releasing_until: float | None, when: float | None = None,
                     client: str | None = None) -> None:
        """A release: the domain's last-flush fields, and releases{domain,trigger} + 1."""
        self._update(domain, last_flush=time.time() if when is None else when,
                     last_flush_trigger=trigger, last_flush_result=result,
                     last_flush_client=client, releasing_until=releasing_until,
                     _counted=("releases", domain, trigger))

    def set_releasing_until(self, domain: str, until: float | None) -> None:
        self._update(domain, releasing_until=until)

    def set_backoff(self, domain: str, until: float | None, step: float | None) -> None:
        self._update(domain, backoff_until=until, backoff=step)

    def claim_release(self, domain: str, now: float, trigger: str, client: str | None,
                      includes_refused: bool, releasing_until: float, shares) -> bool:
        """Start a release unless one shares it: ``shares(state)`` decides
        from the row read in the same transaction, so two processes never
        both start one.  True: this caller releases (the row says so)."""
        with self._tx() as db:
            self._ensure_domain(db, domain)
            row = db.execute(STATE_SELECT + " WHERE domain = ?", (domain,)).fetchone()
            if shares(domain_state(row)):
                return False
            db.execute("UPDATE domains SET last_flush = ?, last_flush_trigger = ?,"
                       " last_flush_result = ?, last_flush_client = ?, releasing_until = ?,"
                       " release_refused = ? WHERE domain = ?",
                       (now, trigger, f"releasing (pid {os.getpid()})", client, releasing_until,
                        int(includes_refused), domain))
            count(db, "releases", (domain, trigger))
            return True

    def forget_target(self, domain: str) -> None:
        """The domain's mail goes elsewhere now: what was learnt of the old
        target (its last probe, the backoff after its failures) says
        nothing of the new one."""
        self._update(domain, reachable=None, last_error=None, last_probe=None,
                     backoff_until=None, backoff=None)

    def set_flush_result(self, domain: str, result: str) -> None:
        self._update(domain, last_flush_result=result)

    def record_probe(self, domain: str, reachable: bool, error: str | None,
                     when: float | None = None, outcome: str | None = None) -> None:
        """A probe's result, and probes{domain,outcome} + 1."""
        self._update(domain, reachable=int(reachable), last_error=error,
                     last_probe=time.time() if when is None else when,
                     _counted=("probes", domain,
                               outcome or ("reachable" if reachable else "unreachable")))

    def domains_with_mail(self) -> list[str]:
        """Unpaused domains whose running totals show held mail."""
        with self._lock:
            rows = self._db.execute(
                "SELECT domain FROM domains WHERE messages > 0 AND paused = 0"
                " ORDER BY domain").fetchall()
        return [r[0] for r in rows]

    def releasing_domains(self, now: float | None = None) -> list[str]:
        when = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT domain FROM domains WHERE releasing_until IS NOT NULL"
                " AND releasing_until > ?", (when,)).fetchall()
        return [r[0] for r in rows]
