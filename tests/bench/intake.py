"""P1 intake: smtp-source into a private instance, with our milter and without.

One instance, one customer domain, three ways in turn, round by round:
- Postfix alone: the same instance without smtpd_milters; mail for the
  domain waits in the deferred queue (defer_transports), the stock
  on-demand recipe;
- a do-nothing milter (nullmilter.c, libmilter in C, the same protocol
  steps as ours): what any milter costs Postfix on this machine, the
  floor no milter can go below;
- ours: the milter tags, records and holds every message.
(Against an access rule that HOLDs the domain's mail instead, Postfix
alone is faster still, and the do-nothing milter reaches only about
0.66 of it; docs/benchmarks.md has the figures.)
Each ratio is the median of round-by-round ratios against Postfix alone.
"""

from __future__ import annotations

import os
import subprocess
import time

from common import (Report, build_stack, compile_c, count_queue, log, median, paired_ratio,
                    rotate, smtp_source)

DOMAIN = "customer.test"


def run(report: Report, quick: bool) -> None:
    stack = build_stack(domains=lambda port: f'[domains."{DOMAIN}"]\nrelay = "[127.0.0.1]:{port}"\n')
    null_socket = stack.pf.root / "nullmilter.sock"
    null = subprocess.Popen([compile_c("nullmilter.c", "-lmilter", "-lpthread"),
                             str(null_socket)])
    try:
        ours_spec = stack.pf.postconf("-h", "smtpd_milters").strip()
        specs = {"alone": "", "null": f"unix:{null_socket}", "ours": ours_spec}

        def use(which: str) -> None:
            stack.pf.postconf("-e", f"smtpd_milters={specs[which]}")
            stack.pf.postfix("reload")
            time.sleep(1.0)  # old smtpd processes finish; new ones read the change

        rounds = 3 if quick else 7
        for sessions, messages, target in ((20, 400 if quick else 1000, 0.95),
                                           (1, 50 if quick else 150, 0.90)):
            def intake(which):
                def measure():
                    use(which)
                    held = count_queue(stack, "hold")
                    rate = messages / smtp_source(stack, f"user@{DOMAIN}", messages, sessions)
                    got = count_queue(stack, "hold") - held
                    if got != (messages if which == "ours" else 0):
                        raise RuntimeError(f"P1: {which}: {got} of {messages} held")
                    return rate
                return measure

            log(f"P1: {sessions} session(s), {messages} messages, {rounds} rounds")
            runs = rotate(rounds, {w: intake(w) for w in specs})
            ours = paired_ratio(runs["ours"], runs["alone"])
            floor = paired_ratio(runs["null"], runs["alone"])
            what = f"intake, {sessions} session(s) x {messages} msgs"
            report.add("P1", what + ", do-nothing C milter", f"{median(runs['null']):.0f} msg/s",
                       f"{median(runs['alone']):.0f} msg/s", f"{floor:.2f}", "(any milter)",
                       None)
            report.add("P1", what, f"{median(runs['ours']):.0f} msg/s",
                       f"{median(runs['alone']):.0f} msg/s", f"{ours:.2f}", f">= {target}",
                       ours >= target)
    finally:
        null.terminate()
        null.wait()
        stack.destroy()
        if os.path.exists(null_socket):
            os.unlink(null_socket)
