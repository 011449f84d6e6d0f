"""The release helper's side of a gateway connection: bounded, and a
release that outlives the connection that asked for it.

A stand-in for the ledger and the queue is used here (the release is an
event the test sets); the whole path on a real Postfix is in
tests/integration/test_helper.py and test_gateway.py."""

import asyncio
import json
import socket
from types import SimpleNamespace

from flushctl.privsep.releases import serve_releases
from flushctl.privsep.wire import MAX_INFLIGHT
from flushctl.gateway.gate import Gate
from flushctl.gateway.releaser import Releaser
from flushctl.heldmail.outcome import RELEASED, Outcome

DOMAINS = {"customer.example": SimpleNamespace(flush_from=())}


class HeldMail:
    """What a Releaser asks of HeldMail, with mail held and no rebuild."""
    config = SimpleNamespace(cluster=None)
    ledger = SimpleNamespace(arrived_since=lambda domain, since: False)

    def needs_rebuild(self):
        return False

    def status_if_empty(self, domain):
        return None


class SlowReleaser(Releaser):
    """Each release waits for ``go``; counts how many started."""

    def __init__(self):
        super().__init__(HeldMail(), window=60.0)
        self.started = 0
        self.go = None

    def _release(self, domain, how, client):
        self.started += 1
        self.go.wait(30)
        return Outcome(RELEASED, 1, "[192.0.2.1]", "", None)


def test_a_gateway_that_does_not_read_its_answers_is_not_read_from():
    """MAX_INFLIGHT requests under way, and no more are taken in until some
    are done: a client flooding the root helper cannot grow it."""
    import threading

    class Blocked:
        def __init__(self):
            self.calls = 0
            self.go = asyncio.Event()

        async def trigger(self, domain, how, client, login=""):
            self.calls += 1
            await self.go.wait()
            return Outcome(RELEASED, 0, "", "", None)

    async def run():
        ours, theirs = socket.socketpair()
        blocked = Blocked()
        gate = Gate(DOMAINS, per_minute=10**9, burst=10**9)
        serving = asyncio.create_task(serve_releases(
            ours, blocked, DOMAINS, Outcome.as_json, gate))
        total = MAX_INFLIGHT + 50
        lines = b"".join(json.dumps({"id": i, "domain": "customer.example", "trigger": "finger",
                                     "client": "192.0.2.1"}).encode() + b"\n"
                         for i in range(total))
        sender = threading.Thread(target=theirs.sendall, args=(lines,))
        sender.start()
        for _ in range(100):
            await asyncio.sleep(0.02)
        assert blocked.calls == MAX_INFLIGHT
        blocked.go.set()           # all done: the rest are taken in, every one answered
        answers = []
        reader = theirs.makefile("rb")
        while len(answers) < total:
            answers.append(json.loads(await asyncio.to_thread(reader.readline)))
        sender.join()
        assert blocked.calls == total and len({a["id"] for a in answers}) == total
        reader.close()
        theirs.close()
        await asyncio.wait_for(serving, 10)
    asyncio.run(run())


def test_a_release_outlives_the_trigger_that_started_it():
    """The trigger that started a release goes (its gateway's connection
    closed): the release runs on, a trigger that joined it gets its
    outcome, and a trigger after that does not start a second one."""
    import threading

    async def run():
        rel = SlowReleaser()
        rel.go = threading.Event()
        first = asyncio.create_task(rel.trigger("customer.example", "finger", "192.0.2.1"))
        await asyncio.sleep(0.1)
        joined = asyncio.create_task(rel.trigger("customer.example", "finger", "192.0.2.2"))
        await asyncio.sleep(0.1)
        first.cancel()
        await asyncio.sleep(0.1)
        later = asyncio.create_task(rel.trigger("customer.example", "finger", "192.0.2.3"))
        await asyncio.sleep(0.1)
        rel.go.set()
        outcome = await asyncio.wait_for(joined, 10)
        assert outcome.kind == RELEASED and outcome.shared
        assert (await asyncio.wait_for(later, 10)).shared
        assert rel.started == 1
    asyncio.run(run())


def test_two_triggers_during_a_ledger_rebuild_start_one_release():
    """While the ledger is rebuilt, the look at it runs in a thread: a
    second trigger that arrives meanwhile joins the first one's release
    instead of starting its own (and losing both one's bookkeeping)."""
    import threading
    import time

    class Rebuilding(HeldMail):
        def needs_rebuild(self):
            return True

        def status_if_empty(self, domain):
            time.sleep(0.2)
            return None

    async def run():
        rel = SlowReleaser()
        rel.heldmail = Rebuilding()
        rel.go = threading.Event()
        rel.go.set()
        outcomes = await asyncio.gather(
            rel.trigger("customer.example", "finger", "192.0.2.1"),
            rel.trigger("customer.example", "finger", "192.0.2.2"))
        assert rel.started == 1
        assert sorted(o.shared for o in outcomes) == [False, True]
        assert rel._inflight == {}
    asyncio.run(run())
