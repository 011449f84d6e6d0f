"""`flushctl check`: is everything in place and running? One line per problem.

Checks, each independent of the others:
- Postfix runs, and its settings are what `flushctl apply` wants;
- the milter's socket accepts connections, the gateway listens on its
  finger and policy ports (bound by the release helper, so a gateway
  process for this config must run too), so does the release helper on
  its socket, and a poller process runs for this config (psutil) and
  serves the metrics endpoint;
- the ledger agrees with the queue (held messages of ours it lacks,
  held mail for customers that is not ours, held mail of domains no
  longer configured);
- each customer domain's MX records (dnspython) name one of our hosts,
  and leave somewhere to deliver by Postfix's MX rule (this host is not
  the best MX);
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

from flushctl.config import Config, HostPort, Listen
from flushctl.heldmail.library import HeldMail
from flushctl.mta.commands import PostfixError
from flushctl.poller.prober import NOWHERE, describe


def _view(targets) -> list:
    """What a resolver found, comparable: hosts and their address sets, in order."""
    return [(h, p, sorted(a)) for h, p, a in targets]


def _servers(config: Config) -> str:
    return ", ".join(str(n) for n in config.nameservers)


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


def _postfix(od: HeldMail, report: Report) -> None:
    from flushctl.mta.apply import ApplyError, apply
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
    listening = 0
    for name, where in (("milter", config.milter_listen), ("gateway finger", config.finger_listen),
                        ("gateway policy", config.policy_listen)):
        report.checks.append(name)
        why = _connectable(where)
        if why:
            spec = where.milter_spec if isinstance(where, Listen) else str(where)
            report.problems.append(f"{name}: nothing accepts connections on {spec} ({why})")
        elif name.startswith("gateway"):
            listening += 1
    # the helper holds the gateway's listeners: they accept with no gateway to answer
    if listening and not _daemon_running(config, "gateway"):
        report.problems.append(f"gateway: no `flushctl gateway` process for {config.path}: "
                               "the helper holds its sockets, queries wait unanswered")
    if config.odmr is not None:
        _odmr(config, report)
    if config.portal is not None:
        report.checks.append("portal")
        why = _connectable(config.portal.listen)
        if why:
            report.problems.append(f"portal: nothing accepts connections on "
                                   f"{config.portal.listen} ({why}): is `flushctl portal` "
                                   "running?")
    if config.domains_where("relay_editable"):
        from flushctl.mta.relay_change import live
        report.checks.append("relays")
        if not live(config):
            report.problems.append(f"relays: {config.path} is not the config the last "
                                   "`flushctl apply` made live: customers' changes of relay "
                                   "are refused until it is applied (and the helper restarted)")
    _notify(config, report)
    report.checks.append("helper")
    why = _connectable(Listen("unix", path=config.helper_socket))
    if why:
        report.problems.append(f"helper: nothing accepts connections on "
                               f"{config.helper_socket} ({why}): no release but root's, "
                               "no keeper")
    report.checks.append("poller")
    if not _daemon_running(config, "poller"):
        report.problems.append(f"poller: no `flushctl poller` process for {config.path}")
    elif config.metrics_listen is not None:
        report.checks.append("metrics")
        why = _connectable(config.metrics_listen)
        if why:
            report.problems.append(f"metrics: the poller does not serve {config.metrics_listen} "
                                   f"({why}); see its log")


def _notify(config: Config, report: Report) -> None:
    """Notices: the webhook's secret readable (the helper signs with it);
    links only with the portal's public address."""
    settings = config.notify
    if settings.webhook_secret_file and config.domains_where("notify_webhook"):
        report.checks.append("notify")
        path = settings.webhook_secret_file
        try:
            with open(path, "rb") as fh:
                st = os.fstat(fh.fileno())
                if not fh.read().strip():
                    report.problems.append(f"notify: {path} is empty: webhooks would be "
                                           "signed with no secret")
            if st.st_uid != 0 or st.st_mode & 0o077:
                report.problems.append(f"notify: {path} must be root's alone (mode 0600): "
                                       "whoever reads it can sign notices")
        except OSError as exc:
            report.problems.append(f"notify: cannot read webhook_secret_file: {exc}")


def _odmr(config: Config, report: Report) -> None:
    """The ODMR daemon: its ports, and the relay addresses Postfix's odmr
    transport connects to (without them, no session gets any mail)."""
    report.checks.append("odmr")
    settings = config.odmr
    for where in (*settings.listen, *settings.tls_listen):
        host = "127.0.0.1" if where.host == "0.0.0.0" else \
            "::1" if where.host == "::" else where.host
        why = _connectable(HostPort(host, where.port))
        if why:
            report.problems.append(f"odmr: nothing accepts connections on {where} ({why}): "
                                   "is `flushctl odmr` running?")
    from flushctl.mta.routing import odmr_address
    for address in sorted({odmr_address(d.name) for d in config.domains_where("odmr")}):
        why = _connectable(HostPort(address, settings.relay_port))
        if why:
            report.problems.append(f"odmr: nothing answers the relay {address}:"
                                   f"{settings.relay_port} ({why}): no session can take its "
                                   "domain's mail until `flushctl odmr` runs")
            break


def _ledger(od: HeldMail, report: Report) -> None:
    report.checks.append("ledger")
    try:
        taken = od.take_in()   # ours but unrecorded: record them now, as the keeper would
    except (OSError, PostfixError) as exc:
        report.problems.append(f"ledger: cannot read the queue: {exc}")
        return
    if taken:
        report.problems.append(f"ledger: lacked {sum(taken.values())} held message(s) "
                               "of ours; recorded them from the queue")
    for dom, count in sorted(od.ledger.foreign_for_customers().items()):
        report.problems.append(
            f"ledger: {dom}: {count} message(s) in the hold queue carry no tag of ours "
            "(held by another filter or by hand); `postsuper -H` them and flushctl "
            "holds them as its own")
    for dom in sorted(od.config.domains):
        od.snapshot(dom)  # prunes rows whose message is gone
    for status in od.status_all(exact=True):
        if not status.configured:
            report.problems.append(
                f"ledger: {status.domain}: {status.messages} held message(s), "
                f"{status.bytes} bytes, of a domain no longer configured: `flushctl "
                f"return` or `purge` it, or `flushctl apply --release-removed`")


def _mx(od: HeldMail, report: Report) -> None:
    report.checks.append("mx")
    config = od.config
    own = od.own_hosts()
    prober = od.prober
    theirs = od.postfix_prober()
    # the destinations of held mail, for the resolver comparison
    held_routes: dict[str, set[str]] = {}
    for dom, routes in od.ledger.unrefused_routes().items():
        held_routes.setdefault(dom, set()).update(routes)

    async def one(name: str) -> list[str]:
        dom = od.domain(name)   # its customer's relay, if it chose one
        answer, problem = await prober.query(name, "MX")
        if answer is None:
            return [f"mx: {name}: {problem or 'no MX records'}; we are not its backup MX"]
        hosts = sorted(str(r.exchange).rstrip(".").lower() for r in answer)
        found = await asyncio.gather(*(prober.addresses(h) for h in hosts))
        ours = own & set(hosts) or {h for h, (addrs, _) in zip(hosts, found)
                                    if set(addrs) & prober.own_addresses}
        problems = []
        if not ours:
            problems.append(f"mx: {name}: MX {', '.join(hosts) or '(none)'} names none of "
                            f"our hosts ({', '.join(sorted(own))})")
        if dom.odmr:   # its mail goes over its customer's session, never to its MX
            return problems
        for route in dict.fromkeys([name, *sorted(dom.hosts), *sorted(held_routes.get(name, ()))]):
            targets, outcome, why = await prober.route_targets(dom, route)
            if outcome == NOWHERE:
                problems.append(f"mx: {route}: nowhere to deliver: {why}; its mail stays "
                                "held until its MX records change")
            if theirs is not None and route in held_routes.get(name, ()):
                other, _, other_why = await theirs.route_targets(dom, route)
                if _view(other) != _view(targets):
                    problems.append(
                        f"mx: {route}: the poller's resolver ({_servers(config)}) finds "
                        f"{describe(targets) if targets else why}; Postfix's (resolv.conf) "
                        f"finds {describe(other) if other else other_why}: releases follow "
                        f"Postfix's, and hold what it cannot route")
        return problems

    async def run():
        return await asyncio.gather(*(one(n) for n in sorted(config.domains)))
    for problems in asyncio.run(run()):
        report.problems.extend(problems)


STALE_FORWARD = 300.0   # seconds a release may wait for a peer before it is a problem


def _cluster(od: HeldMail, report: Report) -> None:
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


def check(od: HeldMail) -> Report:
    report = Report()
    _postfix(od, report)
    _daemons(od.config, report)
    _ledger(od, report)
    _mx(od, report)
    _cluster(od, report)
    return report
