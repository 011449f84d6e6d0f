"""P8 ten backup MX hosts: one trigger releases a domain on all of them.

Ten hosts on one machine, built as tests/integration/test_cluster.py
builds three: each its own private Postfix, milter, gateway and release
helper on its own loopback address (127.0.0.21-30, the same ports), the
other nine its [cluster] peers, its own smtp-sink the customers' server.
Every customer domain (1,000; 60 quick) is configured on every host and
holds one message on three of them, sent through SMTP so the milter
holds and records it; each domain measured alone holds one on every
host (one is released first, unmeasured: every host's delivery agents
are running).  Deliveries are timed as they land in the sinks; an ETRN
is counted where it is sent (a forward_acked, forward_refused or
forward_retry line with the peer's reply), a release where it happens
(the release helper's event=release line).

1. one finger query at one host: the time to the last delivery on all
   ten, and the ETRNs sent for it (one per peer, none sent back);
2. three hosts down (gateway and Postfix) when a domain is triggered:
   the other seven deliver at once; once the three are back, how long
   until theirs is delivered, with no more tries than the backoff makes;
3. one peer replaced by a tarpit that greets after 10 s: the other eight
   release as fast as with no slow peer, both for the trigger that meets
   it and for one a second later, while the slow session still runs;
4. 500 domains (50 quick) triggered within one second, spread over the
   hosts: every held message delivered, ETRNs <= 9 per domain, and no
   domain released twice on one host.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import smtplib
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from common import Report, build_stack, count_queue, log
from instance import port_free_on
from stack import Ports, wait_until

from flushctl.cluster import BACKOFF_CAP, backoff

ADDRESSES = [f"127.0.0.{n}" for n in range(21, 31)]
WARM, ONE, DOWN, BASE, SLOW, NEXT = (f"p8-{w}.test" for w in
                                    ("warm", "one", "down", "base", "slow", "next"))
EVERYWHERE = [WARM, ONE, DOWN, BASE, SLOW, NEXT]
SENDER = "sender@bench.test"
TARPIT_DELAY = 10.0
SETTLE = 2.0            # seconds left for an echo (an ETRN sent back) to show
GATEWAY = "rate_burst = 100000\nrate_per_minute = 100000000\nmax_connections = 1024"
SENT = re.compile(r"event=forward_\w+ domain=(\S+) peer=\S+ attempts=\d+ (?:next_in=\d+ )?"
                  r"(?:reply|reason)=['\"]\d{3} ")


def holders(i: int) -> list[int]:
    """The three hosts (indexes) that hold customer ``i``'s mail."""
    return sorted({i % 10, (i + 3) % 10, (i + 7) % 10})


def design_attempts(seconds: float) -> int:
    """Tries the forwarder makes to a peer that stays down ``seconds`` (its backoff)."""
    tries, at = 0, 0.0
    while at <= seconds:
        tries += 1
        at += backoff(tries)
    return tries


class Tarpit:
    """A peer that answers slowly: it accepts, greets after ``delay``
    seconds, then says 250 to everything until QUIT."""

    def __init__(self, host: str, port: int, delay: float):
        self.delay = delay
        self.sessions = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = None
        for _ in range(50):   # the Postfix that listened there may still be stopping
            try:
                self.server = asyncio.run_coroutine_threadsafe(
                    asyncio.start_server(self._serve, host, port), self.loop).result(10)
                return
            except OSError:
                time.sleep(0.2)
        self.close()
        raise RuntimeError(f"P8: the tarpit could not listen on {host}:{port}")

    async def _serve(self, reader, writer) -> None:
        self.sessions += 1
        try:
            await asyncio.sleep(self.delay)
            writer.write(b"220 slow.provider.test ESMTP\r\n")
            while line := await reader.readline():
                if line[:4].upper() == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    break
                writer.write(b"250 2.0.0 OK\r\n")
                await writer.drain()
            await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass   # the client went, or the tarpit closes
        finally:
            writer.close()

    def close(self) -> None:
        async def stop():
            if self.server is not None:
                self.server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Cluster:
    """Ten hosts; what each holds and what its sink has received, by domain."""

    def __init__(self, domains: list[str]):
        self.smtp, self.finger_port = port_free_on(ADDRESSES), port_free_on(ADDRESSES)
        config = "".join(f'[domains."{d}"]\nrelay = "[127.0.0.1]:@SINK@"\n' for d in domains)

        def build(address: str):
            peers = [f"{a}:{self.smtp}" for a in ADDRESSES if a != address]
            extra = (f"[cluster]\npeers = {json.dumps(peers)}\n"
                     f"finger_port = {self.finger_port}\n"
                     f'source = "{address}"\nhelo = "mx{address.rsplit(".", 1)[1]}.provider.test"\n')
            return build_stack(domains=lambda port: config.replace("@SINK@", str(port)),
                               gateway=True, gateway_extra=GATEWAY, address=address,
                               smtpd_port=self.smtp, ports=Ports(self.finger_port), extra=extra)
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(build, a) for a in ADDRESSES]
        self.stacks = [f.result() for f in futures if f.exception() is None]
        if len(self.stacks) < len(futures):
            self.destroy()
            raise next(f.exception() for f in futures if f.exception() is not None)
        self.held: dict[str, list[int]] = {}
        self.got: dict[str, list[int]] = {}
        self.last: dict[str, float] = {}       # the domain's latest delivery seen
        self.seen = [set() for _ in self.stacks]

    def destroy(self) -> None:
        for stack in self.stacks:
            try:
                stack.destroy()
            except Exception as exc:   # the others still go
                log(f"P8: destroying {stack.pf.address}: {exc!r}")

    def fill(self, plan: dict[str, list[int]]) -> None:
        """One message for each domain on each of its hosts, through SMTP."""
        for domain, hosts in plan.items():
            self.held[domain] = [int(n in hosts) for n in range(len(self.stacks))]

        def send(n: int) -> None:
            stack = self.stacks[n]
            with smtplib.SMTP(stack.pf.address, stack.pf.smtpd_port, timeout=60) as smtp:
                for domain, hosts in plan.items():
                    if n in hosts:
                        smtp.sendmail(SENDER, [f"user@{domain}"],
                                      f"From: {SENDER}\nTo: user@{domain}\n"
                                      f"Subject: p8 {domain}\n\nheld\n")
        with ThreadPoolExecutor(len(self.stacks)) as pool:
            list(pool.map(send, range(len(self.stacks))))
        for n, stack in enumerate(self.stacks):
            want = sum(h[n] for h in self.held.values())
            wait_until(lambda: count_queue(stack, "hold") >= want, 600, 0.5,
                       what=f"{want} held on {stack.pf.address}")

    def finger(self, n: int, domain: str) -> str:
        """A finger query for ``domain`` at host ``n``; its answer."""
        with socket.create_connection((ADDRESSES[n], self.finger_port), 300) as sock:
            sock.sendall(domain.encode() + b"\r\n")
            return sock.makefile("rb").read().decode()

    def poll(self) -> None:
        now = time.perf_counter()
        for n, stack in enumerate(self.stacks):
            for name in os.listdir(stack.sink.dir):
                if name in self.seen[n]:
                    continue
                text = (stack.sink.dir / name).read_text(errors="replace")
                found = re.search(r"^Subject: p8 (\S+)", text, re.M)
                if found is None:
                    continue   # still being written
                self.seen[n].add(name)
                self.got.setdefault(found[1], [0] * len(self.stacks))[n] += 1
                self.last[found[1]] = now

    def idle(self, until: float) -> None:
        while time.perf_counter() < until:
            self.poll()
            time.sleep(0.02)

    def missing(self, domains, hosts) -> int:
        return sum(max(0, self.held[d][n] - self.got.get(d, [0] * 10)[n])
                   for d in domains for n in hosts)

    def wait(self, domains, hosts, start: float, timeout: float) -> float | None:
        """Seconds from ``start`` to the last delivery of ``domains`` on
        ``hosts``; None if some had not come within ``timeout``."""
        deadline = time.perf_counter() + timeout
        while self.missing(domains, hosts) and time.perf_counter() < deadline:
            self.idle(time.perf_counter() + 0.02)
        self.poll()
        if self.missing(domains, hosts):
            return None
        return max(self.last.get(d, start) for d in domains) - start

    def mark(self) -> list[int]:
        """Where the release helpers' logs end now."""
        return [len(s.daemon_log("helper")) for s in self.stacks]

    def helper_since(self, mark) -> list[str]:
        return [s.daemon_log("helper")[m:] for s, m in zip(self.stacks, mark)]

    def etrns(self, mark, domains) -> int:
        """ETRNs sent by every host since ``mark`` for ``domains``."""
        wanted = set(domains)
        return sum(1 for text in self.helper_since(mark) for m in SENT.finditer(text)
                   if m[1] in wanted)

    def events(self, mark, n: int, pattern: str) -> int:
        return len(re.findall(pattern, self.helper_since(mark)[n]))


def report_delivery(report: Report, what: str, took: float | None, target: str,
                    ok: bool | None, missing: int = 0) -> None:
    """A delivery time; never an ok while some of the mail is missing."""
    ours = f"{took:.2f} s" if took is not None else f"{missing} undelivered"
    report.add("P8", what, ours, "-", "-", target, ok if took is not None else False)


def one_finger(cluster: Cluster, report: Report) -> None:
    log("P8: one finger query at one host, 10 hosts")
    mark = cluster.mark()
    start = time.perf_counter()
    answer = cluster.finger(0, ONE)
    took = cluster.wait([ONE], range(10), start, 120)
    time.sleep(SETTLE)
    etrns = cluster.etrns(mark, [ONE])
    acked = cluster.events(mark, 0, rf"event=forward_acked domain={re.escape(ONE)} ")
    report_delivery(report, "one finger, 10 hosts: trigger to last delivery", took,
                    "all delivered", "Delivery started" in answer,
                    cluster.missing([ONE], range(10)))
    report.add("P8", "one finger, 10 hosts: ETRNs sent (acked)", f"{etrns} ({acked})", "-", "-",
               "9 (9)", etrns == 9 and acked == 9)


def hosts_down(cluster: Cluster, report: Report) -> None:
    log("P8: three hosts down when a domain is triggered")
    down = cluster.stacks[7:]
    mark = cluster.mark()
    try:
        for stack in down:
            stack.stop_gateway()
            stack.pf.postfix("stop")
        start = time.perf_counter()
        cluster.finger(0, DOWN)
        up = cluster.wait([DOWN], range(7), start, 120)
        wait_until(lambda: all(cluster.events(mark, 0, rf"event=forward_retry domain="
                                              rf"{re.escape(DOWN)} peer={re.escape(s.pf.address)}:")
                               >= 2 for s in down), 30, what="the down peers retried")
    finally:   # the gateway first: an ETRN that reaches Postfix finds it there
        for stack in down:
            stack.start_gateway()
            stack.pf.postfix("start", check=False)
    returned = time.perf_counter()
    after = cluster.wait([DOWN], range(7, 10), returned, BACKOFF_CAP + 30)
    time.sleep(SETTLE)
    retries = cluster.events(mark, 0, rf"event=forward_retry domain={re.escape(DOWN)} ")
    allowed = 3 * design_attempts(returned - start + 1.0)
    etrns = cluster.etrns(mark, [DOWN])
    report_delivery(report, "3 of 10 down: trigger to last delivery on the 7 up", up,
                    "all delivered", True, cluster.missing([DOWN], range(7)))
    report_delivery(report, f"3 of 10 down {returned - start:.0f} s: delivered after return",
                    after, f"<= {BACKOFF_CAP + 5:.0f} s", after is not None
                    and after <= BACKOFF_CAP + 5, cluster.missing([DOWN], range(7, 10)))
    report.add("P8", "3 of 10 down: ETRNs sent / tries to the down ones", f"{etrns} / {retries}",
               "-", "-", f"9 / <= {allowed} (backoff)", etrns == 9 and retries <= allowed)


def burst(cluster: Cluster, report: Report, domains: list[str]) -> None:
    log(f"P8: {len(domains)} domains triggered within a second")
    mark = cluster.mark()
    answers: list[str] = []
    sent: list[float] = []

    async def one(i: int, domain: str, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        reader, writer = await asyncio.open_connection(ADDRESSES[i % 10], cluster.finger_port)
        writer.write(domain.encode() + b"\r\n")
        sent.append(time.perf_counter())
        answers.append((await asyncio.wait_for(reader.read(), 300)).decode())
        writer.close()

    async def all_of_them() -> None:
        triggers = asyncio.gather(*(one(i, d, start + 0.9 * i / len(domains))
                                    for i, d in enumerate(domains)))
        while not triggers.done():   # deliveries are timed as they come meanwhile
            cluster.poll()
            await asyncio.sleep(0.02)
        triggers.result()   # a trigger that could not be sent: not measured
    start = time.perf_counter()
    asyncio.run(all_of_them())
    took = cluster.wait(domains, range(10), start, 600)
    time.sleep(SETTLE)
    span = max(sent) - start if sent else float("nan")
    etrns = cluster.etrns(mark, domains)
    releases: dict[tuple[int, str], int] = {}
    for n, text in enumerate(cluster.helper_since(mark)):
        for domain in re.findall(r"event=release domain=(\S+) ", text):
            releases[(n, domain)] = releases.get((n, domain), 0) + 1
    twice = sum(1 for count in releases.values() if count > 1)
    started = sum("Delivery started" in a for a in answers)
    report_delivery(report, f"{len(domains)} triggers in {span:.2f} s, 10 hosts: "
                    "to last delivery", took, "all delivered", len(sent) == len(domains),
                    cluster.missing(domains, range(10)))
    report.add("P8", f"{len(domains)} triggers: ETRNs sent / released twice on a host",
               f"{etrns} / {twice}", "-", "-", f"<= {9 * len(domains)} / 0",
               etrns <= 9 * len(domains) and twice == 0)
    report.add("P8", f"{len(domains)} triggers: answered 'Delivery started'",
               f"{started} of {len(domains)}", "-", "-", "-", None)


def slow_peer(cluster: Cluster, report: Report) -> None:
    log(f"P8: one peer greets after {TARPIT_DELAY:.0f} s")
    eight = range(9)    # the triggered host and the eight peers that answer at once
    start = time.perf_counter()
    cluster.finger(0, BASE)
    base = cluster.wait([BASE], eight, start, 120)
    slow = cluster.stacks[9]
    slow.stop_gateway()
    slow.pf.postfix("stop")
    tarpit = Tarpit(slow.pf.address, cluster.smtp, TARPIT_DELAY)
    try:
        start = time.perf_counter()
        cluster.finger(0, SLOW)
        cluster.idle(start + 1.0)
        later = time.perf_counter()
        cluster.finger(0, NEXT)
        first = cluster.wait([SLOW], eight, start, 120)
        second = cluster.wait([NEXT], eight, later, 120)
    finally:
        tarpit.close()
    limit = max(2 * base, base + 1.0) if base is not None else 0.0
    report_delivery(report, "slow peer: 9 hosts, no slow peer (baseline)", base, "-", None,
                    cluster.missing([BASE], eight))
    report_delivery(report, f"slow peer ({TARPIT_DELAY:.0f} s greeting): trigger to last "
                    "of 9", first, f"<= {limit:.2f} s", first is not None and first <= limit,
                    cluster.missing([SLOW], eight))
    report_delivery(report, f"slow peer: next trigger 1 s later ({tarpit.sessions} slow sessions)",
                    second, f"<= {limit:.2f} s", second is not None and second <= limit,
                    cluster.missing([NEXT], eight))


def run(report: Report, quick: bool) -> None:
    count, triggers = (60, 50) if quick else (1000, 500)
    names = [f"c{i:04d}.test" for i in range(count)]
    log(f"P8: starting 10 hosts, {count + len(EVERYWHERE)} domains each")
    cluster = Cluster(EVERYWHERE + names)
    try:
        started = time.perf_counter()
        plan = {d: holders(i) for i, d in enumerate(names)}
        plan.update({d: list(range(10)) for d in EVERYWHERE})
        cluster.fill(plan)
        log(f"P8: {sum(map(sum, cluster.held.values()))} messages held in "
            f"{time.perf_counter() - started:.0f} s")
        for stack in cluster.stacks:
            stack.sink.start()
        start = time.perf_counter()
        cluster.finger(0, WARM)
        if cluster.wait([WARM], range(10), start, 120) is None:
            raise RuntimeError("P8: the warm-up release was not delivered everywhere")
        one_finger(cluster, report)
        hosts_down(cluster, report)
        burst(cluster, report, names[:triggers])
        slow_peer(cluster, report)
    finally:
        cluster.destroy()
