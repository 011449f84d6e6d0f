"""Postfix's socketmap protocol, served from the live ODMR sessions.

transport_maps asks ``pipemap:{hash:odmr_domains, socketmap:unix:PATH:odmr}``
for ODMR domains only (the hash table passes on nothing else).  While a
customer's session is turned around, its domains answer
``odmr:[127.0.0.1]:PORT`` (the session's relay); otherwise the on-demand
transport, deferred like every customer domain's (never NOTFOUND: that
would be Postfix's default transport, to the domain's MX: this host).

A request is one netstring, ``NAME SP KEY``; the answer is one netstring,
``OK value``, ``NOTFOUND ``, ``TEMP reason`` or ``PERM reason``.
"""

from __future__ import annotations

import asyncio
import logging
import os

log = logging.getLogger("flushctl.odmr")

MAX_NETSTRING = 10_000        # Postfix's socketmap_max_reply_size is 100000; keys are short
IDLE = 300.0                  # seconds a silent map client is kept


class Malformed(ValueError):
    pass


def parse_netstring(buffer: bytes) -> tuple[bytes | None, bytes]:
    """(one netstring's payload, the rest), or (None, buffer) while it is
    incomplete; ``Malformed`` for what is not a netstring."""
    colon = buffer.find(b":")
    if colon < 0:
        if len(buffer) > 6 or not buffer.isdigit() and buffer:
            raise Malformed("no length")
        return None, buffer
    digits = buffer[:colon]
    if not digits.isdigit() or len(digits) > 6 or (len(digits) > 1 and digits[0:1] == b"0"):
        raise Malformed("bad length")
    size = int(digits)
    if size > MAX_NETSTRING:
        raise Malformed("too long")
    end = colon + 1 + size
    if len(buffer) < end + 1:
        return None, buffer
    if buffer[end:end + 1] != b",":
        raise Malformed("no comma")
    return buffer[colon + 1:end], buffer[end + 1:]


def netstring(payload: str) -> bytes:
    data = payload.encode()
    return str(len(data)).encode() + b":" + data + b","


def answer(request: bytes, lookup) -> str:
    """The answer to one request: ``lookup(key)`` gives the value, never None."""
    name, _, key = request.decode("utf-8", "replace").partition(" ")
    if name != "odmr" or not key:
        return "PERM not an ODMR lookup"
    return "OK " + lookup(key.lower().rstrip("."))


async def serve(path: str, lookup) -> asyncio.AbstractServer:
    """Listen on the unix socket ``path`` (replacing a stale one), mode
    0660: the directory (the ODMR daemon's, group postfix) decides who reaches it."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = b""
        try:
            while True:
                request, buffer = parse_netstring(buffer)
                if request is None:
                    chunk = await asyncio.wait_for(reader.read(4096), IDLE)
                    if not chunk:
                        return
                    buffer += chunk
                    continue
                writer.write(netstring(answer(request, lookup)))
                await writer.drain()
        except (Malformed, asyncio.TimeoutError, ConnectionError) as exc:
            log.debug("event=map_client_gone reason=%r", str(exc) or type(exc).__name__)
        finally:
            writer.close()

    old = os.umask(0o117)
    try:
        return await asyncio.start_unix_server(client, path)
    finally:
        os.umask(old)
