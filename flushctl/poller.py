"""`flushctl poller`: held mail goes out by itself once the customer's server answers.

Every ``[poller] interval`` seconds one cycle probes the destinations of
each unpaused domain that holds mail the poller may send (the ledger says
which: the cost follows the domains with mail, not all configured ones),
at most ``[poller] concurrency`` probes at a time, and releases a
domain's mail (``OnDemand.flush``, the same path as `flushctl flush`)
when a server answers and no earlier release is still delivering.  Every
probe result is recorded for `flushctl status`.

The poller keeps Postfix's retry discipline: after a release whose
attempts tempfailed it waits out the domain's backoff (minimal to maximal
backoff time, doubling) however friendly the greeting, and it never
retries mail the customer's server refused (5xx) by itself: that waits
for the customer's own trigger or an admin.

The same process runs the keeper (``keeper``): queue housekeeping every
few seconds, in a thread of its own.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass

from .ondemand import OnDemand, Refused
from .probe import ProbeResult

log = logging.getLogger("flushctl.poller")

RELEASED = "released"
HELD = "held"          # server did not answer: the mail stays
BUSY = "delivering"    # an earlier release is still at work
NOTHING = "nothing held"
PAUSED = "paused"
FAILED = "failed"
BACKING_OFF = "backing off"   # its last release tempfailed: Postfix's backoff first
NOT_PROBED = "not probed"


@dataclass(frozen=True)
class CycleEntry:
    domain: str
    probe: ProbeResult
    action: str
    released: int = 0

    def as_json(self) -> dict:
        return {"domain": self.domain, "reachable": self.probe.reachable,
                "outcome": self.probe.outcome, "target": self.probe.target,
                "detail": self.probe.detail, "action": self.action,
                "released": self.released}


class Poller:
    def __init__(self, ondemand: OnDemand):
        self.ondemand = ondemand
        self.config = ondemand.config

    async def cycle(self) -> list[CycleEntry]:
        od = self.ondemand
        candidates, waiting = await asyncio.to_thread(od.poller_candidates)
        prober = od.prober
        limit = asyncio.Semaphore(self.config.poller_concurrency)
        entries = [CycleEntry(name, ProbeResult(NOT_PROBED, "", f"backing off until "
                                                f"{time.strftime('%H:%M:%S', time.localtime(until))}",
                                                time.time()), BACKING_OFF)
                   for name, until in sorted(waiting.items())]

        async def one(name: str, routes: list[str]) -> CycleEntry:
            dom = self.config.domains[name]
            async with limit:
                results = dict(zip(routes, await asyncio.gather(
                    *(prober.probe(dom, route) for route in routes))))
            result = results.get(name) or results[routes[0]]
            await asyncio.to_thread(od.record_probe, name, result)
            if not any(r.reachable for r in results.values()):
                log.info("event=probe domain=%s result=%s target=%s detail=%r",
                         name, result.outcome.replace(" ", "_"), result.target or "-",
                         result.detail)
                return CycleEntry(name, result, HELD)
            result = next(r for r in results.values() if r.reachable)
            action, released = await asyncio.to_thread(self._release, name, results)
            log.info("event=probe domain=%s result=reachable target=%s action=%s released=%d",
                     name, result.target, action.replace(" ", "_"), released)
            return CycleEntry(name, result, action, released)

        entries += await asyncio.gather(*(one(d, r) for d, r in sorted(candidates.items())))
        return entries

    def _release(self, name: str, results: dict[str, ProbeResult]) -> tuple[str, int]:
        od = self.ondemand
        try:
            if od.in_flight(name):
                return BUSY, 0
            flushed = od.flush(name, trigger="poller", probed=results)
        except Refused as exc:
            if exc.code == "backoff":
                return BACKING_OFF, 0
            return (PAUSED if exc.code == "paused" else HELD), 0
        except Exception:
            log.exception("event=error stage=release domain=%s", name)
            return FAILED, 0
        if flushed.probe is None:
            return NOTHING, 0
        return RELEASED, flushed.released

    async def run(self, stop: asyncio.Event) -> None:
        interval = self.config.poller_interval
        log.info("event=start interval=%d concurrency=%d", interval,
                 self.config.poller_concurrency)
        while not stop.is_set():
            started = time.monotonic()
            try:
                entries = await self.cycle()
                log.info("event=cycle domains=%d released=%d seconds=%.2f", len(entries),
                         sum(1 for e in entries if e.action == RELEASED),
                         time.monotonic() - started)
            except Exception:
                log.exception("event=error stage=cycle")
            delay = max(0.0, interval - (time.monotonic() - started))
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except asyncio.TimeoutError:
                pass
        log.info("event=stop")


def run_once(ondemand: OnDemand) -> list[CycleEntry]:
    return asyncio.run(Poller(ondemand).cycle())


def run_forever(ondemand: OnDemand) -> None:
    import threading

    from . import metrics
    from .keeper import Keeper
    server = metrics.serve(ondemand)
    # the keeper works on its own OnDemand (its own ledger connection and caches)
    keeper_stop = threading.Event()
    keeper = threading.Thread(target=Keeper(OnDemand(ondemand.config)).run,
                              args=(keeper_stop,), name="keeper", daemon=True)
    keeper.start()

    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Poller(ondemand).run(stop)
    try:
        asyncio.run(main())
    finally:
        keeper_stop.set()
        keeper.join(10)
        if server is not None:
            server.shutdown()
