"""P1 and P1b intake: smtp-source into a private instance, with our milter and without.

One instance, one customer domain, several ways in turn, round by round:
- Postfix alone: the same instance without smtpd_milters; mail for the
  domain waits in the deferred queue (defer_transports), the stock
  on-demand recipe;
- P1's do-nothing milter (nullmilter.c, libmilter in C, the protocol
  steps a typical milter takes): what an ordinary milter costs Postfix;
- P1b's minimal milter (minmilter.c): the fewest steps a milter that
  tags by recipient can ask for (RCPT unanswered, the end of the
  message, where it adds a header and holds the message as ours does),
  the limit any milter in our place comes to;
- P1b's minimal pymilter milter (pyminmilter.py): the same in Python on
  pymilter, the limit any milter built as ours is comes to; and the same
  with ours' protocol steps, or with ours' ledger record, added: what
  each part of ours costs;
- ours: the milter tags, records and holds every message.
(Against an access rule that HOLDs the domain's mail instead, Postfix
alone is faster still, and the do-nothing milter reaches only about
0.66 of it; docs/benchmarks.md has the figures.)
Each ratio is the median of round-by-round ratios.  P1b also says what
each milter costs one message in microseconds (at 1 session, against
Postfix alone), and what Postfix sends it per message (a protocol trace,
miltertrace.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import (Report, build_stack, compile_c, count_queue, cpu_seconds, log, median,
                    paired_ratio, rotate, smtp_source)
from miltertrace import Trace

DOMAIN = "customer.test"
C_MILTERS = {"null": "nullmilter.c", "min": "minmilter.c"}
# pyminmilter.py, alone and with one part of ours each (its options)
PY_MILTERS = {"pymin": (), "pysteps": ("--steps",), "pyledger": ("--ledger", "{dir}/ledger")}
# the milters that hold the domain's mail (the others: deferred)
HOLDING = ("ours", "min", *PY_MILTERS)


class Intake:
    """The instance, and the milters that take turns in front of it."""

    def __init__(self):
        self.stack = build_stack(domains=lambda port: f'[domains."{DOMAIN}"]\n'
                                                      f'relay = "[127.0.0.1]:{port}"\n')
        self.dir = tempfile.mkdtemp(prefix="flushctl-milters-")
        os.chmod(self.dir, 0o755)
        self.procs = []
        self.sockets = {"alone": None}
        self.pids: dict[str, int] = {}   # each milter's process
        self.cpu: dict[str, list[float]] = {}   # its CPU seconds per message, each run
        try:
            for name, source in C_MILTERS.items():
                sock = os.path.join(self.dir, f"{name}.sock")
                self.procs.append(subprocess.Popen(
                    [compile_c(source, "-lmilter", "-lpthread"), sock]))
                self.sockets[name] = sock
                self.pids[name] = self.procs[-1].pid
            for name, options in PY_MILTERS.items():
                sock = os.path.join(self.dir, f"{name}.sock")
                self.procs.append(subprocess.Popen(
                    [sys.executable, os.path.join(os.path.dirname(__file__), "pyminmilter.py"),
                     *(o.format(dir=self.dir) for o in options), sock]))
                self.sockets[name] = sock
                self.pids[name] = self.procs[-1].pid
            self.pids["ours"] = self.stack.milter.pid
            ours = self.stack.pf.postconf("-h", "smtpd_milters").strip()
            path = ours.split(":", 1)[1]
            self.sockets["ours"] = path if path.startswith("/") else \
                str(self.stack.pf.queue_directory / path)
            deadline = time.monotonic() + 10
            while not all(os.path.exists(s) for s in self.sockets.values() if s):
                if time.monotonic() > deadline:
                    raise RuntimeError("the benchmark's milters did not start")
                time.sleep(0.1)
        except BaseException:
            self.close()
            raise

    def use(self, which: str, socket_path: str | None = None) -> None:
        path = socket_path or self.sockets[which]
        self.stack.pf.postconf("-e", f"smtpd_milters={'unix:' + path if path else ''}")
        self.stack.pf.postfix("reload")
        time.sleep(1.0)  # old smtpd processes finish; new ones read the change

    def rate(self, which: str, messages: int, sessions: int) -> float:
        """Messages per second through ``which``, every one where it belongs."""
        self.use(which)
        held = count_queue(self.stack, "hold")
        pid = self.pids.get(which)
        before = cpu_seconds(pid) if pid else 0.0
        rate = messages / smtp_source(self.stack, f"user@{DOMAIN}", messages, sessions)
        if pid:
            self.cpu.setdefault(which, []).append((cpu_seconds(pid) - before) / messages)
        got = count_queue(self.stack, "hold") - held
        if got != (messages if which in HOLDING else 0):
            raise RuntimeError(f"intake: {which}: {got} of {messages} held")
        return rate

    def trace(self, which: str, messages: int = 20) -> str:
        """What Postfix sends ``which`` per message, and the answers it waits for."""
        tracer = Trace(self.sockets[which])
        try:
            self.use(which, tracer.path)
            tracer.reset()
            smtp_source(self.stack, f"user@{DOMAIN}", messages, 1)
            time.sleep(0.5)
            return tracer.per_message(messages)
        finally:
            tracer.close()

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.wait()
        self.stack.destroy()
        shutil.rmtree(self.dir, ignore_errors=True)


def run(report: Report, quick: bool) -> None:
    """P1: ours and the do-nothing milter against Postfix alone."""
    bench = Intake()
    try:
        rounds = 3 if quick else 7
        for sessions, messages, target in ((20, 400 if quick else 1000, 0.95),
                                           (1, 50 if quick else 150, 0.90)):
            log(f"P1: {sessions} session(s), {messages} messages, {rounds} rounds")
            runs = rotate(rounds, {w: (lambda w=w: bench.rate(w, messages, sessions))
                                   for w in ("alone", "null", "ours")})
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
        bench.close()


def run_floor(report: Report, quick: bool) -> None:
    """P1b: ours against the minimal milter, in C and in Python (pymilter),
    and what each costs a message."""
    bench = Intake()
    try:
        for which in ("min", "pymin", "pysteps", "ours"):
            report.add("P1b", f"protocol per message, {which}", bench.trace(which), "-", "-",
                       "-", None)
        rounds = 3 if quick else 7
        for sessions, messages in ((20, 400 if quick else 1000), (1, 50 if quick else 150)):
            log(f"P1b: {sessions} session(s), {messages} messages, {rounds} rounds")
            runs = rotate(rounds, {w: (lambda w=w: bench.rate(w, messages, sessions))
                                   for w in ("alone", "min", *PY_MILTERS, "ours")})
            what = f"intake, {sessions} session(s) x {messages} msgs"
            vs_min = paired_ratio(runs["ours"], runs["min"])
            report.add("P1b", what + ", ours / minimal C milter",
                       f"{median(runs['ours']):.0f} msg/s", f"{median(runs['min']):.0f} msg/s "
                       "(minimal)", f"{vs_min:.2f}", ">= 0.95", vs_min >= 0.95)
            floor = paired_ratio(runs["pymin"], runs["min"])
            report.add("P1b", what + ", minimal pymilter / minimal C milter",
                       f"{median(runs['pymin']):.0f} msg/s", f"{median(runs['min']):.0f} msg/s "
                       "(minimal)", f"{floor:.2f}", "(any pymilter milter)", None)
            for which, label in (("pysteps", "minimal pymilter with ours' steps"),
                                 ("pyledger", "minimal pymilter with ours' ledger record"),
                                 ("ours", "ours")):
                vs_py = paired_ratio(runs[which], runs["pymin"])
                report.add("P1b", f"{what}, {label} / minimal pymilter",
                           f"{median(runs[which]):.0f} msg/s",
                           f"{median(runs['pymin']):.0f} msg/s (pymilter)", f"{vs_py:.2f}", "-",
                           None)
            for which in ("min", *PY_MILTERS, "ours"):   # the milter's own share
                report.add("P1b", f"{what}, milter CPU per message, {which}",
                           f"{median(bench.cpu[which]) * 1e6:.0f} us", "-", "-", "-", None)
            bench.cpu.clear()
            alone = paired_ratio(runs["ours"], runs["alone"])
            report.add("P1b", what + ", ours / Postfix alone", f"{median(runs['ours']):.0f} msg/s",
                       f"{median(runs['alone']):.0f} msg/s", f"{alone:.2f}",
                       ">= 0.95" if sessions > 1 else "-", alone >= 0.95 if sessions > 1 else None)
            if sessions == 1:
                for which in ("min", *PY_MILTERS, "ours"):
                    added = median([(1 / x - 1 / a) * 1e6
                                    for x, a in zip(runs[which], runs["alone"])])
                    report.add("P1b", f"added latency per message, {which}, 1 session",
                               f"{added:.0f} us", "0 us", "-", "-", None)
    finally:
        bench.close()
