"""The release scheduler: at most one release per domain at a time, shared by
every trigger inside its window; runs where the releasing is done (one
process as root, or the release helper).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from flushctl.heldmail.library import HeldMail
from flushctl.heldmail.outcome import FAILED, NOTHING, RELEASED, REPORTED, Outcome

log = logging.getLogger("flushctl.gateway")


class Releaser:
    """At most one release per domain at a time; triggers inside the window share it.

    Triggers that arrive while a release runs wait for it and get its
    result; triggers within ``window`` seconds after a release get its
    result too, as long as no new mail has arrived for the domain since.
    The window is the ledger's (``HeldMail.flush``): a release by the
    poller, an admin or a peer counts as much as one started here; this
    process's own recent releases are also answered from memory, without
    a worker thread.
    """

    def __init__(self, heldmail: HeldMail, window: float):
        self.heldmail = heldmail
        self.window = window
        self._inflight: dict[str, asyncio.Task] = {}
        self._tasks: set[asyncio.Task] = set()   # releases under way (the loop keeps weak refs)
        self._recent: dict[str, tuple[float, Outcome, float]] = {}
        self._sent_on: dict[str, float] = {}   # domain -> when last queued for the peers
        self.forwarded = None   # called when a release was queued for the peers

    async def trigger(self, domain: str, trigger: str, client: str, login: str = "") -> Outcome:
        """``login``: decided on by the gate already (here, or in the helper)."""
        if trigger == "report":
            try:
                status = await asyncio.to_thread(self.heldmail.status, domain)
            except Exception as exc:   # answered, as a failed release is
                log.exception("event=error stage=report domain=%s", domain)
                return Outcome(REPORTED, 0, "", str(exc), None)
            return Outcome(REPORTED, 0, "", "", status)
        recent = self._recently(domain)
        if recent is not None:
            return recent
        if domain in self._inflight:
            return (await asyncio.shield(self._inflight[domain])).as_shared()
        # Most queries find nothing held: one row read answers them here,
        # without a worker thread or the queue (unless the ledger file was
        # replaced: its rebuild reads the hold queue, in a worker thread).
        if self.heldmail.needs_rebuild():
            empty = await asyncio.to_thread(self.heldmail.status_if_empty, domain)
        else:
            empty = self.heldmail.status_if_empty(domain)
        if empty is not None:
            # nothing here, but the peers may hold some: they release too
            await self._send_on(domain, trigger)
            return Outcome(NOTHING, 0, "", "", empty)
        # The release is a task of its own: the trigger that started it may
        # go (its connection closed) while the release runs on and others
        # wait for its outcome.
        # started, or even done, while this one looked at the ledger
        if domain in self._inflight:
            return (await asyncio.shield(self._inflight[domain])).as_shared()
        recent = self._recently(domain)
        if recent is not None:
            return recent
        task = asyncio.get_running_loop().create_task(self._run(domain, trigger, client))
        self._inflight[domain] = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    def _recently(self, domain: str) -> Outcome | None:
        """A release a moment ago answers for this trigger too, unless mail
        has arrived since: then there is something new to release."""
        recent = self._recent.get(domain)
        if recent and time.monotonic() - recent[0] < self.window \
                and not self.heldmail.ledger.arrived_since(domain, recent[2]):
            return recent[1].as_shared()
        return None

    async def _run(self, domain: str, trigger: str, client: str) -> Outcome:
        started = time.time()
        try:
            outcome = await asyncio.to_thread(self._release, domain, trigger, client)
        finally:
            del self._inflight[domain]
        if trigger != "peer":
            self._sent_on[domain] = time.monotonic()   # flush queued it for the peers
            self._wake()
        # Only a release is worth sharing; "nothing held" or "server down"
        # may change any moment, and the next trigger looks again.
        if outcome.kind == RELEASED:
            self._recent[domain] = (time.monotonic(), outcome, started)
        else:
            self._recent.pop(domain, None)
        return outcome

    async def add_counts(self, items) -> None:
        await asyncio.to_thread(self.heldmail.ledger.add_counts, items)

    async def _send_on(self, domain: str, trigger: str) -> None:
        if trigger == "peer" or self.heldmail.config.cluster is None:
            return
        last = self._sent_on.get(domain)
        if last is not None and time.monotonic() - last < self.window:
            return   # a flood of triggers for one domain: one ETRN to each peer
        self._sent_on[domain] = time.monotonic()
        await asyncio.to_thread(self.heldmail.send_on, domain, trigger)
        self._wake()

    def _wake(self) -> None:
        if self.forwarded is not None:
            self.forwarded()

    def _release(self, domain: str, trigger: str, client: str) -> Outcome:
        od = self.heldmail
        try:
            dom = od.domain(domain)   # looked up once: the value the library is given
            before = od.status(dom)
        except Exception:
            log.exception("event=error stage=status domain=%s", domain)
            return Outcome(FAILED, 0, "", "status failed", None)
        try:
            outcome = od.flush(dom, trigger=trigger, client=client)
        except Exception as exc:
            log.exception("event=error stage=release domain=%s", domain)
            return Outcome(FAILED, 0, "", str(exc), before)
        return replace(outcome, before=before)
