"""The benchmark suite: P1-P9 (and P1b), ours against Postfix alone, one table.

    .venv/bin/python tests/bench/run.py            # everything (about 20 minutes)
    .venv/bin/python tests/bench/run.py --quick    # small sizes, a few minutes
    .venv/bin/python tests/bench/run.py --only P1,P1b,P3

Every measure starts its own private Postfix instance on loopback ports
(root needed, as for the integration tests). Each prints its lines as
it goes; the table at the end has them all, with the verdict against
the targets of docs/benchmarks.md. Exit status 1 if a target was missed,
2 if a measure could not be taken at all.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import foreign  # noqa: E402
import gateway_load  # noqa: E402
import intake  # noqa: E402
import metrics_scrape  # noqa: E402
import mxhosts  # noqa: E402
import poller_cycle  # noqa: E402
import release  # noqa: E402
import scale  # noqa: E402
import status  # noqa: E402
from common import Report, log  # noqa: E402

MEASURES = {"P1": intake.run, "P1B": intake.run_floor, "P2": release.run, "P3": status.run,
            "P4": poller_cycle.run, "P5": gateway_load.run, "P6": metrics_scrape.run,
            "P7": scale.run, "P8": mxhosts.run, "P9": foreign.run}


def machine() -> str:
    import subprocess
    postfix = subprocess.run(["postconf", "-h", "mail_version"], capture_output=True,
                             text=True).stdout.strip()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.node()}: {os.cpu_count()} cores, {mem:.0f} GiB, "
            f"{platform.platform(terse=True)}, Python {platform.python_version()}, "
            f"Postfix {postfix}")


def installed_bytecode() -> str:
    """Our packages' bytecode written, as pip writes it when it installs
    flushctl (the playbook's way): a CLI call then reads it.  Where
    PYTHONDONTWRITEBYTECODE is set and the checkout is an editable
    install, every CLI call would compile about a hundred modules first,
    0.1-0.15 s of each figure that no installed flushctl spends."""
    import compileall
    root = Path(__file__).resolve().parent.parent.parent
    ok = all([compileall.compile_dir(str(root / package), quiet=1)
              for package in ("flushctl", "milter")])
    return "bytecode of flushctl and milter written, as an install writes it" if ok else \
        "bytecode of flushctl and milter: NOT all written (CLI figures include compiling)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--only", default=",".join(MEASURES),
                    help="comma-separated measures (default: all)")
    args = ap.parse_args()
    wanted = [m.strip().upper() for m in args.only.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in MEASURES]
    if unknown:
        ap.error(f"unknown measure(s): {', '.join(unknown)}")
    if os.geteuid() != 0:
        ap.error("run as root: every measure starts a private Postfix instance")
    report = Report()
    broken = []
    started = time.time()
    log(machine())
    log(installed_bytecode())
    for name in wanted:
        try:
            MEASURES[name](report, args.quick)
        except Exception as exc:  # one broken measure must not hide the others
            log(f"{name} failed: {exc!r}")
            broken.append(name)
            report.add(name, "measure failed", str(exc)[:60], "-", "-", "-", False)
    print()
    print(f"{'Quick run' if args.quick else 'Full run'}, "
          f"{time.strftime('%Y-%m-%d', time.localtime(started))}, "
          f"{(time.time() - started) / 60:.1f} min; {machine()}")
    print()
    print(report.table())
    if broken:
        return 2
    return 0 if all(r.ok is not False for r in report.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
