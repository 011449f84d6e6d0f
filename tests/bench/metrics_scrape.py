"""P6 metrics: one Prometheus scrape with 10,000 configured domains.

1,000 of them hold 3 messages each (through SMTP and the milter). Ours:
an HTTP scrape of the running poller's endpoint (the time to the whole
answer, as Prometheus waits for it), every domain's held
messages, bytes, oldest age and reachability plus every counter. Postfix
alone: what an admin runs for per-domain counts, `postqueue -j` grouped by
recipient domain. Exactness: the scrape's per-domain counts must equal
that grouping.
"""

from __future__ import annotations

import time
import urllib.request

from common import Report, alternate, build_stack, fill, grouped, log, median

from prometheus_client.parser import text_string_to_metric_families

CONFIGURED = 10_000
PER_DOMAIN = 3


def run(report: Report, quick: bool) -> None:
    holding = 200 if quick else 1_000
    names = [f"c{i:05d}.test" for i in range(CONFIGURED)]

    def domains(port: int) -> str:
        return "".join(f'[domains."{d}"]\nrelay = "[127.0.0.1]:{port}"\n' for d in names)

    stack = build_stack(domains=domains, poller_extra="interval = 3600")
    try:
        log(f"P6: holding {PER_DOMAIN} messages for each of {holding} domains")
        fill(stack, names[:holding], PER_DOMAIN)
        stack.start_poller()            # its one cycle probes the holding domains
        time.sleep(5)
        hp = stack.cfg.metrics_listen
        url = f"http://{hp.host}:{hp.port}/metrics"

        def fetch() -> str:
            with urllib.request.urlopen(url, timeout=60) as answer:
                return answer.read().decode()

        def scrape() -> dict:
            return {s.labels["domain"]: s.value
                    for f in text_string_to_metric_families(fetch()) for s in f.samples
                    if s.name == "flushctl_held_messages"}

        def ours():   # what Prometheus waits for: the answer, not our parsing of it
            start = time.perf_counter()
            text = fetch()
            took = time.perf_counter() - start
            assert text.count("\nflushctl_held_messages{") == CONFIGURED
            return took

        def baseline():
            start = time.perf_counter()
            grouped(stack)
            return time.perf_counter() - start

        exact = {d: n for d, n in scrape().items() if n} == grouped(stack)
        a, b = alternate(7, ours, baseline)
        ok = median(a) < 0.5 and exact
        report.add("P6", f"scrape, {CONFIGURED} domains, {holding * PER_DOMAIN} held",
                   f"{median(a) * 1000:.0f} ms", f"{median(b) * 1000:.0f} ms",
                   f"{median(a) / median(b):.2f}",
                   "< 500 ms, exact" if exact else "NOT exact", ok)
    finally:
        stack.destroy()
