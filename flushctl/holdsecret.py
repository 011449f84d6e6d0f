"""This installation's secret for the X-OnDemand-Hold header.

The milter adds ``X-OnDemand-Hold: SECRET`` to every message it holds;
Postfix's header_checks put any message carrying it back on hold when
``postsuper -r`` requeues it.  Nobody outside knows the secret, so no
sender can get a message held by forging the header.  It lives in the
state directory; the header_checks table that apply writes names it too,
and is where a lost state directory gets it back from (a new secret would
strand every message held under the old one).
"""

from __future__ import annotations

import os
import re
import secrets

FILENAME = "hold-secret"
_IN_MAP = re.compile(r"^/\^X-OnDemand-Hold: ([0-9a-f]{16,64})\$/", re.MULTILINE)


def stored(state_directory: str) -> str:
    """The secret kept in the state directory, or ''."""
    try:
        with open(os.path.join(state_directory, FILENAME)) as fh:
            return fh.read().strip()
    except FileNotFoundError:
        return ""


def in_table(map_path: str) -> str:
    """The secret named by apply's header_checks table, or ''."""
    try:
        with open(map_path) as fh:
            match = _IN_MAP.search(fh.read())
    except FileNotFoundError:
        return ""
    return match.group(1) if match else ""


def read(state_directory: str, map_path: str) -> str:
    """The secret in use: from the state directory, else from the table; '' if none."""
    return stored(state_directory) or in_table(map_path)


def new() -> str:
    return secrets.token_hex(16)


def save(state_directory: str, secret: str) -> None:
    os.makedirs(state_directory, mode=0o750, exist_ok=True)
    path = os.path.join(state_directory, FILENAME)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secret + "\n")
        os.replace(path + ".tmp", path)
    except BaseException:
        os.unlink(path + ".tmp")
        raise
