"""How the unprivileged daemons and admins reach the release helper.

``connect`` opens a connection in a role (``connect_gateway``: the
gateway's, with the listening sockets the helper bound for it); over
it, threads ask with a ``wire.Channel`` and the asyncio gateway with a
``RemoteReleaser``.  Every failure is a ``PrivsepError`` saying why.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time

from flushctl.config import Config
from flushctl.privsep.errors import PrivsepError
from flushctl.privsep.roles import HELLO_TIMEOUT, MAX_GRANT
from flushctl.privsep import wire
from flushctl.privsep.wire import MAX_MESSAGE, REQUEST_TIMEOUT

log = logging.getLogger("flushctl.privsep")

CONNECT_WAIT = 30.0      # seconds a starting daemon waits for the helper to listen


def connect(config: Config, role: str, wait: float = 0.0) -> socket.socket:
    """A connection to the helper in ``role``, ready for requests;
    ``PrivsepError`` saying why not.  ``wait``: seconds to wait for a
    helper that is still starting."""
    sock, _, fds = _open(config, role, wait)
    for fd in fds:
        os.close(fd)
    return sock


def gateway_listen(config: Config) -> list[str]:
    """Where the gateway listens, in the words both sides compare."""
    return [str(config.finger_listen), str(config.policy_listen)]


def connect_gateway(config: Config, wait: float = 0.0) -> tuple[socket.socket, list]:
    """The gateway's connection to the helper, and its listening sockets
    (finger, policy), which the helper bound as root and sent along."""
    sock, reply, fds = _open(config, "gateway", wait)
    listeners: list[socket.socket] = []
    try:
        if len(fds) != 2:
            raise PrivsepError(f"the release helper sent {len(fds)} listening sockets, not 2 "
                               f"(is [gateway] user, {config.gateway.user!r}, this process's?)")
        if reply.get("listen") != gateway_listen(config):
            raise PrivsepError(
                f"the release helper listens for the gateway on {reply.get('listen')}, "
                f"this gateway's config on {gateway_listen(config)}: restart the helper "
                "with the same config")
        while fds:
            listener = socket.socket(fileno=fds[0])   # not a socket: OSError
            fds.pop(0)
            listeners.append(listener)
            listener.set_inheritable(False)
            listener.setblocking(False)
    except (PrivsepError, OSError) as exc:
        sock.close()
        for listener in listeners:
            listener.close()
        for fd in fds:
            os.close(fd)
        if isinstance(exc, PrivsepError):
            raise
        raise PrivsepError(f"the release helper sent what is not a socket: {exc}") from None
    return sock, listeners


def _open(config: Config, role: str, wait: float) -> tuple[socket.socket, dict, list[int]]:
    path = config.helper_socket
    deadline = time.monotonic() + wait
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(HELLO_TIMEOUT)   # a helper whose backlog is full: not forever
        try:
            sock.connect(path)
            break
        # a full backlog: EAGAIN at once on a unix socket, like a helper not there yet
        except (FileNotFoundError, ConnectionRefusedError, BlockingIOError, TimeoutError):
            sock.close()
            if time.monotonic() >= deadline:
                raise PrivsepError(f"the release helper is not running (`flushctl helper`; "
                                   f"nothing listens on {path})") from None
            time.sleep(0.5)
        except PermissionError:
            sock.close()
            raise PrivsepError(f"may not use the release helper ({path}): be root or in "
                               f"group {config.helper_group}") from None
        except OSError as exc:
            sock.close()
            raise PrivsepError(f"cannot reach the release helper ({path}): {exc}") from None
    fds: list[int] = []
    try:
        sock.sendall(json.dumps({"role": role}).encode() + b"\n")
        line = b""
        while not line.endswith(b"\n") and len(line) <= MAX_GRANT:
            # one byte at a time: nothing after the line is taken; the
            # gateway's listeners come with the first
            chunk, more, _, _ = socket.recv_fds(sock, 1, 2)
            fds += more
            if not chunk:
                break
            line += chunk
        reply = json.loads(line) if line.endswith(b"\n") else {"error": "no answer"}
        if not isinstance(reply, dict):
            reply = {"error": f"an answer that is not one: {reply!r:.80}"}
        if reply.get("role") != role:
            raise PrivsepError(f"the release helper refused: {reply.get('error', reply)}")
        sock.settimeout(None)
    except (OSError, ValueError) as exc:
        sock.close()
        for fd in fds:
            os.close(fd)
        raise PrivsepError(f"the release helper did not answer: {exc}") from None
    except PrivsepError:
        sock.close()
        for fd in fds:
            os.close(fd)
        raise
    return sock, reply, fds


class RemoteReleaser:
    """In the unprivileged gateway: asks the release helper to release, awaits the outcome."""

    def __init__(self, sock: socket.socket, decode):
        self.sock = sock
        self.decode = decode
        self.closed = asyncio.Event()
        self._pending: dict[int, asyncio.Future] = {}
        self._next = 0
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.Task | None = None

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(sock=self.sock,
                                                                  limit=MAX_MESSAGE)
        self._reader = asyncio.get_running_loop().create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                reply = json.loads(line)
                future = self._pending.pop(reply["id"], None)
                if future and not future.done():
                    future.set_result(self.decode(reply["outcome"]))
        except (ConnectionError, ValueError, KeyError) as exc:
            log.error("event=error stage=privsep reason=%r", str(exc))
        finally:
            # The helper is gone: nobody can release any more; stop.
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(PrivsepError("release service gone"))
            self.closed.set()

    async def add_counts(self, items) -> None:
        """Hand the gateway's request counts to the helper (no answer)."""
        if self.closed.is_set():
            raise PrivsepError("release service gone")
        self._writer.write(json.dumps({"counts": [[n, list(l), c] for n, l, c in items]})
                           .encode() + b"\n")
        await self._writer.drain()

    async def trigger(self, domain: str, trigger: str, client: str, login: str = ""):
        if self.closed.is_set():
            raise PrivsepError("release service gone")
        self._next += 1
        future = asyncio.get_running_loop().create_future()
        self._pending[self._next] = future
        request = {"id": self._next, "domain": domain, "trigger": trigger, "client": client}
        if login:   # the helper's gate decides on it again
            request["login"] = login
        self._writer.write(json.dumps(request).encode() + b"\n")
        await self._writer.drain()
        try:
            return await asyncio.wait_for(asyncio.shield(future), REQUEST_TIMEOUT)
        except asyncio.TimeoutError:
            self._pending.pop(request["id"], None)
            raise PrivsepError("the release service did not answer") from None


class HelperLink:
    """For an asyncio daemon (ODMR, the portal): a few ``wire.Channel``s to
    the helper in ``role`` (``count``: the role's limit there), each used by
    one request at a time."""

    def __init__(self, config, role: str, count: int = 4):
        self.channels = [wire.Channel(connect(config, role, wait=CONNECT_WAIT))
                         for _ in range(count)]
        self.free: asyncio.Queue | None = None
        self.gone = asyncio.Event()

    async def __call__(self, request: dict) -> dict:
        if self.free is None:
            self.free = asyncio.Queue()
            for ch in self.channels:
                self.free.put_nowait(ch)
        channel = await self.free.get()
        try:
            return await asyncio.to_thread(channel.call, request)
        finally:
            if channel.gone.is_set():
                self.gone.set()
            self.free.put_nowait(channel)
