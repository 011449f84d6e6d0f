"""The `flushctl` command line: a thin click shell over ``HeldMail``.

Data goes to stdout, errors to stderr as ``Error: ...``.  Exit codes:
0 done; 1 error (bad config, Postfix failed, unknown domain; `check`
found a problem); 2 usage;
3 not released, the customer's server does not answer; 4 not released,
the domain is paused; 5 ``flush --wait`` ended with mail still held.
"""

from __future__ import annotations

import json
import sqlite3
import logging
import sys
import time

import click

from flushctl import config as config_mod
from flushctl import names
from flushctl.config import UnknownDomain
from flushctl.mta.commands import PostfixError

EXIT_ERROR = 1
EXIT_UNREACHABLE = 3
EXIT_PAUSED = 4
EXIT_STILL_HELD = 5


class CliError(click.ClickException):
    def __init__(self, message: str, exit_code: int = EXIT_ERROR):
        super().__init__(message)
        self.exit_code = exit_code


def _fmt_time(value: float | None) -> str:
    if value is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))


def _fmt_bool(value: bool | None) -> str:
    return "unknown" if value is None else ("yes" if value else "no")


class Context:
    def __init__(self, config_path: str | None):
        self.path = config_mod.resolve_path(config_path)
        self._config = None
        self._ondemand = None

    @property
    def config(self) -> config_mod.Config:
        if self._config is None:
            try:
                self._config = config_mod.load(self.path)
            except config_mod.ConfigError as exc:
                raise CliError(str(exc)) from None
        return self._config

    @property
    def ondemand(self):
        if self._ondemand is None:
            from flushctl.heldmail.library import HeldMail
            try:
                self._ondemand = HeldMail(self.config)
            except (OSError, sqlite3.Error) as exc:
                raise CliError(f"cannot open the ledger in {self.config.state_directory}: {exc}")
        return self._ondemand

    def domain(self, name: str) -> str:
        try:
            return self.config.domain(name).name
        except UnknownDomain as exc:
            raise CliError(str(exc)) from None

    def domain_or_removed(self, name: str) -> str:
        """A configured domain, or a removed one whose mail is still held."""
        try:
            return self.config.domain(name).name
        except UnknownDomain as exc:
            try:
                key = names.domain(name)
            except ValueError:
                raise CliError(str(exc)) from None
            if key in self.ondemand.removed_domains():
                return key
            raise CliError(str(exc)) from None


pass_ctx = click.make_pass_decorator(Context)


def _guard(fn):
    """Turn library errors into `Error: ...` and the documented exit codes."""
    import functools

    from flushctl.heldmail.library import Refused
    from flushctl.privsep.core import PrivsepError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Refused as exc:
            code = EXIT_PAUSED if exc.code == "paused" else EXIT_UNREACHABLE
            raise CliError(str(exc), code) from None
        except PostfixError as exc:
            raise CliError(str(exc)) from None
        except UnknownDomain as exc:
            raise CliError(str(exc)) from None
        except sqlite3.Error as exc:
            raise CliError(f"ledger: {exc}") from None
        except PrivsepError as exc:
            raise CliError(str(exc)) from None
    return wrapper


DAEMONS = frozenset({"milter", "gateway", "helper", "poller"})   # they log what they do


class KeyValueFormatter(logging.Formatter):
    """One line per event: ``ts=... level=... src=... event=... key=value ...``.

    Our log calls write ``event=NAME key=value ...``; this adds when
    (UTC), how bad and which part; a traceback stays on the same line.
    """

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        src = record.name.removeprefix("flushctl.")
        line = (f"ts={ts}.{int(record.msecs):03d}Z level={record.levelname.lower()} "
                f"src={src} {record.getMessage()}")
        if record.exc_info:
            line += " traceback=" + json.dumps(self.formatException(record.exc_info))
        return line.replace("\n", "\\n")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="PATH",
              help=f"config file (default: ${config_mod.ENV_VAR}, else {config_mod.DEFAULT_PATH})")
@click.option("--log-level", default=None,
              type=click.Choice(["debug", "info", "warning", "error"]),
              help="log lines on stderr from this level up (default: info for the "
                   "daemons, warning for commands, whose outcome is their output)")
@click.pass_context
def main(ctx, config_path, log_level):
    """SMTP-on-demand for Postfix: hold a customer's mail while it is offline."""
    if log_level is None:
        log_level = "info" if ctx.invoked_subcommand in DAEMONS else "warning"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    logging.basicConfig(level=log_level.upper(), handlers=[handler])
    ctx.obj = Context(config_path)


@main.command()
@click.option("--dry-run", is_flag=True, help="show what would change, change nothing")
@click.option("--no-reload", is_flag=True,
              help="leave the reload of a running Postfix to the caller")
@click.option("--release-removed", "removed", flag_value="release",
              help="mail held for domains no longer configured: deliver it as ordinary mail")
@click.option("--purge-removed", "removed", flag_value="purge",
              help="mail held for domains no longer configured: delete it")
@click.option("--keep-removed", "removed", flag_value="keep",
              help="mail held for domains no longer configured: keep it held (status shows it)")
@pass_ctx
@_guard
def apply(ctx, dry_run, no_reload, removed):
    """Make the Postfix instance serve the configured domains.

    A domain taken out of the config while mail is held for it stops the
    apply until one of the --*-removed options says what becomes of that mail."""
    from flushctl.mta.apply import ApplyError, apply as do_apply
    try:
        report = do_apply(ctx.config, dry_run=dry_run, reload=not no_reload, removed=removed)
    except ApplyError as exc:
        raise CliError(str(exc)) from None
    for line in report.lines():
        click.echo(line)


@main.command("check-config")
@click.option("--json", "as_json", is_flag=True,
              help='print a JSON object: {"path", "ok", "domains"} or {"path", "ok", "error"}')
@pass_ctx
def check_config(ctx, as_json):
    """Validate the config file and say so (exit 1 if it is not valid)."""
    if not as_json:
        cfg = ctx.config
        click.echo(f"{cfg.path}: ok, {len(cfg.domains)} domain(s)")
        return
    try:
        cfg = config_mod.load(ctx.path)
    except config_mod.ConfigError as exc:
        click.echo(json.dumps({"path": ctx.path, "ok": False, "error": str(exc)}))
        raise SystemExit(EXIT_ERROR) from None
    click.echo(json.dumps({"path": cfg.path, "ok": True, "domains": sorted(cfg.domains)}))


@main.command()
@pass_ctx
def milter(ctx):
    """Run the milter (foreground, until SIGTERM)."""
    from flushctl_milter.app import MilterSetupError, run
    from flushctl.privsep.core import PrivsepError
    try:
        run(ctx.config, ctx.ondemand)
    except (PostfixError, PrivsepError, MilterSetupError) as exc:
        raise CliError(str(exc)) from None


@main.command()
@pass_ctx
def gateway(ctx):
    """Run the finger and ETRN gateway (foreground, until SIGTERM)."""
    from flushctl.gateway.main import run
    from flushctl.privsep.core import PrivsepError
    try:
        run(ctx.config)
    except PrivsepError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"gateway: cannot listen: {exc}") from None


@main.command()
@pass_ctx
def helper(ctx):
    """Run the release helper, the one daemon that stays root (foreground):
    releases for the gateway, the poller and non-root admins; the keeper."""
    from flushctl.privsep.helper import run
    from flushctl.privsep.core import PrivsepError
    try:
        run(ctx.config)
    except PrivsepError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"helper: {exc}") from None
    except sqlite3.Error as exc:
        raise CliError(f"helper: cannot open the ledger in {ctx.config.state_directory}: "
                       f"{exc}") from None


@main.command()
@click.option("--once", is_flag=True, help="one cycle, print what it did, exit")
@click.option("--json", "as_json", is_flag=True, help="with --once: print a JSON array")
@pass_ctx
@_guard
def poller(ctx, once, as_json):
    """Probe domains that hold mail; release when their server answers (foreground)."""
    from flushctl.poller.loop import run_forever, run_once
    from flushctl.privsep.core import PrivsepError
    if not once:
        try:
            run_forever(ctx.config)
        except PrivsepError as exc:
            raise CliError(str(exc)) from None
        return
    entries = run_once(ctx.ondemand)
    if as_json:
        click.echo(json.dumps([e.as_json() for e in entries], indent=2))
        return
    for e in entries:
        extra = f" ({e.released})" if e.released else ""
        click.echo(f"{e.domain:<30} {e.probe.outcome:<12} {e.action}{extra}"
                   f"  {e.probe.target} {e.probe.detail}".rstrip())


@main.command()
@click.argument("domain", required=False)
@click.option("--json", "as_json", is_flag=True, help="print a JSON array")
@click.option("--cluster", "of_cluster", is_flag=True,
              help="also what every peer of [cluster] holds (asked with finger ?DOMAIN)")
@pass_ctx
@_guard
def status(ctx, domain, as_json, of_cluster):
    """What is held, per domain (exact against Postfix's queue)."""
    od = ctx.ondemand
    rows = [od.status(ctx.domain_or_removed(domain))] if domain else od.status_all()
    if of_cluster:
        _cluster_status(ctx, rows, as_json)
        return
    if as_json:
        click.echo(json.dumps([r.as_json() for r in rows], indent=2))
        return
    click.echo(f"{'DOMAIN':<30} {'MESSAGES':>8} {'BYTES':>12} {'OLDEST':<19} "
               f"{'REACHABLE':<9} {'LAST FLUSH':<19} STATE")
    for r in rows:
        click.echo(f"{r.domain:<30} {r.messages:>8} {r.bytes:>12} {_fmt_time(r.oldest_arrival):<19} "
                   f"{_fmt_bool(r.reachable):<9} {_fmt_time(r.last_flush):<19} {_state_text(r)}")
        if domain or not r.configured:
            _status_details(r)


def _state_text(r) -> str:
    states = []
    if not r.configured:
        states.append("removed")
    if r.paused:
        states.append("paused")
    if r.refused:
        states.append(f"refused:{r.refused}")
    if r.backoff_until:
        states.append("backing-off")
    if r.last_error and r.last_error.startswith("nowhere to deliver"):
        states.append("nowhere")
    return ",".join(states) or "-"


def _status_details(r) -> None:
    """The lines under one domain's row: why it is as it is."""
    if not r.configured:
        click.echo("  not configured any more: `flushctl return` or `purge` it, or "
                   "`flushctl apply --release-removed` delivers it as ordinary mail")
    if len(r.hosts) > 1 or (r.hosts and r.domain not in r.hosts):
        click.echo("  per host: " + ", ".join(f"{h} {n}" for h, n in r.hosts.items()))
    if r.last_flush_trigger:
        who = f" from {r.last_flush_client}" if r.last_flush_client else ""
        click.echo(f"  last flush: {r.last_flush_trigger}{who}: {r.last_flush_result}")
    if r.last_error:
        click.echo(f"  last probe: {r.last_error}")
    if r.backoff_until:
        click.echo(f"  the poller waits until {_fmt_time(r.backoff_until)}: the last "
                   "release's attempts tempfailed")
    if r.refused:
        click.echo(f"  refused by the customer's server: {r.refused} message(s); last reply: "
                   f"{r.refused_reply}")
        click.echo("  (the poller does not retry them; the customer's next finger or ETRN, "
                   "or `flushctl flush`, does; `flushctl return --refused` returns them)")


def _cluster_status(ctx, local, as_json) -> None:
    import asyncio

    from flushctl import cluster
    cfg = ctx.config
    if cfg.cluster is None:
        raise CliError(f"{cfg.path}: no [cluster] section: this host has no peers")
    rows = asyncio.run(cluster.cluster_status(cfg.cluster, local,
                                              ctx.ondemand.ledger.forwards()))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'DOMAIN':<30} {'HOST':<28} {'MESSAGES':>8} {'BYTES':>12} {'OLDEST':<19} "
               f"{'REACHABLE':<9} NOTE")
    for r in rows:
        if r["error"]:
            numbers = f"{'?':>8} {'?':>12} {'-':<19} {'-':<9} no answer: {r['error']}"
        else:
            numbers = (f"{r['messages']:>8} {r['bytes']:>12} "
                       f"{_fmt_time(r['oldest_arrival']):<19} {_fmt_bool(r['reachable']):<9}")
        note = ""
        if r["pending"]:
            p = r["pending"]
            note = (f" ETRN pending since {_fmt_time(p['since'])}, {p['attempts']} attempt(s)"
                    + (f": {p['last_error']}" if p["last_error"] else ""))
        click.echo(f"{r['domain']:<30} {r['host']:<28} {numbers}{note}".rstrip())


@main.command()
@click.argument("domain")
@click.option("--wait", is_flag=True, help="wait until nothing is held")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=600.0, show_default=True,
              metavar="SECONDS", help="with --wait: give up after this long")
@pass_ctx
@_guard
def flush(ctx, domain, wait, timeout):
    """Release the domain's held mail now (after checking its server answers).
    As root it releases itself; anyone else in the helper's group asks the
    release helper (`flushctl helper`)."""
    import os

    from flushctl.privsep.helper import release_report
    from flushctl.heldmail.library import wait_for
    name = ctx.domain(domain)
    if os.geteuid() == 0:
        od = ctx.ondemand
        report = release_report(od, name)

        def step():
            return od.wait_step(name)
    else:
        from flushctl.privsep import helper
        from flushctl.privsep import core as privsep
        channel = privsep.Channel(helper.connect(ctx.config, "admin"))
        report = channel.call({"op": "flush", "domain": name})

        def step():
            reply = channel.call({"op": "wait", "domain": name})
            return reply["present"], reply["verdict"]
    if "refused" in report:
        raise CliError(report["text"],
                       EXIT_PAUSED if report["refused"] == "paused" else EXIT_UNREACHABLE)
    if report["forwarded"]:
        click.echo(f"{name}: sent on to {report['forwarded']} peer(s) as ETRN (by the gateway)")
    if report["shared"]:
        click.echo(f"{name}: a release started {_fmt_time(report['since'])} "
                   f"({report['by']}) answers for this one")
        if not wait:
            return
    elif not report["probed"] and report["on_the_way"]:
        click.echo(f"{name}: {report['on_the_way']} message(s) already on their way "
                   "(an earlier release)")
        if not wait:
            return
    elif not report["probed"]:
        click.echo(f"{name}: nothing held")
        return
    else:
        click.echo(f"{name}: released {report['released']} message(s) to {report['target']}")
    for route, text in report["unreachable"]:
        click.echo(f"{name}: {route}: not released, its server does not answer ({text})")
    if not wait:
        return
    if sys.stderr.isatty():
        total = max(report["released"], 1)
        with click.progressbar(length=total, label=f"{name}: delivering",
                               file=sys.stderr) as bar:
            done = [0]

            def progress(remaining):
                step_by = max(0, total - remaining) - done[0]
                if step_by > 0:
                    bar.update(step_by)
                    done[0] += step_by
            ok, remaining = wait_for(step, timeout, progress)
    else:
        ok, remaining = wait_for(step, timeout)
    if not ok:
        raise CliError(f"{name}: {remaining} message(s) still held", EXIT_STILL_HELD)
    click.echo(f"{name}: nothing held")


@main.command()
@click.argument("domain")
@pass_ctx
@_guard
def pause(ctx, domain):
    """Stop every release of the domain's mail until `resume`."""
    name = ctx.domain(domain)
    reheld = ctx.ondemand.pause(name)
    click.echo(f"{name}: paused" + (f" ({reheld} waiting message(s) put back on hold)"
                                    if reheld else ""))


@main.command()
@click.argument("domain")
@pass_ctx
@_guard
def resume(ctx, domain):
    """Allow releases again."""
    name = ctx.domain(domain)
    ctx.ondemand.resume(name)
    click.echo(f"{name}: resumed")


@main.command()
@click.argument("domain")
@click.option("--yes", is_flag=True, help="really delete the mail")
@pass_ctx
@_guard
def purge(ctx, domain, yes):
    """Delete the domain's held mail (needs --yes)."""
    name = ctx.domain_or_removed(domain)
    if not yes:
        raise CliError(f"purge deletes every held message for {name}; add --yes to do it", 2)
    count = ctx.ondemand.purge(name)
    click.echo(f"{name}: deleted {count} message(s)")


@main.command("return")
@click.argument("domain")
@click.option("--refused", is_flag=True,
              help="only mail the customer's server refused (5xx)")
@pass_ctx
@_guard
def return_(ctx, domain, refused):
    """Return the domain's held mail to its senders (Postfix's own DSN, quoting
    the customer server's reply for refused mail)."""
    name = ctx.domain_or_removed(domain)
    count = ctx.ondemand.return_to_senders(name, refused_only=refused)
    what = "refused message(s)" if refused else "message(s)"
    click.echo(f"{name}: returned {count} {what} to their senders")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print a JSON object")
@pass_ctx
@_guard
def check(ctx, as_json):
    """Is everything in place and running? One line per problem (exit 1)."""
    from flushctl.check import check as run_check
    report = run_check(ctx.ondemand)
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
    else:
        for line in report.problems:
            click.echo(line)
        if not report.problems:
            click.echo(f"all well: {', '.join(report.checks)}")
    if report.problems:
        click.get_current_context().exit(EXIT_ERROR)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print a JSON array")
@pass_ctx
def domains(ctx, as_json):
    """The configured customer domains."""
    cfg = ctx.config
    rows = []
    for name in sorted(cfg.domains):
        d = cfg.domains[name]
        rows.append({
            "domain": name,
            "relay": d.relay.nexthop if d.relay else None,
            "recipients": sorted(f"{l}@{name}" for l in d.recipients) if d.recipients else None,
            "quota_messages": d.quota_messages,
            "quota_bytes": d.quota_bytes,
            "flush_from": [str(n) for n in d.flush_from],
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['domain']:<30} relay={r['relay'] or '(MX)'}"
                   f" recipients={len(r['recipients']) if r['recipients'] else 'any'}"
                   f" quota={r['quota_messages'] or '-'}/{r['quota_bytes'] or '-'}")


@main.command()
@pass_ctx
@_guard
def sweep(ctx):
    """One pass of the keeper (the poller runs it every few seconds): take in
    mail for customers the milter never saw, put mail that failed after a
    release back on hold."""
    from flushctl.heldmail.keeper import Keeper
    done = Keeper(ctx.ondemand).tick()
    for domain, count in sorted(done["taken_in"].items()):
        click.echo(f"{domain}: took in {count}")
    for domain, result in done["swept"].items():
        click.echo(f"{domain}: reheld {result['reheld']}, in flight {result['in_flight']}")
    for domain, count in sorted(done["returned"].items()):
        click.echo(f"{domain}: returned {count} refused message(s) to their senders")
