"""The errors of privilege separation: what failed, and what no honest peer sends.

``PrivsepError``: binding, dropping root or reaching the release helper
failed, with a text that says so.  ``Malformed``: a request the daemon
that may take that role would never send; whoever serves the connection
stops serving it.
"""

from __future__ import annotations


class PrivsepError(Exception):
    pass


class Malformed(Exception):
    """A request the daemon that may take this role would never send."""
