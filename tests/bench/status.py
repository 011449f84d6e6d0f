"""P3 status: `flushctl status DOMAIN` as the queue grows from 1,000 to 100,000.

One domain holds 100 messages; 500 other domains fill the queue to each
size in turn (through SMTP and the milter, as in production). Postfix
alone: what an admin without us runs to count a domain's mail,
`postqueue -j` and a count of the domain's recipients. Ours: the CLI (a
new interpreter each time) and the same call inside a running process.
Exactness: both counts must equal what was sent.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

from common import (Report, alternate, build_stack, count_queue, fill, log, median, queue_entries,
                    smtp_source)
from stack import FLUSHCTL

DOMAIN = "customer.test"
HELD = 100
FILLERS = [f"f{i:03d}.test" for i in range(500)]


def domains(port: int) -> str:
    return "".join(f'[domains."{d}"]\nrelay = "[127.0.0.1]:{port}"\n'
                   for d in [DOMAIN] + FILLERS)


def timings(stack, od, domain: str, held: int, rounds: int = 5):
    """`flushctl status --json DOMAIN` (a new interpreter each time), `postqueue
    -j` and a count (Postfix alone), in turn; then the same status in this
    process; each must count ``held``.  Their seconds: CLI, baseline, in-process."""
    env = dict(os.environ, FLUSHCTL_CONFIG=str(stack.config_path))

    def ours():
        start = time.perf_counter()
        out = subprocess.run([*FLUSHCTL, "status", "--json", domain], env=env,
                             capture_output=True, text=True, check=True).stdout
        took = time.perf_counter() - start
        assert json.loads(out)[0]["messages"] == held, out
        return took

    def baseline():
        start = time.perf_counter()
        count = sum(1 for entry in queue_entries(stack)
                    if entry["recipients"][0]["address"].endswith("@" + domain))
        took = time.perf_counter() - start
        assert count == held, count
        return took

    cli, base = alternate(rounds, ours, baseline)
    inproc = []
    for _ in range(20):
        start = time.perf_counter()
        st = od.status(domain)
        inproc.append(time.perf_counter() - start)
        assert st.messages == held
    return cli, base, inproc


def run(report: Report, quick: bool) -> None:
    sizes = (1_000, 10_000) if quick else (1_000, 10_000, 100_000)
    stack = build_stack(domains=domains)
    try:
        from flushctl import config as config_mod
        from flushctl.heldmail.library import HeldMail
        smtp_source(stack, f"user@{DOMAIN}", HELD, 4)
        od = HeldMail(config_mod.load(str(stack.config_path)))
        cli_figures = {}
        for size in sizes:
            have = count_queue(stack, "hold")
            if size > have:
                per = -(-(size - have) // len(FILLERS))
                log(f"P3: filling the queue to about {size} messages")
                fill(stack, FILLERS, per)
            total = count_queue(stack, "hold")
            a, b, inproc = timings(stack, od, DOMAIN, HELD)
            cli_figures[size] = median(a)
            report.add("P3", f"status, {total} queued ({HELD} for the domain)",
                       f"{median(a) * 1000:.0f} ms", f"{median(b) * 1000:.0f} ms",
                       f"{median(a) / median(b):.2f}", "exact", True)
            ok = median(inproc) < 0.050 if size == sizes[-1] else None
            report.add("P3", f"status in-process, {total} queued", f"{median(inproc) * 1000:.1f} ms",
                       "-", "-", "< 50 ms at the largest" if ok is not None else "-", ok)
        flat = cli_figures[sizes[-1]] / cli_figures[sizes[0]]
        report.add("P3", f"status flat: {sizes[-1]} vs {sizes[0]} queued",
                   f"{flat:.2f}x", "-", "-", "<= 1.25x", flat <= 1.25)
    finally:
        stack.destroy()
