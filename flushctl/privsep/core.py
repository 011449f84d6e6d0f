"""Privilege separation: what reads the network runs unprivileged.

Releasing mail needs ``postsuper``, which Postfix reserves for root; the
gateway's listeners need root too (port 79, Postfix's private/).  Neither
needs root in the code that reads what strangers send.  So the daemons
that do (the gateway, the poller) run as their own users, never root
(``drop_privileges`` at once where they are started as root), and ask
the release helper (``helper``) for every release, one JSON line each
way; the helper checks every request again, and binds the gateway's
listeners for it.  This module holds the parts
both sides share: binding, dropping, the asking side (``RemoteReleaser``
for the asyncio gateway, ``Channel`` for threads) and the answering side
(``serve_releases``, ``serve_channel``), each bounded and validated.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import re
import pwd
import select
import socket
import threading
import time


log = logging.getLogger("flushctl.privsep")

MAX_MESSAGE = 64 * 1024
MAX_INFLIGHT = 256        # a gateway's requests under way at once in the helper
REQUEST_TIMEOUT = 300.0   # seconds the gateway waits for a release's outcome
TRIGGERS = ("finger", "etrn", "peer", "report")  # report: what is held, nothing released


class PrivsepError(Exception):
    pass


class Malformed(Exception):
    """A request the daemon that may take this role would never send."""


def bind_unix(path: str, backlog: int) -> socket.socket:
    """A listening unix socket at ``path`` that only Postfix may reach: owner
    postfix, mode 0660 (in the release helper, as root: its directory is
    Postfix's private/, 0700 postfix).  A stale socket is replaced."""
    import grp
    try:
        postfix = pwd.getpwnam("postfix")
        gid = grp.getgrnam("postfix").gr_gid
    except KeyError:
        raise PrivsepError("there is no postfix user or group: is Postfix installed?") from None
    return listen_unix(path, backlog, (postfix.pw_uid, gid) if os.geteuid() == 0 else None)


def listen_unix(path: str, backlog: int, owner: tuple[int, int] | None) -> socket.socket:
    """A listening, non-blocking unix socket at ``path``, mode 0660, given
    to ``owner`` (uid, gid) when set; a stale socket is replaced."""
    if os.path.lexists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o660)   # while ours: after the chown it may be another's
        if owner is not None:
            os.chown(path, *owner)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def bind(hp, backlog: int) -> socket.socket:
    """A listening socket on ``hp`` (as root, in the helper or a one-process gateway): TCP for
    a HostPort or an inet Listen, ``bind_unix`` for a unix Listen."""
    if getattr(hp, "kind", "inet") == "unix":
        return bind_unix(hp.path, backlog)
    infos = socket.getaddrinfo(hp.host, hp.port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def account(user: str, who: str = "gateway") -> pwd.struct_passwd:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PrivsepError(f"{who}: user {user!r} does not exist "
                           f"(create it, or set [{who}] user)") from None
    if entry.pw_uid == 0:
        raise PrivsepError(f"{who}: user {user!r} is root; name an unprivileged user")
    return entry


def drop_privileges(entry: pwd.struct_passwd, who: str = "gateway",
                    groups: bool = False) -> None:
    """Become ``entry`` for good: groups (none, or with ``groups`` the
    user's own from the group database), gid, then uid; no way back."""
    if groups:
        os.initgroups(entry.pw_name, entry.pw_gid)
    else:
        os.setgroups([])
    os.setresgid(entry.pw_gid, entry.pw_gid, entry.pw_gid)
    os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise PrivsepError(f"{who}: could not give up root")
    os.chdir("/")


def current_user() -> str:
    """The name this process runs as (for the log)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


# -- the asking side (an unprivileged daemon) -----------------------------------

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

    async def trigger(self, domain: str, how: str, client: str):
        if self.closed.is_set():
            raise PrivsepError("release service gone")
        self._next += 1
        future = asyncio.get_running_loop().create_future()
        self._pending[self._next] = future
        request = {"id": self._next, "domain": domain, "how": how, "client": client}
        self._writer.write(json.dumps(request).encode() + b"\n")
        await self._writer.drain()
        try:
            return await asyncio.wait_for(asyncio.shield(future), REQUEST_TIMEOUT)
        except asyncio.TimeoutError:
            self._pending.pop(request["id"], None)
            raise PrivsepError("the release service did not answer") from None


class Channel:
    """In an unprivileged daemon: ask the release helper, one JSON line out and
    one back, one request at a time (callers in several threads wait their
    turn).  ``PrivsepError`` when the helper answers with an error or
    is gone; ``gone`` is set then."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._file = sock.makefile("rwb")
        self._lock = threading.Lock()
        self.gone = threading.Event()

    def hung_up(self) -> bool:
        """Has the helper hung up?  A look that does not wait (and says
        no while a call is under way: that call will tell)."""
        if self.gone.is_set():
            return True
        if not self._lock.acquire(blocking=False):
            return False
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
            if not readable:
                return False
            try:
                data = self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return False
            except OSError:
                data = b""
            if not data:
                self.gone.set()
            return not data
        finally:
            self._lock.release()

    def call(self, request: dict) -> dict:
        with self._lock:
            if self.gone.is_set():
                raise PrivsepError("the release helper is gone")
            try:
                self._file.write(json.dumps(request).encode() + b"\n")
                self._file.flush()
                line = self._file.readline()
            except (OSError, ValueError) as exc:
                line = b""
                log.error("event=error stage=privsep reason=%r", str(exc))
            if not line:
                self.gone.set()
                raise PrivsepError("the release helper is gone")
        reply = json.loads(line)
        if "error" in reply:
            raise PrivsepError(reply["error"])
        return reply


def serve_channel(sock: socket.socket, handle, who: str, limit: int = MAX_MESSAGE) -> bool:
    """In the release helper: answer each request of a ``Channel`` with
    ``handle(request)`` until the worker hangs up.  Every request gets an
    answer (an exception becomes ``{"error": text}``), except one the
    worker would never send (``Malformed``, or not JSON, or over ``limit`` bytes):
    then the helper stops serving it, and hangs up.  True when the
    worker hung up, False when it was cut off for such a request."""
    with sock, sock.makefile("rwb") as channel:
        while True:
            try:
                line = channel.readline(limit + 1)
            except OSError:   # silent past its time, or cut: as if it hung up
                return True
            if not line:
                break
            try:
                if len(line) > limit or not line.endswith(b"\n"):
                    raise Malformed("request too long")
                try:
                    request = json.loads(line)
                except (ValueError, RecursionError):
                    raise Malformed("not JSON") from None
                if not isinstance(request, dict):
                    raise Malformed("not an object")
                try:
                    reply = handle(request)
                except Malformed:
                    raise
                except Exception as exc:
                    log.exception("event=error stage=%s_root request=%.40s", who,
                                  request.get("op"))
                    reply = {"error": str(exc) or type(exc).__name__}
            except Malformed as exc:
                log.error("event=refused how=privsep who=%s reason=%r", who, str(exc))
                return False
            try:
                channel.write(json.dumps(reply).encode() + b"\n")
                channel.flush()
            except OSError:
                return True
    return True


# -- the answering side (the release helper) ------------------------------------

def check_request(request, domains) -> tuple[int, str, str, str]:
    """Validate one request of a gateway; ValueError if it is not one we serve."""
    if not isinstance(request, dict) or set(request) != {"id", "domain", "how", "client"}:
        raise ValueError("malformed request")
    rid, domain, how, client = (request["id"], request["domain"], request["how"],
                                request["client"])
    if not isinstance(rid, int) or isinstance(rid, bool):
        raise ValueError("malformed id")
    if how not in TRIGGERS:
        raise ValueError(f"unknown trigger {how!r}")
    # a domain name in canonical form; one this process does not serve is
    # answered, refused by the gate (the gateway may have read a newer
    # config: a finger for a domain it knows must not end the conversation)
    if not isinstance(domain, str) or domain not in domains and not _canonical(domain):
        raise ValueError(f"not a domain name in canonical form: {domain!r:.80}")
    if not isinstance(client, str):
        raise ValueError("malformed client")
    if client != "unknown":
        ipaddress.ip_address(client)
    return rid, domain, how, client


def _canonical(domain: str) -> bool:
    from flushctl.names import domain as canonical
    try:
        return canonical(domain) == domain
    except ValueError:
        return False


_LABEL = re.compile(r"[a-z_]{1,40}")


def check_counts(message) -> list[tuple[str, tuple, int]]:
    """Validate a gateway's request counts; ValueError if they are not that."""
    if not isinstance(message, dict) or set(message) != {"counts"} \
            or not isinstance(message["counts"], list) or len(message["counts"]) > 1000:
        raise ValueError("malformed counts")
    items = []
    for item in message["counts"]:
        if not (isinstance(item, list) and len(item) == 3 and item[0] == "gateway_requests"
                and isinstance(item[1], list) and len(item[1]) == 2
                and all(isinstance(x, str) and _LABEL.fullmatch(x) for x in item[1])
                and item[1][0] in ("finger", "etrn")
                and isinstance(item[2], int) and not isinstance(item[2], bool)
                and 0 < item[2] <= 10**7):
            raise ValueError(f"malformed count {item!r:.100}")
        items.append((item[0], tuple(item[1]), item[2]))
    return items


async def serve_releases(sock: socket.socket, releaser, domains, encode, gate=None,
                         refused=None, failed=None) -> None:
    """In the root parent: carry out the child's requests until it hangs up.

    The child is not trusted with what protects a customer: ``gate`` (the
    parent's own ``gate.Gate``: flush_from, the rate limits, which
    addresses are peers) decides each request again, here, before anything
    is released; a request it refuses gets ``refused(verdict)`` as its
    outcome.  Every request gets an answer: if the release itself fails
    (the ledger on a full disk, say), ``failed(text)``.
    """
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_MESSAGE)
    tasks = set()
    # requests under way at once: a client that sends without reading the
    # answers is not read from until some are done
    room = asyncio.Semaphore(MAX_INFLIGHT)

    async def one(rid, domain, how, client):
        verdict = gate.check(client, domain, time.monotonic()) if gate is not None else None
        if verdict is not None and verdict != "allowed":
            log.warning("event=refused how=privsep domain=%s client=%s trigger=%s reason=%s",
                        domain, client, how, verdict.replace(" ", "_"))
            outcome = refused(verdict)
        else:
            try:
                outcome = await releaser.trigger(domain, how, client)
            except Exception as exc:
                log.exception("event=error stage=release_service domain=%s", domain)
                outcome = failed(str(exc)) if failed else None
        try:
            writer.write(json.dumps({"id": rid, "outcome": encode(outcome)}).encode() + b"\n")
            await writer.drain()
        except ConnectionError:
            pass

    try:
        while line := await reader.readline():
            try:
                message = json.loads(line)
                if isinstance(message, dict) and "counts" in message:
                    items = check_counts(message)
                    try:
                        await releaser.add_counts(items)
                    except Exception:   # the ledger: counts are not worth a restart
                        log.exception("event=error stage=counts")
                    continue
                args = check_request(message, domains)
            except ValueError as exc:
                # Not something the child we started would send: stop serving it.
                log.error("event=refused how=privsep reason=%r", str(exc))
                break
            await room.acquire()
            task = asyncio.get_running_loop().create_task(one(*args))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            task.add_done_callback(lambda _: room.release())
    except (ConnectionError, ValueError) as exc:
        log.error("event=error stage=privsep reason=%r", str(exc))
    finally:
        writer.close()
        for task in tasks:
            task.cancel()
