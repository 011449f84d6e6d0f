"""`flushctl user`: the customers' logins (ODMR): add, passwd, del, list.

The logins live in root's store (``Config.logins_path``, see
``flushctl.logins.store``); which domains a login may take is the
config's ``[domains.X] users``.  Every command must run as root, a
password comes from standard input (one line) or, on a terminal, from a
hidden prompt, and no secret is ever printed.
"""

from __future__ import annotations

import functools
import os
import sys
import time

import click

from flushctl.cli.context import json_rows, pass_ctx
from flushctl.cli.errors import CliError
from flushctl.cli.status import fmt_time
from flushctl.config import Config, login_name
from flushctl.logins import store
from flushctl.logins.model import LoginsError

MAX_INPUT = 4096   # bytes read from standard input for a password


def _guard(fn):
    """Turn the store's errors into `Error: ...` and exit status 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LoginsError as exc:
            raise CliError(str(exc)) from None
    return wrapper


def _store_path(ctx) -> str:
    """The store's path, once it is clear that root asks."""
    if os.geteuid() != 0:
        raise CliError("must be run as root: the customers' logins are root's alone "
                       "(they hold plaintext-equivalent secrets)")
    return ctx.config.logins_path


def _user(name: str) -> str:
    try:
        return login_name(name)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _domains_of(config: Config, name: str) -> list[str]:
    return sorted(d for d, dom in config.domains.items() if name in dom.users)


def _warn(text: str) -> None:
    click.echo(f"Warning: {text}", err=True)


def _warn_if_unused(config: Config, name: str) -> None:
    if not _domains_of(config, name):
        _warn(f"no domain names {name} in its users ({config.path}): "
              "it can log in but take no mail")


def _password() -> str:
    """One line from standard input, else (on a terminal) asked twice, hidden."""
    if sys.stdin is None:
        raise CliError("no standard input to read the password from")
    if sys.stdin.isatty():
        return click.prompt("Password", hide_input=True, confirmation_prompt=True)
    raw = sys.stdin.buffer.read(MAX_INPUT + 1)
    if len(raw) > MAX_INPUT:
        raise CliError("the password on standard input is far too long")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CliError("the password on standard input is not valid UTF-8") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if "\n" in text:
        raise CliError("give the password as exactly one line on standard input")
    if not text:
        raise CliError("the password on standard input is empty")
    return text


@click.group("user")
def user():
    """The customers' logins (ODMR): add, passwd, del, list (as root)."""


@user.command("add")
@click.argument("name", metavar="USER")
@pass_ctx
@_guard
def add(ctx, name):
    """Add a login; its password from standard input (one line) or asked."""
    path = _store_path(ctx)
    name = _user(name)
    if name in store.load(path):   # said before the password is asked for
        raise CliError(f"{name}: there is a user of that name already "
                       f"(`flushctl user passwd {name}` changes its password)")
    store.add_user(path, name, _password())
    click.echo(f"{name}: added")
    _warn_if_unused(ctx.config, name)


@user.command("passwd")
@click.argument("name", metavar="USER")
@pass_ctx
@_guard
def passwd(ctx, name):
    """Change a login's password (from standard input, one line, or asked)."""
    path = _store_path(ctx)
    name = _user(name)
    if name not in store.load(path):
        raise CliError(f"{name}: no such user (`flushctl user add {name}` adds it)")
    store.set_password(path, name, _password())
    click.echo(f"{name}: password changed")
    _warn_if_unused(ctx.config, name)


@user.command("del")
@click.argument("name", metavar="USER")
@pass_ctx
@_guard
def delete(ctx, name):
    """Delete a login."""
    path = _store_path(ctx)
    name = _user(name)
    store.delete_user(path, name)
    click.echo(f"{name}: deleted")
    still = _domains_of(ctx.config, name)
    if still:
        _warn(f"{name} is still in the users of {', '.join(still)} ({ctx.config.path}): "
              "remove it there too")


@user.command("list")
@click.option("--json", "as_json", is_flag=True, help="print a JSON array")
@pass_ctx
@_guard
def list_(ctx, as_json):
    """Every login in the store or named by a domain, with its domains."""
    path = _store_path(ctx)
    cfg = ctx.config
    logins = store.load(path)
    named = {u for dom in cfg.domains.values() for u in dom.users}
    rows = []
    for name in sorted(set(logins.users) | named):
        login = logins.get(name)
        rows.append({"user": name, "domains": _domains_of(cfg, name),
                     "has_password": login is not None,
                     "changed": login.changed if login else None})
    if as_json:
        for r in rows:
            if r["changed"] is not None:
                r["changed"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r["changed"]))
        click.echo(json_rows(rows))
        return
    click.echo(f"{'USER':<24} {'PASSWORD':<8} {'CHANGED':<19} DOMAINS")
    for r in rows:
        click.echo(f"{r['user']:<24} {'yes' if r['has_password'] else 'no':<8} "
                   f"{fmt_time(r['changed']):<19} {', '.join(r['domains']) or '-'}".rstrip())
