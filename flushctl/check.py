"""`flushctl check`: is everything in place and running? One line per problem.

Checks, each independent of the others:
- Postfix runs, and its settings are what `flushctl apply` wants;
- the milter's socket accepts connections, the gateway listens on its
  finger and policy ports, a poller process runs for this config (psutil)
  and serves the metrics endpoint;
- the ledger agrees with the hold queue (held messages it lacks);
- each customer domain's MX records (dnspython) name one of our hosts;
- with [cluster]: each peer's SMTP port accepts connections, and no
  release has waited long for a peer to acknowledge it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import dataclass, field

import psutil

from . import names
from .config import Config, HostPort, Listen
from .ondemand import OnDemand
from .postfix import PostfixError
from .probe import Prober


@dataclass
class Report:
    checks: list[str] = field(default_factory=list)    # what was looked at
    problems: list[str] = field(default_factory=list)  # one line each

    def as_json(self) -> dict:
        return {"ok": not self.problems, "checks": self.checks, "problems": self.problems}


def _connectable(listen: Listen | HostPort, timeout: float = 2.0) -> str:
    """'' when something accepts a connection there, else why not."""
    try:
        if isinstance(listen, Listen) and listen.kind == "unix":
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(timeout)
                sock.connect(listen.path)
        else:
            with socket.create_connection((listen.host, listen.port), timeout):
                pass
        return ""
    except OSError as exc:
        return exc.strerror or str(exc)


def _daemon_running(config: Config, daemon: str) -> bool:
    """A `flushctl ... DAEMON` process for this config file."""
    wanted = os.path.realpath(config.path)
    for proc in psutil.process_iter(["cmdline", "environ"]):
        cmd = proc.info.get("cmdline") or []
        if daemon not in cmd or not any("flushctl" in part for part in cmd):
            continue
        if "--config" in cmd:
            index = cmd.index("--config")
            path = cmd[index + 1] if index + 1 < len(cmd) else ""
        else:
            path = (proc.info.get("environ") or {}).get("FLUSHCTL_CONFIG", "")
        if path and os.path.realpath(path) == wanted:
            return True
    return False


def _postfix(od: OnDemand, report: Report) -> None:
    from .apply import ApplyError, apply
    report.checks.append("postfix")
    try:
        if not od.postfix.running():
            report.problems.append("postfix: not running")
    except PostfixError as exc:
        report.problems.append(f"postfix: {exc}")
        return
    report.checks.append("settings")
    try:
        planned = apply(od.config, dry_run=True)
    except (ApplyError, PostfixError) as exc:
        report.problems.append(f"settings: {exc}")
        return
    if planned.changed:
        report.problems.append("settings: Postfix differs from what flushctl apply wants ("
                               + "; ".join(planned.lines()) + "); run `flushctl apply`")


def _daemons(config: Config, report: Report) -> None:
    for name, where in (("milter", config.milter_listen), ("gateway finger", config.finger_listen),
                        ("gateway policy", config.policy_listen)):
        report.checks.append(name)
        why = _connectable(where)
        if why:
            spec = where.milter_spec if isinstance(where, Listen) else str(where)
            report.problems.append(f"{name}: nothing accepts connections on {spec} ({why})")
    report.checks.append("poller")
    if not _daemon_running(config, "poller"):
        report.problems.append(f"poller: no `flushctl poller` process for {config.path}")
    elif config.metrics_listen is not None:
        report.checks.append("metrics")
        why = _connectable(config.metrics_listen)
        if why:
            report.problems.append(f"metrics: the poller does not serve {config.metrics_listen} "
                                   f"({why}); see its log")


def _ledger(od: OnDemand, report: Report) -> None:
    report.checks.append("ledger")
    hold = os.path.join(od.layout.queue_directory, "hold")
    try:
        held = [n for n in os.listdir(hold) if names.is_queue_id(n)]
    except OSError as exc:
        report.problems.append(f"ledger: cannot read the hold queue: {exc}")
        return
    unknown = set(held) - od.ledger.known(held)
    if unknown:
        adopted = od.adopt()  # ours but unrecorded (a refresh, a lost ledger): record them now
        rest = len(unknown) - sum(adopted.values())
        if adopted:
            report.problems.append(f"ledger: lacked {sum(adopted.values())} held message(s) "
                                   "of ours; recorded them from their tag headers")
        if rest:
            report.problems.append(f"ledger: {rest} message(s) in the hold queue are not ours "
                                   "(no tag from this installation): `postqueue -j` shows them")
    for dom in sorted(od.config.domains):
        od.locate(dom)  # prunes rows whose message is gone


def _mx(config: Config, own: set[str], report: Report) -> None:
    report.checks.append("mx")
    prober = Prober(timeout=5.0, nameservers=config.nameservers)

    async def one(name: str) -> str:
        answer, problem = await prober.query(name, "MX")
        if answer is None:
            return f"mx: {name}: {problem or 'no MX records'}; we are not its backup MX"
        hosts = sorted(str(r.exchange).rstrip(".").lower() for r in answer)
        if not own & set(hosts):
            return (f"mx: {name}: MX {', '.join(hosts) or '(none)'} names none of our hosts "
                    f"({', '.join(sorted(own))})")
        return ""

    async def run():
        return await asyncio.gather(*(one(n) for n in sorted(config.domains)))
    report.problems.extend(p for p in asyncio.run(run()) if p)


STALE_FORWARD = 300.0   # seconds a release may wait for a peer before it is a problem


def _cluster(od: OnDemand, report: Report) -> None:
    cluster = od.config.cluster
    if cluster is None:
        return
    report.checks.append("cluster")
    for peer in cluster.peers:
        why = _connectable(HostPort(peer.host, peer.port), timeout=5.0)
        if why:
            report.problems.append(f"cluster: peer {peer}: no SMTP connection ({why})")
    waiting: dict[str, list] = {}
    now = time.time()
    for fwd in od.ledger.forwards():
        if now - fwd.since > STALE_FORWARD:
            waiting.setdefault(fwd.peer, []).append(fwd)
    for peer, rows in sorted(waiting.items()):
        report.problems.append(
            f"cluster: peer {peer}: {len(rows)} release(s) not acknowledged for over "
            f"{STALE_FORWARD:.0f} s ({', '.join(sorted(f.domain for f in rows)[:5])}); "
            f"last error: {rows[0].last_error or '-'}")


def check(od: OnDemand) -> Report:
    report = Report()
    _postfix(od, report)
    _daemons(od.config, report)
    _ledger(od, report)
    _mx(od.config, od.own_hosts(), report)
    _cluster(od, report)
    return report
