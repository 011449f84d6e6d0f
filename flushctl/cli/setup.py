"""Commands that set this host up and look it over: apply, check-config, check, domains."""

from __future__ import annotations

import json

import click

from flushctl import config as config_mod
from flushctl.cli.context import json_rows, pass_ctx
from flushctl.cli.errors import EXIT_ERROR, CliError, guard


@click.command()
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
@guard
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


@click.command("check-config")
@click.option("--json", "as_json", is_flag=True,
              help='print a JSON object: {"path", "ok", "domains"} or {"path", "ok", "error"}')
@pass_ctx
def check_config(ctx, as_json):
    """Validate the config file and say so (exit 1 if it is not valid).
    It is parsed, never taken from its compiled copy, and leaves none
    (it checks candidate files too)."""
    try:
        cfg = config_mod.load(ctx.path, compiled_copy=False)
    except config_mod.ConfigError as exc:
        if not as_json:
            raise CliError(str(exc)) from None
        click.echo(json.dumps({"path": ctx.path, "ok": False, "error": str(exc)}))
        raise SystemExit(EXIT_ERROR) from None
    if not as_json:
        click.echo(f"{cfg.path}: ok, {len(cfg.domains)} domain(s)")
        return
    click.echo(json.dumps({"path": cfg.path, "ok": True, "domains": sorted(cfg.domains)}))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="print a JSON object")
@pass_ctx
@guard
def check(ctx, as_json):
    """Is everything in place and running? One line per problem (exit 1)."""
    from flushctl.check import check as run_check
    report = run_check(ctx.heldmail)
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
    else:
        for line in report.problems:
            click.echo(line)
        if not report.problems:
            click.echo(f"all well: {', '.join(report.checks)}")
    if report.problems:
        click.get_current_context().exit(EXIT_ERROR)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="print a JSON array")
@pass_ctx
def domains(ctx, as_json):
    """The configured customer domains."""
    from flushctl.mta.relays import Overrides
    cfg = ctx.config
    overrides = Overrides(cfg)   # the relays customers chose in the portal
    rows = []
    for name in sorted(cfg.domains):
        d = overrides.domain(cfg.domains[name])
        chosen = overrides.entry(name) if d.relay_editable else None
        rows.append({
            "domain": name,
            "relay": d.relay.nexthop if d.relay else None,
            "relay_editable": d.relay_editable,
            "relay_configured": cfg.domains[name].relay.nexthop if cfg.domains[name].relay
            else None,
            "relay_chosen": d.relay_chosen,    # its customer's, set in the portal
            "relay_changed_at": chosen["at"] if chosen else None,
            "recipients": sorted(f"{l}@{name}" for l in d.recipients) if d.recipients else None,
            "quota_messages": d.quota_messages,
            "quota_bytes": d.quota_bytes,
            "flush_from": [str(n) for n in d.flush_from],
            "users": list(d.users),
            "odmr": d.odmr,
        })
    if as_json:
        click.echo(json_rows(rows))
        return
    for r in rows:
        by = " (the customer's choice)" if r["relay_chosen"] else ""
        click.echo(f"{r['domain']:<30} relay={'(ODMR)' if r['odmr'] else r['relay'] or '(MX)'}{by}"
                   f" recipients={len(r['recipients']) if r['recipients'] else 'any'}"
                   f" quota={r['quota_messages'] or '-'}/{r['quota_bytes'] or '-'}")
