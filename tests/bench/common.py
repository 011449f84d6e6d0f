"""What the benchmarks share: timing, medians, the table, queue filling."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from stack import Stack, build_stack, wait_until  # noqa: E402,F401


@dataclass
class Row:
    """One line of the table: a measure, its figures, the target and the verdict."""

    measure: str
    what: str
    ours: str
    baseline: str
    ratio: str
    target: str
    ok: bool | None   # None: reported, no target

    def cells(self) -> list[str]:
        verdict = "-" if self.ok is None else ("ok" if self.ok else "MISSED")
        return [self.measure, self.what, self.ours, self.baseline, self.ratio, self.target,
                verdict]


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *args, **kwargs) -> Row:
        row = Row(*args, **kwargs)
        self.rows.append(row)
        print("  " + " | ".join(row.cells()), flush=True)
        return row

    def table(self) -> str:
        head = ["measure", "what", "ours", "Postfix alone", "ratio", "target", ""]
        rows = [head] + [r.cells() for r in self.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = []
        for n, r in enumerate(rows):
            lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
            if n == 0:
                lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n".join(lines)


def median(values) -> float:
    return statistics.median(values)


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def alternate(rounds: int, ours, baseline) -> tuple[list[float], list[float]]:
    """Run baseline and ours in turn, ``rounds`` times each, starting with
    the baseline; return their measurements."""
    results = rotate(rounds, {"baseline": baseline, "ours": ours})
    return results["ours"], results["baseline"]


def rotate(rounds: int, runs: dict) -> dict[str, list[float]]:
    """Run each of ``runs`` (name -> function) in turn, ``rounds`` times;
    their measurements by name, round by round."""
    results = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            results[name].append(fn())
    return results


def paired_ratio(values: list[float], baseline: list[float]) -> float:
    """Median of round-by-round ratios: each pair ran back to back, so a
    machine that drifts between rounds does not skew the result."""
    return median([v / b for v, b in zip(values, baseline)])


def compile_c(source: str, *libs: str) -> str:
    """Compile tests/bench/SOURCE with the system's cc into a temporary
    directory, once per run; the program's path."""
    if source not in _COMPILED:
        out = _build_dir() / Path(source).stem
        subprocess.run(["cc", "-O2", "-o", str(out), str(HERE / source), *libs], check=True)
        _COMPILED[source] = str(out)
    return _COMPILED[source]


_COMPILED: dict[str, str] = {}


@functools.cache
def _build_dir() -> Path:
    """One directory for the run's programs, gone when the run ends."""
    path = tempfile.mkdtemp(prefix="flushctl-bench-")
    atexit.register(shutil.rmtree, path, True)
    return Path(path)


def smtp_source(stack: Stack, rcpt: str, messages: int, sessions: int,
                size: int = 2048) -> float:
    """smtp-source into the instance; seconds it took."""
    argv = ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size),
            "-f", "sender@bench.test", "-t", rcpt, f"127.0.0.1:{stack.pf.smtpd_port}"]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
    took = time.perf_counter() - start
    if proc.returncode != 0 or proc.stderr.strip():
        raise RuntimeError(f"smtp-source: {proc.returncode}: {proc.stderr[-500:]}")
    return took


def count_queue(stack: Stack, *queues: str) -> int:
    total = 0
    for queue in queues:
        for _, _, files in os.walk(stack.pf.queue_directory / queue):
            total += len(files)
    return total


def fill(stack: Stack, domains: list[str], per_domain: int, parallel: int = 8) -> None:
    """Hold ``per_domain`` messages for each domain (through SMTP and the milter)."""
    before = count_queue(stack, "hold")
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(lambda d: smtp_source(stack, f"user@{d}", per_domain, 4), domains))
    want = before + per_domain * len(domains)
    wait_until(lambda: count_queue(stack, "hold") >= want, 600, 0.5,
               what=f"{want} messages held")


def cpu_seconds(pid: int) -> float:
    """A process's CPU time so far (user and system), seconds."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def peak_rss(pid: int) -> int:
    """VmHWM of a process and its children, bytes."""
    total = 0
    proc = psutil.Process(pid)
    for p in [proc] + proc.children(recursive=True):
        with open(f"/proc/{p.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
    return total


def queue_entries(stack) -> list[dict]:
    """`postqueue -j`: every queued message, as Postfix lists it (what an
    admin without us reads; at a million messages it takes half a minute)."""
    out = subprocess.run(["postqueue", "-c", str(stack.pf.config_directory), "-j"],
                         capture_output=True, text=True, check=True, timeout=1800).stdout
    return [json.loads(line) for line in out.splitlines()]


def grouped(stack, queue: str | None = None) -> dict[str, int]:
    """`postqueue -j` grouped by the first recipient's domain (only the
    messages in ``queue``, when given): per-domain counts without us."""
    counts: dict[str, int] = {}
    for entry in queue_entries(stack):
        if queue is None or entry["queue_name"] == queue:
            dom = entry["recipients"][0]["address"].rsplit("@", 1)[1]
            counts[dom] = counts.get(dom, 0) + 1
    return counts
