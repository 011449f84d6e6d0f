"""A turned-around ODMR session: Postfix's smtp client on one side, the customer on the other.

After ``250`` to ATRN the customer's client speaks as an SMTP server over
the same connection (RFC 2645 §5.3): its MTA's greeting comes first.  The
session then listens on a loopback port that only the transport map
names, for its domains, while it lasts; Postfix's ``odmr`` transport
connects there, and ``Relay`` passes its commands to the customer and the
customer's replies back, unchanged, with three exceptions:

- each Postfix connection gets the customer's saved greeting (Postfix may
  open several, one after the other; a repeated EHLO is legal);
- Postfix's QUIT is answered here: the customer's connection stays open
  for the next message, and gets QUIT once the session's mail is done;
- a connection from any other user than Postfix's mail_owner is closed at
  once (a local user must not talk to the customer's server as us).

Commands and replies are counted (pipelining keeps several in flight),
so a QUIT is answered only once every reply before it came back.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("flushctl.odmr")

MAX_LINE = 64 * 1024
REPLY_WAIT = 600.0      # seconds a customer may take for one reply (RFC 5321's DATA end)


class SessionOver(Exception):
    """The customer hung up, or broke the protocol: nothing more goes over."""


def loopback_peer_uid(local_port: int, peer_port: int) -> int | None:
    """The uid that owns the other end of a loopback TCP connection we
    accepted on ``local_port`` (the kernel's socket table: the peer's
    socket is the one whose local port is ``peer_port``)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    local, remote, uid = fields[1], fields[2], fields[7]
                    if int(local.rsplit(":", 1)[1], 16) == peer_port \
                            and int(remote.rsplit(":", 1)[1], 16) == local_port:
                        return int(uid)
        except OSError:
            continue
    return None


def final_reply(line: bytes) -> bool:
    """Is this the last line of a reply (``250 ok``, not ``250-ok``)?"""
    return len(line.rstrip(b"\r\n")) == 3 or line[3:4] != b"-"


class Relay:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 postfix_uid: int | None):
        self.reader = reader            # the customer's side
        self.writer = writer
        self.postfix_uid = postfix_uid  # None: anyone (tests as root, say)
        self.greeting = b""
        self.delivered = 0
        self.connections = 0
        self.active = 0                 # Postfix connections being served
        self.over = asyncio.Event()     # the customer is gone
        self.error = ""
        self._turn = asyncio.Lock()     # one Postfix connection talks at a time
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self._postfix_writers: set[asyncio.StreamWriter] = set()

    async def read_reply(self, timeout: float = REPLY_WAIT) -> list[bytes]:
        """One whole reply of the customer's: its lines."""
        lines = []
        while True:
            line = await self._line(timeout)
            lines.append(line)
            if final_reply(line):
                return lines

    async def _line(self, timeout: float) -> bytes:
        try:
            line = await asyncio.wait_for(self.reader.readuntil(b"\n"), timeout)
        except asyncio.IncompleteReadError:
            raise SessionOver("the customer hung up") from None
        except asyncio.LimitOverrunError:
            raise SessionOver("a reply line too long") from None
        except asyncio.TimeoutError:
            raise SessionOver("the customer did not answer in time") from None
        except (ConnectionError, OSError) as exc:
            raise SessionOver(f"the customer's connection broke: {exc}") from None
        if len(line) < 4 or not line[:3].isdigit():
            raise SessionOver(f"not an SMTP reply: {line[:60]!r}")
        return line

    async def start(self, greeting_timeout: float) -> bool:
        """Read the customer's greeting; True when it is a 2xx one."""
        lines = await self.read_reply(greeting_timeout)
        if not lines[-1].startswith(b"2"):
            self.error = lines[-1].decode("ascii", "replace").strip()
            return False
        self.greeting = b"".join(lines)
        self.server = await asyncio.start_server(self._postfix, "127.0.0.1", 0,
                                                 limit=MAX_LINE, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]
        return True

    def abort(self) -> None:
        """Cut the session short (its time is up, the daemon stops): Postfix's
        connections are closed (it defers what it was sending, and that is
        held again); the customer's connection is closed by its owner."""
        if self.server is not None:
            self.server.close()
        for writer in list(self._postfix_writers):
            writer.close()
        self.over.set()

    async def quit(self) -> None:
        """End the customer's side: QUIT, its 221 (not waited on for long)."""
        if self.server is not None:
            self.server.close()
        try:
            async with self._turn:
                if not self.over.is_set():
                    self.writer.write(b"QUIT\r\n")
                    await self.writer.drain()
                    await self.read_reply(10.0)
        except (SessionOver, ConnectionError, OSError):
            pass

    async def _postfix(self, preader: asyncio.StreamReader,
                       pwriter: asyncio.StreamWriter) -> None:
        sock = pwriter.get_extra_info("socket")
        local_port = sock.getsockname()[1]
        peer_port = sock.getpeername()[1]
        if self.postfix_uid is not None and \
                loopback_peer_uid(local_port, peer_port) != self.postfix_uid:
            log.warning("event=refused reason=not_postfix peer_port=%d", peer_port)
            pwriter.close()
            return
        self.active += 1
        self._postfix_writers.add(pwriter)
        try:
            async with self._turn:
                if self.over.is_set():
                    return
                self.connections += 1
                await self._serve(preader, pwriter)
        except SessionOver as exc:
            self.error = str(exc)
            self.over.set()
        except (ConnectionError, OSError):
            pass   # Postfix's side broke: its mail is deferred, the session goes on
        finally:
            self.active -= 1
            self._postfix_writers.discard(pwriter)
            pwriter.close()

    async def _serve(self, preader: asyncio.StreamReader, pwriter: asyncio.StreamWriter) -> None:
        """One Postfix connection, commands out and replies back in step."""
        pwriter.write(self.greeting)
        await pwriter.drain()
        state = {"outstanding": 0, "in_data": False, "after_dot": False, "last": b""}
        replies = asyncio.get_running_loop().create_task(self._replies(pwriter, state))
        try:
            while True:
                try:
                    line = await preader.readuntil(b"\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return   # Postfix went away (or its cache closed it): like QUIT
                if state["in_data"]:
                    self.writer.write(line)
                    if line in (b".\r\n", b".\n"):
                        state["in_data"] = False
                        state["after_dot"] = True
                        state["outstanding"] += 1
                        await self.writer.drain()
                    continue
                verb = line.strip().upper()
                if verb == b"QUIT":
                    await self._settled(state, replies)
                    pwriter.write(b"221 2.0.0 Bye\r\n")
                    await pwriter.drain()
                    return
                state["outstanding"] += 1
                state["last"] = verb.split(b" ", 1)[0]
                self.writer.write(line)
                await self.writer.drain()
        finally:
            await self._settled(state, replies)
            replies.cancel()
            if replies.done() and not replies.cancelled() and replies.exception():
                raise replies.exception()

    async def _settled(self, state: dict, replies: asyncio.Task) -> None:
        """Wait until every command sent has its reply (or the customer is gone)."""
        while state["outstanding"] > 0 and not replies.done():
            await asyncio.sleep(0.01)

    async def _replies(self, pwriter: asyncio.StreamWriter, state: dict) -> None:
        """The customer's replies, passed back to Postfix.  When the customer
        is gone, so is Postfix's connection: it defers what it was sending."""
        try:
            await self._pass_replies(pwriter, state)
        except SessionOver as exc:
            self.error = str(exc)
            self.over.set()
            pwriter.close()
            raise

    async def _pass_replies(self, pwriter: asyncio.StreamWriter, state: dict) -> None:
        while True:
            while state["outstanding"] <= 0:
                await asyncio.sleep(0.005)
            lines = await self.read_reply()
            pwriter.write(b"".join(lines))
            state["outstanding"] -= 1
            code = lines[-1][:3]
            if state["after_dot"] and state["outstanding"] == 0:
                state["after_dot"] = False
                if code.startswith(b"2"):
                    self.delivered += 1
            elif state["last"] == b"DATA" and code == b"354" and state["outstanding"] == 0:
                state["in_data"] = True
            try:
                await pwriter.drain()
            except (ConnectionError, OSError):
                pass

