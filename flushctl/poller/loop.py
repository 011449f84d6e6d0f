"""`flushctl poller`: held mail goes out by itself once the customer's server answers.

Every ``[poller] interval`` seconds one cycle probes the destinations of
each unpaused domain that holds mail the poller may send (the ledger says
which: the cost follows the domains with mail, not all configured ones),
at most ``[poller] concurrency`` probes at a time, and releases a
domain's mail (``HeldMail.flush``, the same path as `flushctl flush`)
when a server answers and no earlier release is still delivering.  Every
probe result is recorded for `flushctl status`.

The poller keeps Postfix's retry discipline: after a release whose
attempts tempfailed it waits out the domain's backoff (minimal to maximal
backoff time, doubling) however friendly the greeting, and it never
retries mail the customer's server refused (5xx) by itself: that waits
for the customer's own trigger or an admin.

The poller runs unprivileged: every release, and everything that reads
the ledger or the queue, goes through the release helper (``helper``),
which also runs the keeper.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from dataclasses import dataclass

from flushctl import stopsignals
from flushctl.privsep import accounts, wire
from flushctl.privsep.errors import Malformed, PrivsepError
from flushctl.heldmail.library import HeldMail
from flushctl.mta.relays import Overrides
from flushctl.heldmail.outcome import BACKING_OFF, BUSY, FAILED, NOWHERE, RELEASED, UNREACHABLE, \
    Outcome
from flushctl.poller.prober import NOT_PROBED, OUTCOMES, ProbeResult, Prober, routable

log = logging.getLogger("flushctl.poller")

HELD = "held"          # server did not answer: the mail stays
# the other actions are the release's outcomes (BUSY: an earlier release is
# still at work; BACKING_OFF: its last release tempfailed, Postfix's backoff first)


def action_of(outcome: Outcome) -> str:
    """The poller's action (its log's ``action=``) for a release's outcome."""
    if outcome.shared:
        return BUSY
    return HELD if outcome.kind in (UNREACHABLE, NOWHERE) else outcome.kind


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


class LocalOps:
    """What the poller asks of the ledger and Postfix, done in this process
    (one process as root, or the release helper for the poller)."""

    def __init__(self, heldmail: HeldMail):
        self.heldmail = heldmail

    def candidates(self) -> tuple[dict[str, list[str]], dict[str, float]]:
        return self.heldmail.poller_candidates()

    def record_probe(self, name: str, result: ProbeResult) -> None:
        self.heldmail.record_probe(name, result)

    def webhooks(self) -> list[dict]:
        """Due deliveries, each only to the URL its domain's config names
        now (the ledger is shared with the milter's group: a row planted
        there sends nothing anywhere else)."""
        domains = self.heldmail.config.domains
        return [{k: d[k] for k in ("id", "url", "body", "signature")}
                for d in self.heldmail.ledger.take_webhooks(time.time())
                if d["domain"] in domains and domains[d["domain"]].notify_webhook == d["url"]]

    def webhook_result(self, delivery: int, ok: bool, error: str) -> None:
        if not self.heldmail.ledger.webhook_result(delivery, ok, error, time.time()):
            raise Malformed(f"no such webhook delivery: {delivery}")

    def release(self, name: str, results: dict[str, ProbeResult]) -> tuple[str, int]:
        """Release ``name`` if no earlier release is still at work, with
        the poller's probes: (action, messages released)."""
        od = self.heldmail
        try:
            outcome = Outcome(BUSY) if od.in_flight(name) else \
                od.flush(name, trigger="poller", probed=results, probed_only=True)
        except Exception:
            log.exception("event=error stage=release domain=%s", name)
            return FAILED, 0
        return action_of(outcome), outcome.released


class Poller:
    """The loop: probes here, everything else through ``ops`` (a
    ``LocalOps``, or a ``RemoteOps`` asking the release helper)."""

    def __init__(self, config, ops, prober: Prober, postfix_prober: Prober | None = None):
        self.config = config
        self.overrides = Overrides(config)   # the relays customers chose: where to knock
        self.ops = ops
        self.prober = prober
        self.postfix_prober = postfix_prober

    @classmethod
    def local(cls, heldmail: HeldMail) -> "Poller":
        return cls(heldmail.config, LocalOps(heldmail), heldmail.prober,
                   heldmail.postfix_prober())

    async def cycle(self) -> list[CycleEntry]:
        candidates, waiting = await asyncio.to_thread(self.ops.candidates)
        limit = asyncio.Semaphore(self.config.poller_concurrency)
        entries = [CycleEntry(name, ProbeResult(NOT_PROBED, "", f"backing off until "
                                                f"{time.strftime('%H:%M:%S', time.localtime(until))}",
                                                time.time()), BACKING_OFF)
                   for name, until in sorted(waiting.items())]

        # the helper's config may be newer than ours: a domain we do not
        # know waits for our restart
        unknown = sorted(set(candidates) - set(self.config.domains))
        if unknown:
            log.warning("event=skipped reason=not_in_our_config domains=%s",
                        ",".join(unknown[:20]))
            candidates = {d: r for d, r in candidates.items() if d in self.config.domains}

        async def knock(dom, route: str) -> ProbeResult:
            async with limit:   # [poller] concurrency: probes at once, whatever their domain
                return await self.prober.probe(dom, route)

        async def one(name: str, routes: list[str]) -> CycleEntry:
            dom = self.overrides.domains()[name]
            results = dict(zip(routes, await asyncio.gather(
                *(knock(dom, route) for route in routes))))
            async with limit:
                # Postfix's smtp client must be able to route them too
                results = await routable(self.postfix_prober, dom, results)
            result = results.get(name) or results[routes[0]]
            await asyncio.to_thread(self.ops.record_probe, name, result)
            if not any(r.reachable for r in results.values()):
                log.info("event=probe domain=%s result=%s target=%s detail=%r",
                         name, result.outcome.replace(" ", "_"), result.target or "-",
                         result.detail)
                return CycleEntry(name, result, HELD)
            result = next(r for r in results.values() if r.reachable)
            action, released = await asyncio.to_thread(self.ops.release, name, results)
            log.info("event=probe domain=%s result=reachable target=%s action=%s released=%d",
                     name, result.target, action.replace(" ", "_"), released)
            return CycleEntry(name, result, action, released)

        entries += await asyncio.gather(*(one(d, r) for d, r in sorted(candidates.items())))
        return entries

    async def run(self, stop: asyncio.Event) -> None:
        interval = self.config.poller_interval
        log.info("event=start interval=%d concurrency=%d", interval,
                 self.config.poller_concurrency)
        from flushctl.notify.webhook import deliver
        hooks = asyncio.get_running_loop().create_task(deliver(self.ops, self.config, stop)) \
            if self.config.domains_where("notify_webhook") else None
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
        if hooks is not None:
            await hooks
        log.info("event=stop")


def run_once(heldmail: HeldMail) -> list[CycleEntry]:
    return asyncio.run(Poller.local(heldmail).cycle())


# -- the split: probes and metrics unprivileged, the rest as root ----------------

MAX_ROUTES = 10_000              # destinations in one release request, at most
MAX_REQUEST = 16 * 1024 * 1024   # bytes: MAX_ROUTES probe results fit
MAX_TEXT = 1000                  # characters of a probe's target or detail kept


def encode_probe(result: ProbeResult) -> list:
    return [result.outcome, result.target[:MAX_TEXT], result.detail[:MAX_TEXT], result.when]


def decode_probe(data) -> ProbeResult:
    """A probe result from the poller; ``Malformed`` if
    it is not one.  Its outcome is believed: the worst a lie can do is
    release a domain whose server does not answer (the mail goes to the
    deferred queue, and the keeper holds it again) or record a wrong
    probe, as a finger query from the customer's network could anyway."""
    if not (isinstance(data, list) and len(data) == 4
            and isinstance(data[0], str) and data[0] in OUTCOMES
            and isinstance(data[1], str) and isinstance(data[2], str)
            and isinstance(data[3], (int, float)) and not isinstance(data[3], bool)
            and math.isfinite(data[3]) and 0 <= data[3] < 2**32):
        raise Malformed(f"malformed probe result {data!r:.100}")
    # what a customer's DNS or greeting says may be long: cut, not refused
    return ProbeResult(data[0], data[1][:MAX_TEXT], data[2][:MAX_TEXT], float(data[3]))


class RemoteOps:
    """In the unprivileged poller: ``LocalOps``'s methods, asked of the release helper."""

    def __init__(self, channel: wire.Channel):
        self.channel = channel

    def candidates(self):
        reply = self.channel.call({"op": "candidates"})
        return ({d: list(r) for d, r in reply["candidates"].items()},
                {d: float(u) for d, u in reply["waiting"].items()})

    def record_probe(self, name: str, result: ProbeResult) -> None:
        self.channel.call({"op": "probe", "domain": name, "result": encode_probe(result)})

    def webhooks(self) -> list[dict]:
        return self.channel.call({"op": "webhooks"})["deliveries"]

    def webhook_result(self, delivery: int, ok: bool, error: str) -> None:
        self.channel.call({"op": "webhook_result", "id": delivery, "ok": ok,
                           "error": error[:MAX_TEXT]})

    def release(self, name: str, results: dict[str, ProbeResult]) -> tuple[str, int]:
        try:
            reply = self.channel.call({"op": "release", "domain": name, "results":
                                       {r: encode_probe(res) for r, res in results.items()}})
        except PrivsepError as exc:
            log.error("event=error stage=release domain=%s reason=%r", name, str(exc))
            return FAILED, 0
        return reply["action"], reply["released"]


def answer_scrape(scrape, request: dict) -> dict:
    """The release helper's answer to a scrape connection: the figures, nothing else."""
    if request != {"op": "metrics"}:
        raise Malformed(f"not a scrape: {request!r:.80}")
    return {"body": scrape().decode()}


def answer(ops: LocalOps, request: dict) -> dict:
    """The release helper's answer to one request of the poller: only
    these (candidates, probe, release, webhooks, webhook_result), each checked (a configured domain, well-formed probe
    results) before anything is done; ``Malformed`` otherwise."""
    op = request.get("op")
    domains = ops.heldmail.config.domains
    if op == "candidates" and set(request) == {"op"}:
        candidates, waiting = ops.candidates()
        return {"candidates": candidates, "waiting": waiting}
    if op == "webhooks" and set(request) == {"op"}:
        return {"deliveries": ops.webhooks()}
    if op == "webhook_result" and set(request) == {"op", "id", "ok", "error"} \
            and type(request["id"]) is int and 0 < request["id"] < 2 ** 63 \
            and type(request["ok"]) is bool \
            and isinstance(request["error"], str) and len(request["error"]) <= MAX_TEXT:
        ops.webhook_result(request["id"], request["ok"], request["error"])
        return {}
    name = request.get("domain")
    if not isinstance(name, str) or name not in domains:
        raise Malformed(f"not a configured domain: {name!r:.80}")
    if op == "probe" and set(request) == {"op", "domain", "result"}:
        ops.record_probe(name, decode_probe(request["result"]))
        return {}
    if op == "release" and set(request) == {"op", "domain", "results"} \
            and isinstance(request["results"], dict) \
            and 0 < len(request["results"]) <= MAX_ROUTES:
        results = {}
        for route, data in request["results"].items():
            if not (0 < len(route) <= 255 and route.isprintable() and " " not in route):
                raise Malformed(f"malformed route {route!r:.80}")
            results[route] = decode_probe(data)
        action, released = ops.release(name, results)
        return {"action": action, "released": released}
    raise Malformed(f"not a request the poller sends: {op!r:.40}")


def _preload() -> None:
    """Import now what the poller would import on first use:
    once it has given up root it may not be able to read the
    interpreter's library (installed under a private directory, or
    hidden by the unit's ProtectHome)."""
    import concurrent.futures.thread  # noqa: F401  asyncio.to_thread's executor
    import dns._asyncio_backend  # noqa: F401
    import dns.rdata
    import encodings.idna  # noqa: F401
    import flushctl.notify.webhook  # noqa: F401  urllib, http.client, ssl
    dns.rdata.load_all_types()   # dnspython loads a record type's code when it first sees one


def run_forever(config, heldmail: HeldMail | None = None) -> None:
    """Run the poller and its metrics endpoint until SIGTERM.

    Started as root with ``[poller] user`` empty, one process does all,
    the keeper included.  Otherwise it runs as ``[poller] user`` (as root:
    bind the metrics port, then become it): it probes and serves scrapes,
    and asks the release helper (``flushctl helper``, which runs the
    keeper) for these only: what to probe, a probe's result to record, a
    release, a scrape's figures, the webhook deliveries due and their
    results.
    """
    from flushctl import metrics
    from flushctl.privsep import client
    from flushctl.heldmail.keeper import start_thread
    stopsignals.catch()
    user = config.poller_user
    root = os.geteuid() == 0
    entry = accounts.account(user, "poller") if user and root else None
    server = metrics.listen(config)   # bound first: the port may be a privileged one
    if root and entry is None:
        heldmail = heldmail or HeldMail(config)
        end_keeper, kept = start_thread(config)
        heldmail.check_source = kept.current_check   # the scrape counts from its check
        metrics.start(server, metrics.scrape_of(heldmail), config.metrics_listen)
        try:
            asyncio.run(_loop(Poller.local(heldmail)))
        finally:
            end_keeper()
            if server is not None:
                server.shutdown()
        return

    # Postfix's settings, read before root goes: the probers need them (an
    # HeldMail that only probes never opens the ledger)
    probing = HeldMail(config)
    prober, postfix_prober = probing.prober, probing.postfix_prober()
    _preload()
    if entry is not None:
        accounts.drop_privileges(entry, "poller", groups=True)
    work = wire.Channel(client.connect(config, "poller", wait=client.CONNECT_WAIT))
    scrapes = wire.Channel(client.connect(config, "scrape", wait=client.CONNECT_WAIT))
    metrics.start(server, lambda: scrapes.call({"op": "metrics"})["body"].encode(),
                  config.metrics_listen)
    log.info("event=unprivileged user=%s", accounts.current_user())

    def gone() -> bool:   # the helper hung up on either channel
        return work.hung_up() or scrapes.hung_up()
    asked = asyncio.run(_loop(Poller(config, RemoteOps(work), prober, postfix_prober), gone))
    if server is not None:
        server.shutdown()
    if not asked:   # not a stop asked for: an error, so the supervisor restarts us
        raise PrivsepError("poller: the release helper is gone")


async def _loop(poller: Poller, gone=None) -> bool:
    """Run ``poller`` until SIGTERM (True), or until ``gone()`` says the
    release helper is (False): then nobody can release, and it ends too."""
    stop = asyncio.Event()
    running = asyncio.get_running_loop()
    asked = []

    def ask():
        asked.append(True)
        stop.set()
    stopsignals.on_stop(running, ask)

    async def watch():
        while not gone():
            await asyncio.sleep(1.0)
        stop.set()
    watching = running.create_task(watch()) if gone is not None else None
    await poller.run(stop)
    if watching is not None:
        watching.cancel()
    return bool(asked)
