"""Commands on a domain's held mail: flush (release now), pause, resume, purge, return, sweep."""

from __future__ import annotations

import sys

import click

from flushctl.cli.context import pass_ctx
from flushctl.cli.errors import EXIT_PAUSED, EXIT_STILL_HELD, EXIT_UNREACHABLE, CliError, guard
from flushctl.cli.status import fmt_time


def say(name: str, outcome, wait: bool) -> bool:
    """`flush`'s words and exit code for a release's outcome (here only):
    True when there is something to wait for."""
    from flushctl.heldmail.outcome import BACKING_OFF, NOTHING, NOWHERE, PAUSED, UNREACHABLE
    refused = {PAUSED: EXIT_PAUSED, UNREACHABLE: EXIT_UNREACHABLE, NOWHERE: EXIT_UNREACHABLE,
               BACKING_OFF: EXIT_UNREACHABLE}.get(outcome.kind)
    if refused is not None:
        raise CliError(outcome.detail, refused)
    if outcome.forwarded:
        click.echo(f"{name}: sent on to {outcome.forwarded} peer(s) as ETRN (by the gateway)")
    if outcome.shared:
        click.echo(f"{name}: a release started {fmt_time(outcome.since)} "
                   f"({outcome.by}) answers for this one")
        return wait
    if outcome.kind == NOTHING and outcome.on_the_way:
        click.echo(f"{name}: {outcome.on_the_way} message(s) already on their way "
                   "(an earlier release)")
        return wait
    if outcome.kind == NOTHING:
        click.echo(f"{name}: nothing held")
        return False
    click.echo(f"{name}: released {outcome.released} message(s) to {outcome.target}")
    for route, text in outcome.unreachable:
        click.echo(f"{name}: {route}: not released, its server does not answer ({text})")
    if outcome.unreachable_more:
        click.echo(f"{name}: {outcome.unreachable_more} more destination(s) not released, "
                   "their servers do not answer")
    return wait


@click.command()
@click.argument("domain")
@click.option("--wait", is_flag=True, help="wait until nothing is held")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=600.0, show_default=True,
              metavar="SECONDS", help="with --wait: give up after this long")
@pass_ctx
@guard
def flush(ctx, domain, wait, timeout):
    """Release the domain's held mail now (after checking its server answers).
    As root it releases itself; anyone else in the helper's group asks the
    release helper (`flushctl helper`)."""
    import os

    from flushctl.heldmail.outcome import Outcome
    from flushctl.heldmail.release import wait_for
    dom = ctx.domain(domain)
    name = dom.name
    if os.geteuid() == 0:
        od = ctx.heldmail
        outcome = od.flush(dom, trigger="admin")

        def step():
            return od.wait_step(dom)
    else:
        from flushctl.privsep import client
        from flushctl.privsep import wire
        channel = wire.Channel(client.connect(ctx.config, "admin"))
        try:
            outcome = Outcome.from_json(channel.call({"op": "flush", "domain": name}))
        except ValueError as exc:   # a helper of another version
            raise CliError(f"the release helper's answer: {exc}; restart it") from None

        def step():
            reply = channel.call({"op": "wait", "domain": name})
            return reply["present"], reply["verdict"]
    if not say(name, outcome, wait):
        return
    if sys.stderr.isatty():
        total = max(outcome.released, 1)
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


@click.command()
@click.argument("domain")
@pass_ctx
@guard
def pause(ctx, domain):
    """Stop every release of the domain's mail until `resume`."""
    dom = ctx.domain(domain)
    name = dom.name
    reheld = ctx.heldmail.pause(dom)
    click.echo(f"{name}: paused" + (f" ({reheld} waiting message(s) put back on hold)"
                                    if reheld else ""))


@click.command()
@click.argument("domain")
@pass_ctx
@guard
def resume(ctx, domain):
    """Allow releases again."""
    dom = ctx.domain(domain)
    name = dom.name
    ctx.heldmail.resume(dom)
    click.echo(f"{name}: resumed")


@click.command()
@click.argument("domain")
@click.option("--yes", is_flag=True, help="really delete the mail")
@pass_ctx
@guard
def purge(ctx, domain, yes):
    """Delete the domain's held mail (needs --yes)."""
    name = ctx.domain_or_removed(domain)
    if not yes:
        raise CliError(f"purge deletes every held message for {name}; add --yes to do it", 2)
    count = ctx.heldmail.purge(name)
    click.echo(f"{name}: deleted {count} message(s)")


@click.command("return")
@click.argument("domain")
@click.option("--refused", is_flag=True,
              help="only mail the customer's server refused (5xx)")
@pass_ctx
@guard
def return_(ctx, domain, refused):
    """Return the domain's held mail to its senders (Postfix's own DSN, quoting
    the customer server's reply for refused mail)."""
    name = ctx.domain_or_removed(domain)
    count = ctx.heldmail.return_to_senders(name, refused_only=refused)
    what = "refused message(s)" if refused else "message(s)"
    click.echo(f"{name}: returned {count} {what} to their senders")


@click.command()
@pass_ctx
@guard
def sweep(ctx):
    """One pass of the keeper (the poller runs it every few seconds): take in
    mail for customers the milter never saw, put mail that failed after a
    release back on hold."""
    from flushctl.heldmail.keeper import Keeper
    done = Keeper(ctx.heldmail, notify=False).tick()
    for domain, count in sorted(done["taken_in"].items()):
        click.echo(f"{domain}: took in {count}")
    for domain, result in done["swept"].items():
        click.echo(f"{domain}: reheld {result['reheld']}, in flight {result['in_flight']}")
    for domain, count in sorted(done["returned"].items()):
        click.echo(f"{domain}: returned {count} refused message(s) to their senders")
    if done["errors"]:
        raise CliError("; ".join(done["errors"]))
