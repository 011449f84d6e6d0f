"""Bytes passed from one socket to another until either side ends (tests and benchmarks)."""

from __future__ import annotations

import socket


def copy(src: socket.socket, dst: socket.socket, seen=None) -> None:
    """Pass what ``src`` sends on to ``dst`` (``seen(data)`` is shown each
    chunk on the way) until either ends; then both are shut down."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
            if seen is not None:
                seen(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
