"""SIGTERM and SIGINT for the daemons, from their first instruction on.

A daemon binds its ports, reads Postfix's settings, may drop root and may
wait for the release helper before its event loop runs and takes the
signals with ``add_signal_handler``.  A stop asked for in that window (a
supervisor stopping a daemon that has just started, or one still waiting
for the helper) would otherwise end it by the signal's default action,
which a supervisor reads as a failure.  ``catch`` makes it a clean exit
(status 0, ``finally`` blocks run); ``on_stop`` then hands the signals to
the loop, which stops the daemon in order.
"""

from __future__ import annotations

import asyncio
import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _exit(signum, frame) -> None:
    raise SystemExit(0)


def catch() -> None:
    """A stop asked for from now on, until ``on_stop``, exits cleanly."""
    for sig in SIGNALS:
        signal.signal(sig, _exit)


def on_stop(loop: asyncio.AbstractEventLoop, callback) -> None:
    """Call ``callback`` in ``loop`` on SIGTERM/SIGINT."""
    for sig in SIGNALS:
        loop.add_signal_handler(sig, callback)
