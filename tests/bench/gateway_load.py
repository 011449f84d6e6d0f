"""P5 gateway: finger queries per second from 100 concurrent clients on
loopback, 1,000 triggers for one domain within a second, and the peak
memory of the gateway and the milter under that load.

The load comes from fingerload.c (epoll, one query per connection, as
the finger client does), compiled with the system's cc: in C it costs
little of the machine next to the gateway it measures.
"""

from __future__ import annotations

import re
import subprocess


from common import Report, build_stack, compile_c, log, peak_rss, smtp_source
from stack import wait_until

QUERY_DOMAINS = [f"q{i:03d}.test" for i in range(100)]
BURST = "burst.test"


def domains(port: int) -> str:
    return "".join(f'[domains."{d}"]\nrelay = "[127.0.0.1]:{port}"\n'
                   for d in QUERY_DOMAINS + [BURST])


def client() -> str:
    return compile_c("fingerload.c")


def load(host, port, queries, clients, duration=3600.0, total=0):
    """(answered, failed, seconds) of finger queries from ``clients`` connections."""
    out = subprocess.run([client(), host, str(port), str(clients), str(duration), str(total),
                          *queries], capture_output=True, text=True, check=True).stdout
    answered, failed, took = out.split()
    return int(answered), int(failed), float(took)


def run(report: Report, quick: bool) -> None:
    stack = build_stack(domains=domains, gateway=True,
                        gateway_extra="rate_burst = 1000000\nrate_per_minute = 100000000\n"
                                      "max_connections = 1024")
    try:
        hp = stack.cfg.finger_listen
        duration = 3 if quick else 10
        log(f"P5: finger load, 100 clients, {duration} s")
        answered, failed, took = load(hp.host, hp.port, QUERY_DOMAINS, 100, duration)
        rate = answered / took
        report.add("P5", f"finger queries/s, 100 clients ({failed} failed)", f"{rate:.0f}/s",
                   "-", "-", ">= 2000/s", rate >= 2000 and failed == 0)

        smtp_source(stack, f"user@{BURST}", 50, 5)
        wait_until(lambda: stack.status(BURST)[0]["messages"] == 50, 60, what="50 held")
        stack.sink.start()
        log("P5: 1000 triggers for one domain")
        answered, failed, took = load(hp.host, hp.port, [BURST], 100, total=1000)
        releases = len(re.findall(rf"domain={re.escape(BURST)} result=released_\d",
                                  stack.gateway_log()))
        report.add("P5", f"1000 triggers for one domain in {took:.2f} s ({failed} failed)",
                   f"{releases} release(s)", "-", "-", "<= 2", releases <= 2 and failed == 0)
        report.add("P5", "peak RSS under load: gateway / release helper / milter",
                   f"{peak_rss(stack.gateway.pid) / 2**20:.0f} / "
                   f"{peak_rss(stack.helper.pid) / 2**20:.0f} / "
                   f"{peak_rss(stack.milter.pid) / 2**20:.0f} MiB", "-", "-", "-", None)
    finally:
        stack.destroy()
