"""`flushctl status`: what is held, per domain (and per peer of the cluster), as a table or JSON."""

from __future__ import annotations

import time

import click

from flushctl.bulk import collector_paused
from flushctl.cli.context import json_lines, json_rows, pass_ctx, row_encoder, string_encoder
from flushctl.cli.errors import CliError, guard
from flushctl.heldmail.status import IdleStatus


def status_json(rows) -> str:
    """The rows as ``json_rows`` writes them; an idle domain's row (most of
    100,000) from one template with its name put in, not encoded anew."""
    encode = row_encoder()
    quote = string_encoder()
    marked = encode(IdleStatus.of("\0").as_json())
    head, tail = marked.split(quote("\0"), 1)
    return json_lines(head + quote(r.domain) + tail if type(r) is IdleStatus
                      else encode(r.as_json()) for r in rows)


def fmt_time(value: float | None) -> str:
    if value is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))


def fmt_bool(value: bool | None) -> str:
    return "unknown" if value is None else ("yes" if value else "no")


@click.command()
@click.argument("domain", required=False)
@click.option("--json", "as_json", is_flag=True, help="print a JSON array")
@click.option("--cluster", "of_cluster", is_flag=True,
              help="also what every peer of [cluster] holds (asked with finger ?DOMAIN)")
@pass_ctx
@guard
def status(ctx, domain, as_json, of_cluster):
    """What is held, per domain (one domain: exact against Postfix's queue;
    every domain, from 1,000 held: as the release helper last checked the
    ledger against it, at most about a minute ago)."""
    od = ctx.heldmail
    rows = [od.status(ctx.domain_or_removed(domain))] if domain else od.status_all()
    if of_cluster:
        _cluster_status(ctx, rows, as_json)
        return
    if as_json:
        with collector_paused():   # 100,000 rows' dicts: see flushctl.bulk
            text = status_json(rows)
        click.echo(text)
        return
    # one write of all the lines: a call per line took 0.4 s at 100,000 domains
    lines = [f"{'DOMAIN':<30} {'MESSAGES':>8} {'BYTES':>12} {'OLDEST':<19} "
             f"{'REACHABLE':<9} {'LAST FLUSH':<19} STATE"]
    for r in rows:
        lines.append(f"{r.domain:<30} {r.messages:>8} {r.bytes:>12} "
                     f"{fmt_time(r.oldest_arrival):<19} {fmt_bool(r.reachable):<9} "
                     f"{fmt_time(r.last_flush):<19} {_state_text(r)}")
        if domain or not r.configured:
            lines.extend(_status_details(r))
    click.echo("\n".join(lines))


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


def _status_details(r) -> list[str]:
    """The lines under one domain's row: why it is as it is."""
    lines = []
    if not r.configured:
        lines.append("  not configured any more: `flushctl return` or `purge` it, or "
                     "`flushctl apply --release-removed` delivers it as ordinary mail")
    if len(r.hosts) > 1 or (r.hosts and r.domain not in r.hosts):
        lines.append("  per host: " + ", ".join(f"{h} {n}" for h, n in r.hosts.items()))
    if r.last_flush_trigger:
        who = f" from {r.last_flush_client}" if r.last_flush_client else ""
        lines.append(f"  last flush: {r.last_flush_trigger}{who}: {r.last_flush_result}")
    if r.last_error:
        lines.append(f"  last probe: {r.last_error}")
    if r.backoff_until:
        lines.append(f"  the poller waits until {fmt_time(r.backoff_until)}: the last "
                     "release's attempts tempfailed")
    if r.refused:
        lines.append(f"  refused by the customer's server: {r.refused} message(s); last reply: "
                     f"{r.refused_reply}")
        lines.append("  (the poller does not retry them; the customer's next finger or ETRN, "
                     "or `flushctl flush`, does; `flushctl return --refused` returns them)")
    return lines


def _cluster_status(ctx, local, as_json) -> None:
    import asyncio

    from flushctl import cluster
    cfg = ctx.config
    if cfg.cluster is None:
        raise CliError(f"{cfg.path}: no [cluster] section: this host has no peers")
    rows = asyncio.run(cluster.cluster_status(cfg.cluster, local,
                                              ctx.heldmail.ledger.forwards()))
    if as_json:
        click.echo(json_rows(rows))
        return
    click.echo(f"{'DOMAIN':<30} {'HOST':<28} {'MESSAGES':>8} {'BYTES':>12} {'OLDEST':<19} "
               f"{'REACHABLE':<9} NOTE")
    for r in rows:
        if r["error"]:
            numbers = f"{'?':>8} {'?':>12} {'-':<19} {'-':<9} no answer: {r['error']}"
        else:
            numbers = (f"{r['messages']:>8} {r['bytes']:>12} "
                       f"{fmt_time(r['oldest_arrival']):<19} {fmt_bool(r['reachable']):<9}")
        note = ""
        if r["pending"]:
            p = r["pending"]
            note = (f" ETRN pending since {fmt_time(p['since'])}, {p['attempts']} attempt(s)"
                    + (f": {p['last_error']}" if p["last_error"] else ""))
        click.echo(f"{r['domain']:<30} {r['host']:<28} {numbers}{note}".rstrip())
