"""The poller's loop (flushctl.poller.loop): which domains a cycle probes,
what it does with each probe, how often it runs, what it logs.

Probes are real: the real ``Prober`` knocks on real listeners on
127.0.0.1 (next hops written as ``[127.0.0.1]:PORT`` need no DNS; where a
name must be resolved, tests/dnsserver.py answers).  What the poller asks
of the ledger and of Postfix goes through the real ``LocalOps`` to a small
stand-in for ``HeldMail`` (the real one needs a running Postfix); what
that stand-in answers is what the ledger and ``HeldMail.flush`` would.
test_remote_ops.py covers the split between the poller and its helper.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from flushctl import config
from flushctl.heldmail import outcome as outcomes
from flushctl.poller import loop
from flushctl.poller import prober as probing

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dnsserver import DNSServer  # noqa: E402
from greeters import GREETING, greeters  # noqa: E402


# The poller's actions, as its log (action=) and `poller --once --json` say them.
RELEASED, HELD, BUSY, NOTHING = "released", "held", "delivering", "nothing held"
PAUSED, FAILED, BACKING_OFF = "paused", "failed", "backing off"


# -- real servers for the prober to knock on --------------------------------------

@pytest.fixture
def listeners():
    yield from greeters()


@pytest.fixture
def refusing():
    """A port on 127.0.0.1 that refuses connections: bound, never listening."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def dns_server():
    server = DNSServer().start()
    yield server
    server.stop()


# -- the poller's side: config, prober, and a stand-in for HeldMail -----------------

def make_config(domains: dict[str, str], interval: int = 60, concurrency: int = 100,
                hosts: dict[str, dict[str, str]] | None = None) -> config.Config:
    """``domains``: name -> relay; ``hosts``: name -> {host: next hop}."""
    text = f"[poller]\ninterval = {interval}\nconcurrency = {concurrency}\n"
    for name, relay in domains.items():
        text += f'[domains."{name}"]\nrelay = "{relay}"\n'
        if hosts and name in hosts:
            pairs = ", ".join(f'"{h}" = "{r}"' for h, r in hosts[name].items())
            text += f"hosts = {{{pairs}}}\n"
    return config.parse(text, "t.toml")


def make_prober(dns: DNSServer, timeout: float = 2.0) -> probing.Prober:
    return probing.Prober(timeout, nameservers=(config.HostPort(dns.host, dns.port),))


def released(count: int):
    """``HeldMail.flush``'s answer when it released ``count`` messages."""
    def answer(name, probed):
        probe = next(r for r in probed.values() if r.reachable)
        return outcomes.Outcome(outcomes.RELEASED, count, probe.target)
    return answer


def answers(outcome: outcomes.Outcome):
    """``HeldMail.flush``'s answer: always ``outcome``."""
    return lambda name, probed: outcome


class HeldMailStandIn:
    """What ``LocalOps`` asks of ``HeldMail``, without a Postfix: the
    ledger's candidates, the probes recorded, and a flush that answers as
    the test says (an ``Outcome``, as HeldMail's does, or an exception)."""

    def __init__(self, cfg, candidates=None, waiting=None, flush=released(1),
                 in_flight=(), on_candidates=None):
        self.config = cfg
        self.candidates, self.waiting = dict(candidates or {}), dict(waiting or {})
        self.answer = flush
        self.busy = set(in_flight)
        self.on_candidates = on_candidates
        self.asked: list[float] = []
        self.recorded: list[tuple[str, probing.ProbeResult]] = []
        self.flushes: list[tuple] = []

    def poller_candidates(self):
        self.asked.append(time.monotonic())
        if self.on_candidates:
            self.on_candidates(len(self.asked))
        return ({d: list(r) for d, r in self.candidates.items()}, dict(self.waiting))

    def record_probe(self, name, result):
        self.recorded.append((name, result))

    def in_flight(self, name):
        return name in self.busy

    def flush(self, name, trigger="admin", client=None, probed=None, probed_only=False):
        self.flushes.append((name, trigger, dict(probed or {}), probed_only))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer(name, dict(probed or {}))


def make_poller(cfg, held: HeldMailStandIn, prober, postfix_prober=None) -> loop.Poller:
    return loop.Poller(cfg, loop.LocalOps(held), prober, postfix_prober)


def cycle(poller: loop.Poller) -> list[loop.CycleEntry]:
    return asyncio.run(poller.cycle())


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "flushctl.poller"]


@pytest.fixture(autouse=True)
def poller_logs(caplog):
    caplog.set_level(logging.INFO, logger="flushctl.poller")


# -- one cycle: what it probes ----------------------------------------------------

def test_a_cycle_probes_the_candidates_and_no_other_domain(dns_server, listeners, refusing):
    up, idle = listeners(), listeners()
    cfg = make_config({"a.test": f"[127.0.0.1]:{up.port}",
                       "b.test": f"[127.0.0.1]:{refusing}",
                       "idle.test": f"[127.0.0.1]:{idle.port}"})
    held = HeldMailStandIn(cfg, candidates={"b.test": ["b.test"], "a.test": ["a.test"]})
    entries = cycle(make_poller(cfg, held, make_prober(dns_server)))
    assert [(e.domain, e.action) for e in entries] == [("a.test", RELEASED),
                                                       ("b.test", HELD)]
    assert up.connections == 1      # one knock per route per cycle
    assert idle.connections == 0    # holds nothing the poller may send: never probed
    assert sorted(name for name, _ in held.recorded) == ["a.test", "b.test"]


def test_domains_backing_off_are_listed_first_and_not_probed(dns_server, listeners):
    up, waiting = listeners(), listeners()
    cfg = make_config({"a.test": f"[127.0.0.1]:{up.port}",
                       "y.test": f"[127.0.0.1]:{waiting.port}",
                       "x.test": f"[127.0.0.1]:{waiting.port}"})
    until = time.time() + 600
    held = HeldMailStandIn(cfg, candidates={"a.test": ["a.test"]},
                           waiting={"y.test": until, "x.test": until + 60})
    entries = cycle(make_poller(cfg, held, make_prober(dns_server)))
    assert [(e.domain, e.action) for e in entries] == [
        ("x.test", BACKING_OFF), ("y.test", BACKING_OFF), ("a.test", RELEASED)]
    x = entries[0]
    assert x.probe.outcome == probing.NOT_PROBED and not x.probe.reachable
    assert x.probe.detail == "backing off until " + time.strftime(
        "%H:%M:%S", time.localtime(until + 60))
    assert x.released == 0
    assert waiting.connections == 0
    assert [name for name, _ in held.recorded] == ["a.test"]
    assert [f[0] for f in held.flushes] == ["a.test"]


def test_a_domain_only_the_helper_knows_waits_for_our_restart(dns_server, listeners, caplog):
    """The release helper's config may be newer than the poller's: a
    domain the poller does not know is skipped (named, up to 20), the
    others are probed as usual."""
    up = listeners()
    cfg = make_config({"a.test": f"[127.0.0.1]:{up.port}"})
    unknown = [f"new{i:02d}.test" for i in range(25)]
    held = HeldMailStandIn(cfg, candidates={"a.test": ["a.test"],
                                            **{d: [d] for d in unknown}})
    entries = cycle(make_poller(cfg, held, make_prober(dns_server)))
    assert [e.domain for e in entries] == ["a.test"]
    assert [name for name, _ in held.recorded] == ["a.test"]
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage() == ("event=skipped reason=not_in_our_config domains="
                                    + ",".join(unknown[:20]))


# -- one cycle: what it does with a probe ---------------------------------------------

@pytest.mark.parametrize("server, outcome, detail", [
    ("refusing", probing.REFUSED, "connection refused"),
    ("rude", probing.BAD_GREETING, "554 5.7.1 not now"),
    ("silent", probing.TIMEOUT, "no greeting within 0.5s"),
])
def test_a_domain_whose_server_does_not_answer_keeps_its_mail(
        dns_server, listeners, refusing, caplog, server, outcome, detail):
    port = {"refusing": lambda: refusing,
            "rude": lambda: listeners(greeting=b"554 5.7.1 not now\r\n").port,
            "silent": lambda: listeners(greeting=None).port}[server]()
    cfg = make_config({"a.test": f"[127.0.0.1]:{port}"})
    held = HeldMailStandIn(cfg, candidates={"a.test": ["a.test"]})
    [entry] = cycle(make_poller(cfg, held, make_prober(dns_server, timeout=0.5)))
    assert (entry.domain, entry.action, entry.released) == ("a.test", HELD, 0)
    assert (entry.probe.outcome, entry.probe.target, entry.probe.detail) == \
        (outcome, f"127.0.0.1:{port}", detail)
    assert held.recorded == [("a.test", entry.probe)]   # status shows why
    assert held.flushes == []                           # no release is even asked for
    assert f"event=probe domain=a.test result={outcome.replace(' ', '_')} " \
           f"target=127.0.0.1:{port} detail={detail!r}" in messages(caplog)


def test_a_domain_whose_server_answers_is_released_by_the_poller(dns_server, listeners,
                                                                 caplog):
    up = listeners()
    cfg = make_config({"a.test": f"[127.0.0.1]:{up.port}"})
    held = HeldMailStandIn(cfg, candidates={"a.test": ["a.test"]}, flush=released(3))
    [entry] = cycle(make_poller(cfg, held, make_prober(dns_server)))
    probe = entry.probe
    assert (probe.outcome, probe.target, probe.detail) == \
        (probing.REACHABLE, f"127.0.0.1:{up.port}", GREETING.decode().strip())
    assert (entry.action, entry.released) == (RELEASED, 3)
    # the release is the poller's, with its own probes: the helper probes nothing
    assert held.flushes == [("a.test", "poller", {"a.test": probe}, True)]
    assert held.recorded == [("a.test", probe)]
    assert f"event=probe domain=a.test result=reachable target=127.0.0.1:{up.port} " \
           "action=released released=3" in messages(caplog)


def test_every_route_is_probed_and_the_row_shows_the_domains_own(dns_server, listeners,
                                                                 refusing):
    """A domain whose relay is down but one of whose hosts answers: its
    mail for that host is released (with every route's probe), while the
    domain's row shows the probe of its own route."""
    pc1 = listeners()
    cfg = make_config({"a.test": f"[127.0.0.1]:{refusing}"},
                      hosts={"a.test": {"pc1.a.test": f"[127.0.0.1]:{pc1.port}"}})
    held = HeldMailStandIn(cfg, candidates={"a.test": ["a.test", "pc1.a.test"]})
    [entry] = cycle(make_poller(cfg, held, make_prober(dns_server)))
    [(name, trigger, probed, only)] = held.flushes
    assert (name, trigger, only) == ("a.test", "poller", True)
    assert {r: p.outcome for r, p in probed.items()} == \
        {"a.test": probing.REFUSED, "pc1.a.test": probing.REACHABLE}
    assert held.recorded == [("a.test", probed["a.test"])]
    assert entry.probe == probed["pc1.a.test"] and entry.action == RELEASED


def test_without_mail_for_its_own_route_the_row_shows_its_first_routes(dns_server, refusing):
    cfg = make_config({"a.test": f"[127.0.0.1]:{refusing}"},
                      hosts={"a.test": {"pc1.a.test": f"[127.0.0.1]:{refusing}",
                                        "pc2.a.test": "[127.0.0.1]:9"}})
    held = HeldMailStandIn(cfg, candidates={"a.test": ["pc1.a.test", "pc2.a.test"]})
    [entry] = cycle(make_poller(cfg, held, make_prober(dns_server)))
    [(name, shown)] = held.recorded
    assert name == "a.test" and shown.target == f"127.0.0.1:{refusing}"
    assert entry.probe == shown and entry.action == HELD


@pytest.mark.parametrize("postfix_view, outcome, action", [
    ("resolves it too", probing.REACHABLE, RELEASED),
    ("cannot resolve it", probing.UNROUTABLE, HELD),
])
def test_a_server_only_our_nameservers_find_stays_held(dns_server, listeners, caplog,
                                                       postfix_view, outcome, action):
    """The server answers, but Postfix's smtp client resolves with the
    system's nameservers: if those cannot find it, a release would only
    defer the mail, so it stays held and says why."""
    up = listeners()
    dns_server.records[("mail.a.test", "A")] = ["127.0.0.1"]
    cfg = make_config({"a.test": f"[mail.a.test]:{up.port}"})
    others = DNSServer().start()
    try:
        postfix_dns = dns_server if postfix_view == "resolves it too" else others
        held = HeldMailStandIn(cfg, candidates={"a.test": ["a.test"]})
        [entry] = cycle(make_poller(cfg, held, make_prober(dns_server),
                                    make_prober(postfix_dns)))
    finally:
        others.stop()
    assert up.connections == 1
    assert (entry.probe.outcome, entry.action) == (outcome, action)
    assert held.recorded == [("a.test", entry.probe)]
    if action == HELD:
        assert held.flushes == []
        assert "Postfix cannot route a.test: mail.a.test: no such domain" in entry.probe.detail
        assert any(m.startswith("event=probe domain=a.test result=unroutable ")
                   for m in messages(caplog))
    else:
        assert [f[0] for f in held.flushes] == ["a.test"]


def test_at_most_concurrency_domains_are_probed_at_once(dns_server, listeners):
    slow = listeners(delay=0.3)
    names = [f"d{i}.test" for i in range(6)]
    cfg = make_config({d: f"[127.0.0.1]:{slow.port}" for d in names}, concurrency=2)
    held = HeldMailStandIn(cfg, candidates={d: [d] for d in names})
    started = time.monotonic()
    entries = cycle(make_poller(cfg, held, make_prober(dns_server)))
    assert [e.action for e in entries] == [RELEASED] * 6
    assert slow.connections == 6
    assert slow.most_waiting == 2
    assert time.monotonic() - started >= 3 * 0.3   # three rounds of two


def test_concurrency_counts_probes_not_domains(dns_server, listeners):
    slow = listeners(delay=0.3)
    cfg = make_config({"a.test": f"[127.0.0.1]:{slow.port}"}, concurrency=1,
                      hosts={"a.test": {"pc1.a.test": f"[127.0.0.1]:{slow.port}",
                                        "pc2.a.test": f"[127.0.0.1]:{slow.port}"}})
    held = HeldMailStandIn(cfg, candidates={"a.test": ["a.test", "pc1.a.test", "pc2.a.test"]})
    cycle(make_poller(cfg, held, make_prober(dns_server)))
    assert slow.connections == 3
    assert slow.most_waiting == 1


# -- what a release's answer becomes ---------------------------------------------------

REACHABLE = probing.ProbeResult(probing.REACHABLE, "127.0.0.1:2525", "220 hi", 1.0)
O = outcomes


@pytest.mark.parametrize("answer, busy, expected", [
    pytest.param(released(2), False, (RELEASED, 2), id="released"),
    pytest.param(answers(O.Outcome(O.NOTHING, on_the_way=3)), False, (NOTHING, 0),
                 id="nothing left to release"),
    pytest.param(released(2), True, (BUSY, 0), id="an earlier release still delivers"),
    pytest.param(answers(O.Outcome(O.RELEASED, 0, "127.0.0.1:2525", shared=True)), False,
                 (BUSY, 0), id="a release that began moments ago answers for it"),
    pytest.param(answers(O.Outcome(O.BACKING_OFF, detail="a.test: backing off")), False,
                 (BACKING_OFF, 0), id="backing off"),
    pytest.param(answers(O.Outcome(O.PAUSED, detail="a.test: paused")), False, (PAUSED, 0),
                 id="paused"),
    pytest.param(answers(O.Outcome(O.UNREACHABLE, detail="a.test: not reachable")), False,
                 (HELD, 0), id="unreachable after all"),
    pytest.param(answers(O.Outcome(O.NOWHERE, detail="a.test: nowhere")), False, (HELD, 0),
                 id="nowhere to deliver"),
    pytest.param(OSError("database or disk is full"), False, (FAILED, 0), id="failed"),
])
def test_what_a_release_answers_becomes_the_action(answer, busy, expected):
    cfg = make_config({"a.test": "[127.0.0.1]:2525"})
    held = HeldMailStandIn(cfg, flush=answer, in_flight={"a.test"} if busy else ())
    assert loop.LocalOps(held).release("a.test", {"a.test": REACHABLE}) == expected
    if busy:
        assert held.flushes == []    # never a second release over a running one
    else:
        assert held.flushes == [("a.test", "poller", {"a.test": REACHABLE}, True)]


def test_a_release_that_fails_is_logged_with_its_traceback(caplog):
    cfg = make_config({"a.test": "[127.0.0.1]:2525"})
    held = HeldMailStandIn(cfg, flush=OSError("database or disk is full"))
    assert loop.LocalOps(held).release("a.test", {"a.test": REACHABLE}) == (FAILED, 0)
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage() == "event=error stage=release domain=a.test"
    assert record.exc_info and "database or disk is full" in str(record.exc_info[1])


def test_a_cycle_entry_as_poller_once_json_prints_it():
    entry = loop.CycleEntry("a.test", REACHABLE, RELEASED, 2)
    assert entry.as_json() == {"domain": "a.test", "reachable": True, "outcome": "reachable",
                               "target": "127.0.0.1:2525", "detail": "220 hi",
                               "action": "released", "released": 2}


# -- the loop: interval, stop, errors, logs ----------------------------------------------

def run_until(poller: loop.Poller, held: HeldMailStandIn, cycles: int, timeout: float = 20):
    """Run ``poller.run`` until the ``cycles``-th cycle has asked for its
    candidates (that cycle still runs to its end); the seconds it took."""
    async def main():
        stop = asyncio.Event()
        running = asyncio.get_running_loop()

        def seen(n):
            if n >= cycles:
                running.call_soon_threadsafe(stop.set)
        held.on_candidates = seen
        started = time.monotonic()
        await asyncio.wait_for(poller.run(stop), timeout)
        return time.monotonic() - started
    return asyncio.run(main())


def test_the_loop_logs_its_start_each_cycle_and_one_stop(dns_server, listeners, refusing,
                                                        caplog):
    up = listeners()
    cfg = make_config({"a.test": f"[127.0.0.1]:{up.port}",
                       "b.test": f"[127.0.0.1]:{refusing}"}, interval=1, concurrency=7)
    held = HeldMailStandIn(cfg, candidates={"a.test": ["a.test"], "b.test": ["b.test"]},
                           waiting={"c.test": time.time() + 600})
    run_until(make_poller(cfg, held, make_prober(dns_server)), held, cycles=2)
    logged = messages(caplog)
    assert logged[0] == "event=start interval=1 concurrency=7"
    cycles = [m for m in logged if m.startswith("event=cycle ")]
    assert len(cycles) == 2
    for line in cycles:   # three entries (one backing off), one of them released
        assert re.fullmatch(r"event=cycle domains=3 released=1 seconds=\d+\.\d\d", line), line
    assert logged[-1] == "event=stop" and logged.count("event=stop") == 1


def test_cycles_start_an_interval_apart_however_long_each_takes(dns_server, listeners):
    """The wait is what is left of the interval: a cycle of 0.6 s is
    followed 1 s after it started, not 1.6 s."""
    slow = listeners(delay=0.6)
    cfg = make_config({"a.test": f"[127.0.0.1]:{slow.port}"}, interval=1)
    held = HeldMailStandIn(cfg, candidates={"a.test": ["a.test"]})
    run_until(make_poller(cfg, held, make_prober(dns_server)), held, cycles=3)
    gaps = [b - a for a, b in zip(held.asked, held.asked[1:])]
    assert len(gaps) == 2
    assert all(0.95 <= gap < 1.45 for gap in gaps), gaps


def test_a_cycle_longer_than_the_interval_is_followed_at_once(dns_server, listeners):
    slow = listeners(delay=1.3)
    cfg = make_config({"a.test": f"[127.0.0.1]:{slow.port}"}, interval=1)
    held = HeldMailStandIn(cfg, candidates={"a.test": ["a.test"]})
    run_until(make_poller(cfg, held, make_prober(dns_server, timeout=3)), held, cycles=2)
    [gap] = [b - a for a, b in zip(held.asked, held.asked[1:])]
    assert 1.3 <= gap < 2.0, gap   # not 1.3 s and then a whole interval


def test_a_stop_during_the_wait_ends_the_loop_at_once(dns_server, listeners, caplog):
    up = listeners()
    cfg = make_config({"a.test": f"[127.0.0.1]:{up.port}"}, interval=60)
    held = HeldMailStandIn(cfg, candidates={"a.test": ["a.test"]})
    took = run_until(make_poller(cfg, held, make_prober(dns_server)), held, cycles=1)
    assert took < 5
    assert len(held.asked) == 1 and len(held.flushes) == 1   # the cycle ran to its end
    assert messages(caplog).count("event=stop") == 1


def test_a_failing_cycle_is_logged_and_the_next_one_runs(dns_server, listeners, caplog):
    up = listeners()
    cfg = make_config({"a.test": f"[127.0.0.1]:{up.port}"}, interval=1)

    def first_fails(n):
        if n == 1:
            raise OSError("database is locked")
    held = HeldMailStandIn(cfg, candidates={"a.test": ["a.test"]})
    poller = make_poller(cfg, held, make_prober(dns_server))

    async def main():
        stop = asyncio.Event()
        running = asyncio.get_running_loop()

        def seen(n):
            first_fails(n)
            if n >= 2:
                running.call_soon_threadsafe(stop.set)
        held.on_candidates = seen
        await asyncio.wait_for(poller.run(stop), 20)
    asyncio.run(main())
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert error.getMessage() == "event=error stage=cycle"
    assert "database is locked" in str(error.exc_info[1])
    logged = messages(caplog)
    assert len([m for m in logged if m.startswith("event=cycle domains=1 released=1 ")]) == 1
    assert logged[-1] == "event=stop"
    assert [f[0] for f in held.flushes] == ["a.test"]


# -- how the daemon's loop ends --------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_poller_as_asked(dns_server, listeners, caplog, sig):
    up = listeners()
    cfg = make_config({"a.test": f"[127.0.0.1]:{up.port}"}, interval=60)
    problems = []

    def signal_us(n):
        if n > 1:
            return
        if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
            problems.append("no handler for the signal: it would end this test run")
            return
        os.kill(os.getpid(), sig)
    held = HeldMailStandIn(cfg, candidates={"a.test": ["a.test"]}, on_candidates=signal_us)
    poller = make_poller(cfg, held, make_prober(dns_server))
    # should the signal not stop it, the poller's "helper gone" watch does, unasked
    asked = asyncio.run(asyncio.wait_for(loop._loop(poller, gone=lambda: bool(problems)), 20))
    assert problems == []
    assert asked is True
    assert len(held.asked) == 1 and [f[0] for f in held.flushes] == ["a.test"]
    assert messages(caplog).count("event=stop") == 1


def test_the_poller_ends_unasked_when_its_helper_is_gone(dns_server, listeners, caplog):
    up = listeners()
    cfg = make_config({"a.test": f"[127.0.0.1]:{up.port}"}, interval=60)
    held = HeldMailStandIn(cfg, candidates={"a.test": ["a.test"]})
    poller = make_poller(cfg, held, make_prober(dns_server))
    started = time.monotonic()
    asked = asyncio.run(asyncio.wait_for(loop._loop(poller, gone=lambda: bool(held.asked)), 20))
    assert asked is False          # run_forever then exits with an error: restart us
    assert time.monotonic() - started < 5
    assert messages(caplog).count("event=stop") == 1
