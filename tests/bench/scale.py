"""P7 scale: a provider's size, 100,000 customer domains and a million held
messages, against the same figures at 10,000 held.

One instance with 100,000 configured domains (the transport map and
relay_domains the way `flushctl apply` writes them); 10,000 of them hold
mail, through SMTP and the milter (smtp-source, 32 sessions), plus one
domain's 100 partly through `sendmail` (pickup, the milter's other way
in).  At each size in turn (10,000 held, then the large one: a million,
or FLUSHCTL_BENCH_P7_HELD) it measures:
- the fill: how long it took, the disk the hold queue and the ledger use;
- `flushctl status DOMAIN`: the CLI against `postqueue -j` and a count
  (Postfix alone), and in-process;
- `flushctl status` of every domain (CLI and in-process) and a metrics
  scrape, each exact against `postqueue -j` grouped by domain;
- a release of 1,000 messages of one domain by finger, against
  `postqueue -s` of 1,000 deferred for a plain domain (P2's recipe) in
  the same queue;
- the milter's intake rate (1,000 messages, 20 sessions), against
  Postfix alone holding the same number into the same queue (an access
  map's HOLD for a domain that is not ours), rounds alternating;
- one poller cycle over the 100,000 configured domains, 10,000 of them
  holding (their relay refuses: the cycle's own cost, not the probes'
  waits, which P4 measures), wall time and CPU;
- the helper's CPU while idle (its keeper passes over the queue), and
  the daemons' peak memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import psutil

import poller_cycle
import release
import status
from common import (Report, alternate, build_stack, count_queue, cpu_seconds, fill, grouped,
                    log, median, peak_rss, smtp_source)
from stack import FLUSHCTL, wait_until

STATUS = "status.test"     # holds exactly HELD, a quarter through sendmail
INTAKE = "intake.test"     # takes the intake rounds
POSTFIX_HOLD = "postfixhold.test"   # held by Postfix's access map alone (not configured)
HELD = 100
INTERVAL = 60   # [poller] interval's default, seconds


def add_postfix_hold(stack) -> None:
    """A relay domain that smtpd's access map puts on hold: Postfix alone
    holding, beside the milter's holds in the same queue (the milter lets
    mail for a domain it does not know pass untouched)."""
    pf = stack.pf
    restrictions = pf.postconf("-h", "smtpd_recipient_restrictions").strip()
    pf.postconf("-e", f"relay_domains={pf.postconf('-h', 'relay_domains').strip()}, "
                f"{POSTFIX_HOLD}")
    pf.postconf("-e", "smtpd_recipient_restrictions=check_recipient_access "
                f"inline:{{{POSTFIX_HOLD}=HOLD}}, {restrictions}")
    pf.postfix("reload")


def hold_ids(stack) -> list[str]:
    return [name for _, _, files in os.walk(stack.pf.queue_directory / "hold")
            for name in files]


def shape(quick: bool) -> tuple[int, int, tuple[int, int], int]:
    """(configured domains, holding domains, (small, large) held, batch)."""
    if quick:
        return 5_000, 500, (1_000, 5_000), 200
    large = int(os.environ.get("FLUSHCTL_BENCH_P7_HELD", "1000000"))
    return 100_000, 10_000, (10_000, large), 1_000


def settle(stack, timeout: float = 300) -> str:
    """Wait until our daemons rest (each under 5% of a core over 2 s): the
    figures are of a host at rest, not of one still starting up or taking
    in the fill. Says how long it took, and who was busy."""
    daemons = {name: proc for name, proc in
               (("milter", stack.milter), ("gateway", stack.gateway), ("helper", stack.helper),
                ("poller", stack.poller)) if proc is not None}

    def used() -> dict[str, float]:
        out = {}
        for name, proc in daemons.items():
            if proc.poll() is not None:   # a dead daemon is not one at rest
                raise RuntimeError(f"P7: the {name} ended: {stack.daemon_log(name)[-2000:]}")
            out[name] = cpu_seconds(proc.pid)
        return out

    start, busy, rested = time.monotonic(), {}, False
    while not rested and time.monotonic() - start < timeout:
        before = used()
        time.sleep(2)
        hot = {n: (t - before[n]) / 2 for n, t in used().items() if t - before[n] >= 0.1}
        rested = not hot
        for name, share in hot.items():
            busy[name] = max(share, busy.get(name, 0))
    return ("" if rested else "NOT at rest, ") + f"{time.monotonic() - start:.0f} s" + "".join(
        f", {name} up to {share:.2f} core" for name, share in busy.items())


def disk(path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def timed(fn, rounds: int = 3) -> tuple[float, object]:
    """Median seconds of ``rounds`` calls, and the last call's result."""
    took, result = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        result = fn()
        took.append(time.perf_counter() - start)
    return median(took), result


class Scale:
    def __init__(self, quick: bool):
        self.configured, self.holding, self.sizes, self.batch = shape(quick)
        self.names = [f"c{i:06d}.test" for i in range(self.configured)]
        every = [STATUS, INTAKE, release.OURS, *self.names]

        def domains(port: int) -> str:
            return "".join(f'[domains."{d}"]\nrelay = "[127.0.0.1]:{port}"\n' for d in every)

        start = time.perf_counter()
        self.stack = build_stack(domains=domains, gateway=True,
                                 gateway_extra=release.GATEWAY_EXTRA,
                                 poller_extra="interval = 3600")
        self.built = time.perf_counter() - start
        self.env = dict(os.environ, FLUSHCTL_CONFIG=str(self.stack.config_path))
        release.add_plain(self.stack)
        add_postfix_hold(self.stack)
        hp = self.stack.cfg.metrics_listen   # read once: no part of what is measured
        self.metrics_url = f"http://{hp.host}:{hp.port}/metrics"

    def heldmail(self):
        from flushctl import config as config_mod
        from flushctl.heldmail.library import HeldMail
        return HeldMail(config_mod.load(str(self.stack.config_path)))

    def hold_status_domain(self) -> None:
        stack = self.stack
        smtp_source(stack, f"user@{STATUS}", HELD - HELD // 4, 4)
        for n in range(HELD // 4):
            subprocess.run(["/usr/sbin/sendmail", "-C", str(stack.pf.config_directory),
                            "-f", "local@sender.test", f"user{n}@{STATUS}"],
                           input=f"Subject: local {n}\n\nhello\n", text=True, check=True,
                           timeout=60)
        wait_until(lambda: self.heldmail().status(STATUS).messages == HELD, 120,
                   what=f"{HELD} held for {STATUS}")

    def fill_to(self, size: int) -> float:
        have = count_queue(self.stack, "hold")
        per = -(-(size - have) // self.holding)
        start = time.perf_counter()
        if per > 0:
            log(f"P7: holding {per} more for each of {self.holding} domains")
            fill(self.stack, self.names[:self.holding], per, parallel=8)
        return time.perf_counter() - start

    def cli(self, *args: str) -> str:
        return subprocess.run([*FLUSHCTL, *args], env=self.env, capture_output=True,
                              text=True, check=True, timeout=600).stdout

    def scrape(self) -> str:
        import urllib.request
        with urllib.request.urlopen(self.metrics_url, timeout=600) as answer:
            return answer.read().decode()

    def measure(self, report: Report, size: int) -> dict[str, float]:
        """Every figure at this size; the ones the flatness rows compare."""
        stack, add = self.stack, report.add
        fill_took = self.fill_to(size)
        held = count_queue(stack, "hold")
        at = f"{held} held"
        add("P7", f"fill to {at}, {self.holding} domains holding",
            f"{fill_took:.0f} s", "-", "-", "-", None)
        add("P7", f"disk at {at}: hold queue / ledger",
            f"{disk(stack.pf.queue_directory / 'hold') / 2**20:.0f} / "
            f"{disk(stack.state_dir) / 2**20:.0f} MiB", "-", "-", "-", None)

        stack.sink.stop()   # the relays refuse: the cycle releases nothing
        od = self.heldmail()
        entries, wall, cpu = poller_cycle.timed_cycle(od)
        looked = len(entries)
        if looked < self.holding:
            raise RuntimeError(f"P7: the poller looked at {looked} of {self.holding}")
        # the probes are refused at once, so the cycle is all CPU while it
        # runs: what it costs the host is its CPU over the default interval
        share = cpu / max(wall, INTERVAL)
        add("P7", f"poller cycle, {len(od.config.domains)} domains, {looked} holding, {at}",
            f"{wall:.1f} s, {cpu:.1f} CPU s = {share:.2f} core", "-", "-",
            "<= 60 s, < 0.5 core", wall <= 60 and share < 0.5)
        if stack.poller is None:   # the metrics endpoint; its own first cycle finds them backing off
            stack.start_poller()
            wait_until(lambda: "event=cycle" in stack.daemon_log("poller"), 600, 1,
                       what="the poller's first cycle")
        stack.sink.start()
        log(f"P7: waited for the daemons to rest: {settle(stack)}")

        cli, base, inproc = status.timings(stack, od, STATUS, HELD, rounds=3)
        add("P7", f"status DOMAIN, {at}", f"{median(cli) * 1000:.0f} ms",
            f"{median(base) * 1000:.0f} ms", f"{median(cli) / median(base):.2f}", "exact", True)
        add("P7", f"status DOMAIN in-process, {at}", f"{median(inproc) * 1000:.1f} ms", "-",
            "-", "< 50 ms", median(inproc) < 0.050)

        start = time.perf_counter()
        truth = grouped(stack, "hold")   # what a Postfix admin counts
        group_took = time.perf_counter() - start
        all_cli, out = timed(lambda: self.cli("status", "--json"))
        listed = {r["domain"]: r["messages"] for r in json.loads(out) if r["messages"]}
        all_in, rows = timed(lambda: od.status_all())
        exact = listed == truth and {r.domain: r.messages for r in rows if r.messages} == truth
        add("P7", f"status, all {len(rows)} domains, {at}",
            f"{all_cli:.2f} s (in-process {all_in:.2f} s)", f"{group_took:.2f} s",
            f"{all_cli / group_took:.2f}", "< 2 s, exact" if exact else "NOT exact",
            exact and all_cli < 2)
        scrape_took, text = timed(self.scrape)
        from prometheus_client.parser import text_string_to_metric_families
        scraped = {s.labels["domain"]: s.value for f in text_string_to_metric_families(text)
                   for s in f.samples if s.name == "flushctl_held_messages" and s.value}
        add("P7", f"metrics scrape, {at}", f"{scrape_took:.2f} s", f"{group_took:.2f} s",
            f"{scrape_took / group_took:.2f}", "< 2 s, exact" if scraped == truth
            else "NOT exact", scraped == truth and scrape_took < 2)

        ours, plain = release.compare(stack, self.batch, 3)
        ratio = median(ours) / median(plain)
        add("P7", f"release {self.batch} of one domain, {at}", f"{median(ours):.2f} s",
            f"{median(plain):.2f} s", f"{ratio:.2f}", "<= 1.2", ratio <= 1.2)

        rates, alone = alternate(3, lambda: self.batch / smtp_source(
            stack, f"user@{INTAKE}", self.batch, 20), self.postfix_hold_rate)
        add("P7", f"intake, 20 sessions x {self.batch}, {at}", f"{median(rates):.0f} msg/s",
            f"{median(alone):.0f} msg/s", f"{median(rates) / median(alone):.2f}", "-", None)

        before = cpu_seconds(stack.helper.pid)
        time.sleep(20)
        idle = (cpu_seconds(stack.helper.pid) - before) / 20
        add("P7", f"release helper idle (keeper passes), {at}", f"{idle:.2f} core", "-", "-",
            "-", None)
        return {"status": median(cli), "intake": median(rates), "release": median(ours),
                "intake_alone": median(alone)}

    def postfix_hold_rate(self) -> float:
        """Postfix alone holding: the intake rate of mail its access map puts
        on hold, into the same hold queue; the mail is deleted after.  The
        helper is stopped meanwhile: its keeper would read each of these
        (held, not ours) once, a cost of ours on Postfix's mail."""
        stack = self.stack
        helper = psutil.Process(stack.helper.pid)
        before = set(hold_ids(stack))
        helper.suspend()
        try:
            rate = self.batch / smtp_source(stack, f"user@{POSTFIX_HOLD}", self.batch, 20)
            wait_until(lambda: count_queue(stack, "incoming", "active") == 0, 120,
                       what="Postfix's own holds settled")
            new = sorted(set(hold_ids(stack)) - before)
            subprocess.run(["postsuper", "-c", str(stack.pf.config_directory), "-d", "-"],
                           input="\n".join(new) + "\n", text=True, check=True,
                           capture_output=True, timeout=600)
        finally:
            helper.resume()
        if len(new) != self.batch:
            raise RuntimeError(f"P7: Postfix held {len(new)} of {self.batch}")
        return rate

    def memory(self, report: Report) -> None:
        stack = self.stack
        mib = {name: peak_rss(proc.pid) / 2**20 for name, proc in
               (("milter", stack.milter), ("gateway", stack.gateway),
                ("helper", stack.helper), ("poller", stack.poller))}
        report.add("P7", "peak RSS: " + " / ".join(mib), " / ".join(f"{v:.0f}" for v in
                                                               mib.values()) + " MiB",
                   "-", "-", "-", None)


def run(report: Report, quick: bool) -> None:
    bench = Scale(quick)
    try:
        report.add("P7", f"start-up with {bench.configured + 3} domains (apply, Postfix, "
                   "daemons)", f"{bench.built:.0f} s", "-", "-", "-", None)
        bench.hold_status_domain()
        small, large = (bench.measure(report, size) for size in bench.sizes)
        flat = large["status"] / small["status"]
        report.add("P7", "status DOMAIN flat, CLI: large vs small", f"{flat:.2f}x", "-", "-",
                   "<= 1.25x", flat <= 1.25)
        flat = large["intake"] / small["intake"]
        alone = large["intake_alone"] / small["intake_alone"]
        # a hold queue of a million files slows Postfix's own intake: ours
        # is judged flat if it keeps 0.90 of its rate, or as much as Postfix alone
        report.add("P7", "intake flat: large vs small", f"{flat:.2f}x", f"{alone:.2f}x",
                   f"{flat / alone:.2f}", ">= 0.90x or >= 0.95 of Postfix's",
                   flat >= 0.90 or flat / alone >= 0.95)
        bench.memory(report)
    finally:
        bench.stack.destroy()
