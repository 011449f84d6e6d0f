"""The `flushctl` group: its options, its log lines, and the commands it holds.

A thin click shell over ``HeldMail``: data goes to stdout, errors to
stderr as ``Error: ...`` with the exit codes of ``flushctl.cli.errors``.
The commands live in modules by job (``setup``, ``daemons``, ``status``,
``held``, ``users``); daemons' modules are imported only inside their commands.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import click

from flushctl import config as config_mod
from flushctl.cli import daemons, held, setup, status, users
from flushctl.cli.context import Context

DAEMONS = frozenset({"milter", "gateway", "helper", "poller", "odmr", "portal"})   # they log what they do


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


for _command in (setup.apply, setup.check_config, setup.check, setup.domains,
                 daemons.milter, daemons.gateway, daemons.helper, daemons.poller, daemons.odmr,
                 daemons.portal,
                 status.status,
                 held.flush, held.pause, held.resume, held.purge, held.return_, held.sweep,
                 users.user):
    main.add_command(_command)
del _command
