"""`flushctl poller`: held mail goes out by itself once the customer's server answers.

Every ``[poller] interval`` seconds one cycle probes each unpaused domain
that holds mail (the ledger's totals say which: the cost follows the
domains with mail, not all configured ones), at most
``[poller] concurrency`` probes at a time, and releases a domain's mail
(``OnDemand.flush``, the same path as `flushctl flush`) when its server
answers and no earlier release is still delivering.  Every probe result
is recorded for `flushctl status`.
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
        domains = await asyncio.to_thread(od.holding)
        prober = od.prober
        limit = asyncio.Semaphore(self.config.poller_concurrency)

        async def one(name: str) -> CycleEntry:
            async with limit:
                result = await prober.probe(self.config.domains[name])
            await asyncio.to_thread(od.record_probe, name, result)
            if not result.reachable:
                log.info("event=probe domain=%s result=%s target=%s detail=%r",
                         name, result.outcome.replace(" ", "_"), result.target or "-",
                         result.detail)
                return CycleEntry(name, result, HELD)
            action, released = await asyncio.to_thread(self._release, name, result)
            log.info("event=probe domain=%s result=reachable target=%s action=%s released=%d",
                     name, result.target, action.replace(" ", "_"), released)
            return CycleEntry(name, result, action, released)

        return list(await asyncio.gather(*(one(d) for d in domains)))

    def _release(self, name: str, result: ProbeResult) -> tuple[str, int]:
        od = self.ondemand
        try:
            if od.in_flight(name):
                return BUSY, 0
            flushed = od.flush(name, trigger="poller", probed=result)
        except Refused as exc:
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
    from . import metrics
    server = metrics.serve(ondemand)

    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Poller(ondemand).run(stop)
    try:
        asyncio.run(main())
    finally:
        if server is not None:
            server.shutdown()
