"""The commands that run the daemons: milter, gateway, odmr, helper, poller (foreground).

Each imports its daemon's modules inside the command, so the rest of the
command line never loads them.
"""

from __future__ import annotations

import sqlite3

import click

from flushctl.cli.context import json_rows, pass_ctx
from flushctl.cli.errors import CliError, guard
from flushctl.mta.commands import PostfixError


@click.command()
@pass_ctx
def milter(ctx):
    """Run the milter (foreground, until SIGTERM)."""
    from flushctl_milter.app import MilterSetupError, run
    from flushctl.privsep.errors import PrivsepError
    try:
        run(ctx.config, ctx.heldmail)
    except (PostfixError, PrivsepError, MilterSetupError) as exc:
        raise CliError(str(exc)) from None


@click.command()
@pass_ctx
def gateway(ctx):
    """Run the finger and ETRN gateway (foreground, until SIGTERM)."""
    from flushctl.gateway.daemon import run
    from flushctl.privsep.errors import PrivsepError
    try:
        run(ctx.config)
    except PrivsepError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"gateway: cannot listen: {exc}") from None


@click.command()
@pass_ctx
def odmr(ctx):
    """Run the ODMR provider (RFC 2645 ATRN, port 366) (foreground, until SIGTERM)."""
    from flushctl.odmr.daemon import run
    from flushctl.privsep.errors import PrivsepError
    try:
        run(ctx.config)
    except PrivsepError as exc:
        raise CliError(str(exc)) from None
    except PostfixError as exc:
        raise CliError(f"odmr: {exc}") from None
    except OSError as exc:
        raise CliError(f"odmr: cannot listen: {exc}") from None


@click.command()
@pass_ctx
def portal(ctx):
    """Run the customers' web portal (foreground, until SIGTERM)."""
    from flushctl.portal.daemon import run
    from flushctl.privsep.errors import PrivsepError
    try:
        run(ctx.config)
    except PrivsepError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"portal: cannot listen on {ctx.config.portal.listen}: {exc}") from None


@click.command()
@pass_ctx
def helper(ctx):
    """Run the release helper, the one daemon that stays root (foreground):
    releases for the gateway, the poller and non-root admins; the keeper."""
    from flushctl.privsep.helper import run
    from flushctl.privsep.errors import PrivsepError
    try:
        run(ctx.config)
    except PrivsepError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"helper: {exc}") from None
    except sqlite3.Error as exc:
        raise CliError(f"helper: cannot open the ledger in {ctx.config.state_directory}: "
                       f"{exc}") from None


@click.command()
@click.option("--once", is_flag=True, help="one cycle, print what it did, exit")
@click.option("--json", "as_json", is_flag=True, help="with --once: print a JSON array")
@pass_ctx
@guard
def poller(ctx, once, as_json):
    """Probe domains that hold mail; release when their server answers (foreground)."""
    from flushctl.poller.loop import run_forever, run_once
    from flushctl.privsep.errors import PrivsepError
    if not once:
        try:
            run_forever(ctx.config)
        except PrivsepError as exc:
            raise CliError(str(exc)) from None
        return
    entries = run_once(ctx.heldmail)
    if as_json:
        click.echo(json_rows([e.as_json() for e in entries]))
        return
    for e in entries:
        extra = f" ({e.released})" if e.released else ""
        click.echo(f"{e.domain:<30} {e.probe.outcome:<12} {e.action}{extra}"
                   f"  {e.probe.target} {e.probe.detail}".rstrip())
