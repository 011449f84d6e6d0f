"""P1 intake: smtp-source into a private instance, with our milter and without.

One instance, one customer domain. Postfix alone: the same instance with
smtpd_milters emptied, where mail for the domain waits in the deferred
queue (defer_transports), as a plain on-demand backup MX keeps it. Ours:
the milter tags, records and holds every message. Alternating runs; the
ratio is of median throughputs.
"""

from __future__ import annotations

import time

from common import Report, alternate, build_stack, count_queue, log, median, smtp_source

DOMAIN = "customer.test"


def run(report: Report, quick: bool) -> None:
    stack = build_stack(domains=lambda port: f'[domains."{DOMAIN}"]\nrelay = "[127.0.0.1]:{port}"\n')
    try:
        milters = stack.pf.postconf("-h", "smtpd_milters").strip()

        def use_milter(on: bool) -> None:
            stack.pf.postconf("-e", f"smtpd_milters={milters if on else ''}")
            stack.pf.postfix("reload")
            time.sleep(1.0)  # old smtpd processes finish; new ones read the change

        rounds = 3 if quick else 5
        for sessions, messages, target in ((20, 500 if quick else 2000, 0.95),
                                           (1, 50 if quick else 200, 0.90)):
            def ours():
                use_milter(True)
                held = count_queue(stack, "hold")
                took = smtp_source(stack, f"user@{DOMAIN}", messages, sessions)
                got = count_queue(stack, "hold") - held
                if got != messages:
                    raise RuntimeError(f"P1: {got} of {messages} held")
                return messages / took

            def baseline():
                use_milter(False)
                return messages / smtp_source(stack, f"user@{DOMAIN}", messages, sessions)

            log(f"P1: {sessions} session(s), {messages} messages, {rounds} rounds each")
            a, b = alternate(rounds, ours, baseline)
            ratio = median(a) / median(b)
            report.add("P1", f"intake, {sessions} session(s) x {messages} msgs",
                       f"{median(a):.0f} msg/s", f"{median(b):.0f} msg/s", f"{ratio:.2f}",
                       f">= {target}", ratio >= target)
    finally:
        stack.destroy()
