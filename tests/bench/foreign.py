"""P9 held mail that is not ours: a domain's status and release with 10,000
foreign held messages beside its 100, against an empty hold queue.

Foreign: held by somebody else (here a filter's quarantine: the admin's
header_checks HOLD), for a destination that is not a customer of ours. Before
issue 14 every pass of the adoption read each of them with `postcat`,
every minute, and a renewal could wait a minute for another process.
Each round holds 100 fresh messages for the domain (the milter), lets
them grow older than half the lifetime (2 s here, so that every release
renews every message: the path that lists and reads the hold queue),
then releases them in-process (`HeldMail.flush`) and times it to the last
delivery into smtp-sink; status is timed in-process too. Also the
keeper's pass (`take_in`) with the foreign mail: its first pass reads
each message once, the next ones read none.
"""

from __future__ import annotations

import os
import time

from common import Report, build_stack, count_queue, log, median, smtp_source
from stack import wait_until

DOMAIN = "customer.test"
FOREIGN = "elsewhere.test"
HELD = 100


def run(report: Report, quick: bool) -> None:
    from instance import free_port
    foreign = 2_000 if quick else 10_000
    rounds = 3
    closed = free_port()
    quarantine = None

    def prepare(pf):
        # a filter's quarantine (the admin's header_checks): held at intake
        nonlocal quarantine
        quarantine = pf.root / "quarantine"
        quarantine.write_text(f"/^To: .*@{FOREIGN.replace('.', '[.]')}/ HOLD quarantined\n")
    main = {"maximal_queue_lifetime": "2s", "bounce_queue_lifetime": "2s",
            "relay_domains": FOREIGN,
            "transport_maps": f"inline:{{{FOREIGN}=smtp:[127.0.0.1]:{closed}}}"}
    stack = build_stack(extra_main=main, prepare=prepare,
                        domains=lambda port: f'[domains."{DOMAIN}"]\n'
                                             f'relay = "[127.0.0.1]:{port}"\n',
                        start_sink=True)
    try:
        from flushctl import config as config_mod
        from flushctl.heldmail.library import HeldMail
        cfg = config_mod.load(str(stack.config_path))
        od = HeldMail(cfg)

        def delivered() -> int:
            return len(os.listdir(stack.sink.dir))

        def release_round() -> tuple[float, float]:
            before = delivered()
            smtp_source(stack, f"user@{DOMAIN}", HELD, 4)
            wait_until(lambda: od.status(DOMAIN).messages == HELD, 60, 0.05,
                       what=f"{HELD} held")
            time.sleep(1.5)                     # older than half the lifetime: renewed
            start = time.perf_counter()
            status = od.status(DOMAIN)
            status_took = time.perf_counter() - start
            assert status.messages == HELD, status
            start = time.perf_counter()
            result = od.flush(DOMAIN)
            assert result.released == HELD, result
            wait_until(lambda: delivered() >= before + HELD, 120, 0.02,
                       what=f"{HELD} delivered")
            return time.perf_counter() - start, status_took

        def measure() -> tuple[float, float]:
            runs = [release_round() for _ in range(rounds)]
            return median([r for r, _ in runs]), median([s for _, s in runs])

        log(f"P9: {rounds} releases of {HELD} renewed messages, hold queue otherwise empty")
        empty_release, empty_status = measure()
        log(f"P9: holding {foreign} messages that are not ours")
        pf = stack.pf
        pf.postconf("-e", f"header_checks = {pf.postconf('-h', 'header_checks').strip()}, "
                          f"regexp:{quarantine}")
        pf.postfix("reload")
        held_before = count_queue(stack, "hold")
        smtp_source(stack, f"x@{FOREIGN}", foreign, 20)
        wait_until(lambda: count_queue(stack, "hold") >= held_before + foreign, 600, 0.5,
                   what=f"{foreign} quarantined")
        keeper = HeldMail(cfg)
        start = time.perf_counter()
        keeper.take_in()
        first_pass = time.perf_counter() - start
        start = time.perf_counter()
        keeper.take_in()
        next_pass = time.perf_counter() - start
        log(f"P9: {rounds} releases of {HELD} renewed messages beside {foreign} foreign held")
        full_release, full_status = measure()
        ratio = full_release / empty_release
        report.add("P9", f"release {HELD} renewed, beside {foreign} foreign held",
                   f"{full_release:.2f} s", f"{empty_release:.2f} s (none)", f"{ratio:.2f}",
                   "<= 1.25x", ratio <= 1.25)
        status_ratio = full_status / empty_status
        report.add("P9", f"status in-process, beside {foreign} foreign held",
                   f"{full_status * 1000:.1f} ms", f"{empty_status * 1000:.1f} ms (none)",
                   f"{status_ratio:.2f}", "<= 1.25x", status_ratio <= 1.25)
        report.add("P9", f"keeper pass, {foreign} foreign held: first / next",
                   f"{first_pass:.2f} s / {next_pass * 1000:.0f} ms", "-", "-",
                   "next < 0.5 s", next_pass < 0.5)
    finally:
        stack.destroy()
