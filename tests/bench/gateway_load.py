"""P5 gateway: finger queries per second from 100 concurrent clients on
loopback, 1,000 triggers for one domain within a second, and the peak
memory of the gateway and the milter under that load.

The load comes from separate processes (asyncio clients, one query per
connection, as the finger client does), so the gateway's own process
has its core to itself as far as the machine allows.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import time

import psutil

from common import Report, build_stack, log, smtp_source
from stack import wait_until

QUERY_DOMAINS = [f"q{i:03d}.test" for i in range(100)]
BURST = "burst.test"


def domains(port: int) -> str:
    return "".join(f'[domains."{d}"]\nrelay = "[127.0.0.1]:{port}"\n'
                   for d in QUERY_DOMAINS + [BURST])


async def _clients(host, port, queries, concurrency, duration, total):
    done = 0
    bad = 0
    deadline = time.monotonic() + duration if duration else None
    sent = 0

    async def one_client(n):
        nonlocal done, bad, sent
        while True:
            if deadline and time.monotonic() > deadline:
                return
            if total is not None:
                if sent >= total:
                    return
                sent += 1
            query = queries[(n + done) % len(queries)]
            try:
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(query.encode() + b"\r\n")
                data = await reader.read()
                writer.close()
                if query.encode() in data:
                    done += 1
                else:
                    bad += 1
            except OSError:
                bad += 1

    await asyncio.gather(*(one_client(n) for n in range(concurrency)))
    return done, bad


def _worker(args, out):
    out.put(asyncio.run(_clients(*args)))


def load(host, port, queries, clients, processes, duration=None, total=None):
    """(answered, failed, seconds) of finger queries from ``processes`` processes."""
    out = multiprocessing.Queue()
    per = clients // processes
    share = None if total is None else total // processes
    procs = [multiprocessing.Process(target=_worker,
                                     args=((host, port, queries, per, duration, share), out))
             for _ in range(processes)]
    start = time.perf_counter()
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    took = time.perf_counter() - start
    for p in procs:
        p.join()
    return sum(r[0] for r in results), sum(r[1] for r in results), took


def peak_rss(pid: int) -> int:
    """VmHWM of a process and its children, bytes."""
    total = 0
    proc = psutil.Process(pid)
    for p in [proc] + proc.children(recursive=True):
        with open(f"/proc/{p.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
    return total


def run(report: Report, quick: bool) -> None:
    stack = build_stack(domains=domains, gateway=True,
                        gateway_extra="rate_burst = 1000000\nrate_per_minute = 100000000\n"
                                      "max_connections = 1024")
    try:
        hp = stack.cfg.finger_listen
        duration = 3 if quick else 10
        log(f"P5: finger load, 100 clients, {duration} s")
        answered, failed, took = load(hp.host, hp.port, QUERY_DOMAINS, 100, 2, duration)
        rate = answered / took
        report.add("P5", f"finger queries/s, 100 clients ({failed} failed)", f"{rate:.0f}/s",
                   "-", "-", ">= 2000/s", rate >= 2000 and failed == 0)

        smtp_source(stack, f"user@{BURST}", 50, 5)
        wait_until(lambda: stack.status(BURST)[0]["messages"] == 50, 60, what="50 held")
        stack.sink.start()
        log("P5: 1000 triggers for one domain")
        answered, failed, took = load(hp.host, hp.port, [BURST], 100, 2, total=1000)
        releases = len(re.findall(rf"domain={re.escape(BURST)} result=released_\d",
                                  stack.gateway_log()))
        report.add("P5", f"1000 triggers for one domain in {took:.2f} s ({failed} failed)",
                   f"{releases} release(s)", "-", "-", "<= 2", releases <= 2 and failed == 0)
        report.add("P5", "peak RSS under load: gateway (both halves) / milter",
                   f"{peak_rss(stack.gateway.pid) / 2**20:.0f} / "
                   f"{peak_rss(stack.milter.pid) / 2**20:.0f} MiB", "-", "-", "-", None)
    finally:
        stack.destroy()
