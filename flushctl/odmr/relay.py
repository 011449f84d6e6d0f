"""A turned-around ODMR session: Postfix's smtp client on one side, the customer on the other.

After ``250`` to ATRN the customer's client speaks as an SMTP server over
the same connection (RFC 2645 §5.3): its MTA's greeting comes first.
Postfix's ``odmr`` transport connects to the domain's relay address (see
``provider``), and ``Relay`` passes its commands to the customer and the
customer's replies back, unchanged, with these exceptions:

- each Postfix connection gets the customer's saved greeting (Postfix may
  open several, one after the other; a repeated EHLO is legal);
- Postfix's QUIT is answered here: the customer's connection stays open
  for the next message, and gets QUIT once the session's mail is done;
- a recipient outside the session's domains ends that connection before
  it reaches the customer (Postfix defers the message; it is held again);
- once the end of a message is sent, its reply is waited for, even when
  the session is cut short: a lost reply would send the message twice.

Commands and replies are counted (pipelining keeps several in flight),
so a QUIT is answered only once every reply before it came back.
"""

from __future__ import annotations

import asyncio
import logging
import socket

log = logging.getLogger("flushctl.odmr")

MAX_LINE = 64 * 1024
MAX_REPLY_LINES = 100   # lines of one reply of the customer's, at most
REPLY_WAIT = 600.0      # seconds a customer may take for one reply (RFC 5321's DATA end)
DOT_WAIT = 120.0        # seconds a session cut short still waits for a message's last reply


class SessionOver(Exception):
    """The customer hung up, or broke the protocol: nothing more goes over."""


def _endpoint(text: str) -> tuple[str, int]:
    """An IPv4 ``ADDR:PORT`` of /proc/net/tcp (the address in host order, hex)."""
    addr, port = text.rsplit(":", 1)
    return socket.inet_ntoa(bytes.fromhex(addr)[::-1]), int(port, 16)


def loopback_peer_uid(ours: tuple[str, int], theirs: tuple[str, int],
                      table: str = "/proc/net/tcp") -> int | None:
    """The uid that owns the other end of an IPv4 loopback connection we
    accepted: the kernel's socket whose local end is ``theirs`` and whose
    remote end is ``ours``, all four parts compared."""
    try:
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if len(fields[1]) != 13:   # not IPv4
                    continue
                if _endpoint(fields[1]) == theirs and _endpoint(fields[2]) == ours:
                    return int(fields[7])
    except (OSError, ValueError, StopIteration):
        return None
    return None


def rcpt_domain(line: bytes) -> str | None:
    """The domain of ``RCPT TO:<user@domain> ...``, lower case; None if none."""
    text = line.decode("utf-8", "replace")
    start, end = text.find("<"), text.find(">")
    if start < 0 or end < start:
        return None
    address = text[start + 1:end]
    return address.rpartition("@")[2].lower().rstrip(".") if "@" in address else None


def final_reply(line: bytes) -> bool:
    """Is this the last line of a reply (``250 ok``, not ``250-ok``)?"""
    return len(line.rstrip(b"\r\n")) == 3 or line[3:4] != b"-"


class Relay:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 domains: list[str]):
        self.reader = reader            # the customer's side
        self.writer = writer
        self.domains = domains          # the only recipients it takes
        self.greeting = b""
        self.delivered = 0
        self.connections = 0
        self.over = asyncio.Event()     # the customer is gone
        self.error = ""
        self._turn = asyncio.Lock()     # one Postfix connection talks at a time
        self.dot_pending = 0            # messages whose end is sent, their reply not back
        self._postfix_writers: set[asyncio.StreamWriter] = set()

    async def read_reply(self, timeout: float = REPLY_WAIT) -> list[bytes]:
        """One whole reply of the customer's: its lines."""
        lines = []
        while True:
            line = await self._line(timeout)
            lines.append(line)
            if final_reply(line):
                return lines
            if len(lines) >= MAX_REPLY_LINES:
                raise SessionOver(f"a reply of over {MAX_REPLY_LINES} lines")

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
        return True

    def takes(self, domain: str | None) -> bool:
        return domain is not None and any(domain == d or domain.endswith("." + d)
                                          for d in self.domains)

    async def abort(self) -> None:
        """Cut the session short (its time is up, the daemon stops): Postfix's
        connections are closed (it defers what it was sending, and that is
        held again), but not while a message's end is sent and its reply
        not back (that message would go twice); the customer's connection
        is closed by its owner."""
        self.over.set()
        for _ in range(int(DOT_WAIT * 10)):
            if not self.dot_pending:
                break
            await asyncio.sleep(0.1)
        for writer in list(self._postfix_writers):
            writer.close()

    async def quit(self) -> None:
        """End the customer's side: QUIT, its 221 (not waited on for long)."""
        try:
            async with self._turn:
                if not self.over.is_set():
                    self.writer.write(b"QUIT\r\n")
                    await self.writer.drain()
                    await self.read_reply(10.0)
        except (SessionOver, ConnectionError, OSError):
            pass

    async def serve_postfix(self, preader: asyncio.StreamReader,
                            pwriter: asyncio.StreamWriter) -> None:
        """One connection of Postfix's (the provider checked who it is)."""
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
                        self.dot_pending += 1
                        await self.writer.drain()
                    continue
                verb = line.strip().upper()
                if verb.startswith(b"RCPT TO:") and not self.takes(rcpt_domain(line)):
                    log.warning("event=refused reason=recipient_not_of_session domains=%s",
                                ",".join(self.domains))
                    return   # Postfix loses the connection: it defers, the mail is held
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
            self.dot_pending = 0   # no reply comes any more
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
                self.dot_pending -= 1
                if code.startswith(b"2"):
                    self.delivered += 1
            elif state["last"] == b"DATA" and code == b"354" and state["outstanding"] == 0:
                state["in_data"] = True
            try:
                await pwriter.drain()
            except (ConnectionError, OSError):
                pass

