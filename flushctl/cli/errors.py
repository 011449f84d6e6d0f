"""How the command line fails: ``Error: ...`` on stderr and the documented exit codes.

0 done; 1 error (bad config, Postfix failed, unknown domain; `check`
found a problem); 2 usage; 3 not released, the customer's server does
not answer; 4 not released, the domain is paused; 5 ``flush --wait``
ended with mail still held.
"""

from __future__ import annotations

import functools
import sqlite3

import click

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


def guard(fn):
    """Turn library errors into `Error: ...` and the documented exit codes."""
    from flushctl.privsep.errors import PrivsepError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PostfixError as exc:
            raise CliError(str(exc)) from None
        except UnknownDomain as exc:
            raise CliError(str(exc)) from None
        except sqlite3.Error as exc:
            raise CliError(f"ledger: {exc}") from None
        except PrivsepError as exc:
            raise CliError(str(exc)) from None
    return wrapper
