"""P2 release: 1,000 held messages for one domain, among thousands held for
500 other domains; from the trigger to the last delivery into smtp-sink.

Postfix alone: the stock on-demand recipe on the same instance, a domain
whose mail waits in the deferred queue (defer_transports) and a site
flush, `postqueue -s DOMAIN`, the way ETRN releases it. Ours: the same
number of messages held by the milter, released by a finger query to
the gateway. Both go to the same smtp-sink through the same transport.
Rounds alternate; the figure is the median.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time

from common import Report, alternate, build_stack, count_queue, fill, log, median, smtp_source
from stack import wait_until

OURS = "customer.test"
PLAIN = "plain.test"
FILLERS = [f"f{i:03d}.test" for i in range(500)]
BATCH = 1000


def domains(port: int) -> str:
    return "".join(f'[domains."{d}"]\nrelay = "[127.0.0.1]:{port}"\n'
                   for d in [OURS] + FILLERS)


def delivered(stack) -> int:
    return len(os.listdir(stack.sink.dir))


_FINGER: dict = {}


def finger(stack, query: str) -> str:
    # where the gateway listens, read once: loading the config is no part
    # of a release (at 100,000 domains it takes seconds)
    hp = _FINGER.get(stack.config_path) or _FINGER.setdefault(stack.config_path,
                                                              stack.cfg.finger_listen)
    with socket.create_connection((hp.host, hp.port), 30) as sock:
        sock.sendall(query.encode() + b"\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return data.decode()


def add_plain(stack) -> None:
    """The stock recipe beside ours on the same instance: PLAIN relayed
    through the on-demand transport, its mail deferred until a site flush."""
    pf = stack.pf
    transport = f"inline:{{{PLAIN}=ondemand:[127.0.0.1]:{stack.sink.port}}}"
    for name, extra in (("relay_domains", PLAIN), ("fast_flush_domains", PLAIN),
                        ("transport_maps", transport)):
        pf.postconf("-e", f"{name}={pf.postconf('-h', name).strip()}, {extra}")
    pf.postfix("reload")


def compare(stack, batch: int, rounds: int) -> tuple[list[float], list[float]]:
    """Rounds of ``batch`` messages released by a finger query (ours) and
    by `postqueue -s` (Postfix alone); the seconds to the last delivery."""
    pf = stack.pf

    def load():
        # A release ends with a queue manager flush request, which
        # lets the next incoming scan ignore defer_transports: mail
        # for the plain domain arriving then would go out at once.
        # An empty incoming scan uses that up first.
        # (postkick may see qmgr close first: SIGPIPE ignored, as flushctl does)
        subprocess.run(["postkick", "-c", str(pf.config_directory), "public", "qmgr",
                        "I"], restore_signals=False, capture_output=True)
        time.sleep(1)
        smtp_source(stack, f"user@{PLAIN}", batch, 20)
        smtp_source(stack, f"user@{OURS}", batch, 20)
        try:
            wait_until(lambda: count_queue(stack, "deferred") >= batch
                       and count_queue(stack, "incoming", "active") == 0, 120,
                       what="the plain domain's mail deferred")
        except AssertionError:
            counts = {q: count_queue(stack, q)
                      for q in ("incoming", "active", "deferred", "hold")}
            raise AssertionError(f"{batch} not deferred: {counts}") from None

    def timed(trigger):
        start_count = delivered(stack)
        start = time.perf_counter()
        trigger()
        wait_until(lambda: delivered(stack) >= start_count + batch, 600, 0.02,
                   what=f"{batch} deliveries")
        return time.perf_counter() - start

    def baseline():   # loads both domains' batches: it runs first in each round
        load()
        return timed(lambda: pf.run("postqueue", "-c", str(pf.config_directory), "-s", PLAIN))

    return alternate(rounds, lambda: timed(lambda: finger(stack, OURS)), baseline)


GATEWAY_EXTRA = "release_window = 0.1\nrate_burst = 100000\nrate_per_minute = 1000000"


def run(report: Report, quick: bool) -> None:
    backgrounds = (1_000, 5_000) if quick else (5_000, 50_000)
    batch = 200 if quick else BATCH
    rounds = 3
    stack = build_stack(domains=domains, gateway=True, gateway_extra=GATEWAY_EXTRA)
    try:
        add_plain(stack)
        stack.sink.start()
        figures = {}
        for background in backgrounds:
            have = count_queue(stack, "hold")
            if background > have:
                log(f"P2: holding about {background} messages for {len(FILLERS)} domains")
                fill(stack, FILLERS, -(-(background - have) // len(FILLERS)))
            log(f"P2: {rounds} rounds of {batch} messages, {count_queue(stack, 'hold')} held")
            a, b = compare(stack, batch, rounds)
            ratio = median(a) / median(b)
            figures[background] = median(a)
            report.add("P2", f"release {batch} of {count_queue(stack, 'hold') + batch} held",
                       f"{median(a):.2f} s", f"{median(b):.2f} s", f"{ratio:.2f}", "<= 1.2",
                       ratio <= 1.2)
        flat = figures[backgrounds[-1]] / figures[backgrounds[0]]
        report.add("P2", f"release flat: {backgrounds[-1]} vs {backgrounds[0]} held",
                   f"{flat:.2f}x", "-", "-", "<= 1.25x", flat <= 1.25)
    finally:
        stack.destroy()
