"""P4 poller: one poller cycle over 10,000 configured domains.

1,000 of them hold mail; 90% of those are unreachable: half point at
loopback ports where nothing listens (refused at once), half at a local
tarpit that accepts and never greets (each probe waits the full
probe_timeout).  The other 10% point at smtp-sink.  Measures the cycle's
wall time and the CPU it used, with the default probe_timeout (10 s) and
concurrency (100).  Loopback only.  Postfix has no counterpart.
"""

from __future__ import annotations

import asyncio
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from instance import free_port  # noqa: E402

from flushctl import config as config_mod  # noqa: E402
from flushctl.heldmail.ledger.store import Ledger  # noqa: E402
from flushctl.heldmail.library import HeldMail  # noqa: E402
from flushctl.poller.loop import Poller  # noqa: E402
from flushctl.mta.queuefiles import QueueLayout  # noqa: E402

CONFIGURED = 10_000
HOLDING = 1_000


def tarpit(port: int, stop: threading.Event) -> None:
    """Accept connections and never say a word."""
    async def main():
        held = []

        async def handle(reader, writer):
            held.append(writer)
            await reader.read()  # until the prober gives up
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=2048)
        async with server:
            while not stop.is_set():
                await asyncio.sleep(0.1)
    asyncio.run(main())


def timed_cycle(od) -> tuple[list, float, float]:
    """One cycle in this process: its entries, wall seconds, CPU seconds."""
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.monotonic()
    entries = asyncio.run(Poller.local(od).cycle())
    wall = time.monotonic() - start
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    return entries, wall, cpu


def cycle(timeout: float, concurrency: int) -> dict:
    """One cycle; what it found and what it cost."""
    # dead_port: nothing listens there once free_port's socket is closed
    sink_port, pit_port, dead_port = free_port(), free_port(), free_port()
    sink = subprocess.Popen(["smtp-sink", "-u", "nobody", f"127.0.0.1:{sink_port}", "256"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stop = threading.Event()
    threading.Thread(target=tarpit, args=(pit_port, stop), daemon=True).start()
    time.sleep(0.5)

    tmp = Path(tempfile.mkdtemp(prefix="flushctl-bench-"))
    lines = [f'[state]\ndirectory = "{tmp}"\n[poller]\nprobe_timeout = {timeout}\n'
             f'concurrency = {concurrency}\n']
    for i in range(CONFIGURED):
        if i < HOLDING * 0.10:
            port = sink_port
        elif i < HOLDING * 0.55:
            port = dead_port
        else:
            port = pit_port
        lines.append(f'[domains."c{i:05d}.test"]\nrelay = "[127.0.0.1]:{port}"\n')
    cfg = config_mod.parse("".join(lines), "bench.toml")
    ledger = Ledger(str(tmp))
    for i in range(HOLDING):
        ledger.record(f"BENCH{i:05d}X", f"c{i:05d}.test", 1000)
    layout = QueueLayout(str(tmp / "queue"), frozenset(), 1)  # no queue files: nothing to release
    od = HeldMail(cfg, layout=layout, ledger=ledger)

    entries, wall, cpu = timed_cycle(od)

    by_outcome: dict[str, int] = {}
    for e in entries:
        by_outcome[e.probe.outcome] = by_outcome.get(e.probe.outcome, 0) + 1
    stop.set()
    sink.terminate()
    shutil.rmtree(tmp, ignore_errors=True)
    return {"probed": len(entries), "outcomes": dict(sorted(by_outcome.items())),
            "wall": wall, "cpu": cpu}


def run(report, quick: bool) -> None:
    from common import log
    timeout = 2.0 if quick else 10.0
    log(f"P4: one poller cycle, {CONFIGURED} domains, {HOLDING} holding, "
        f"probe_timeout {timeout:g} s")
    result = cycle(timeout, 100)
    if result["probed"] != HOLDING:
        raise RuntimeError(f"P4: probed {result['probed']} of {HOLDING}")
    report.add("P4", f"poller cycle, {CONFIGURED} domains, {HOLDING} holding, "
               f"timeout {timeout:g} s", f"{result['wall']:.1f} s", "-", "-", "<= 60 s",
               result["wall"] <= 60)
    share = result["cpu"] / result["wall"]
    report.add("P4", "poller CPU during the cycle", f"{share:.2f} core", "-", "-",
               "< 0.5 core", share < 0.5)
