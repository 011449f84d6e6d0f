"""`flushctl helper`: the release helper, the one flushctl daemon that keeps root.

Releasing held mail takes ``postsuper``, which Postfix keeps for root; so
does the keeper's work (holding again what failed after a release, taking
in mail the milter never saw).  Nothing else needs root, so nothing else
keeps it: the gateway, the poller and admins who are not root ask the
helper over one unix socket (``[helper] socket``, root:``[helper] group``,
mode 0660), and the helper does the root work itself, with the keeper and
the cluster's forwarder beside it.

Who asks is told by the kernel (the socket's peer credentials), never by
the asker.  A connection opens with one line naming the role it wants;
the helper grants it only to the uid that role belongs to, then serves
that role's narrow requests and no other:

- ``gateway`` ([gateway] user): releases for finger and ETRN, and request
  counts; flush_from, the rate limits and who is a peer are decided again
  here, by the helper's own gate;
- ``poller`` ([poller] user): what to probe, probe results, a release with
  the poller's probes (the helper never talks to a customer's server);
- ``scrape`` ([poller] user): the metrics' figures;
- ``admin`` (root, or a member of ``[helper] group`` that is none of the
  daemons' users): `flushctl flush` and its ``--wait``.

Root may take any role.  A request its role never sends cuts that
connection off (``privsep.Malformed``); every other request is answered,
an error included.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import grp
import json
import logging
import os
import pwd
import signal
import socket
import stat
import struct
import time
from dataclasses import dataclass

from . import privsep
from .config import Config
from .privsep import Malformed, PrivsepError

log = logging.getLogger("flushctl.helper")

ROLES = ("gateway", "poller", "scrape", "admin")
MAX_HELLO = 200          # bytes of the opening line
HELLO_TIMEOUT = 10.0     # seconds a connection may take to say its role
MAX_CONNECTIONS = 64     # connections served at once
# connections per role at once: a daemon taken over cannot take the others' room
PER_ROLE = {"gateway": 4, "poller": 2, "scrape": 2, "admin": 16}
MAX_WAITING_PER_UID = 8  # connections of one uid that have not said their role yet
ADMIN_IDLE = 120.0       # seconds an admin's connection may stay silent
CONNECT_WAIT = 30.0      # seconds a starting daemon waits for the helper to listen
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)   # Linux 4.13
_LOCKS: list[int] = []   # the helper's lock file, open for as long as it runs


@dataclass(frozen=True)
class Peer:
    """Who is at the other end of a unix socket, as the kernel says."""
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    try:   # Python reads at most 1024 bytes: 256 groups
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        groups = struct.unpack(f"{len(raw) // 4}I", raw[:len(raw) // 4 * 4])
    except OSError:   # an older kernel, or more groups: the primary group only
        groups = ()
    return Peer(pid, uid, gid, frozenset(groups) | {gid})


def _uid(user: str) -> int | None:
    try:
        return pwd.getpwnam(user).pw_uid if user else None
    except KeyError:
        return None


def refusal(role: str, peer: Peer, config: Config) -> str | None:
    """Why ``peer`` may not take ``role``; None when it may."""
    if role not in ROLES:
        return f"no such role: {role!r:.40}"
    if peer.uid == 0:
        return None
    if role in ("gateway", "poller", "scrape"):
        section = "gateway" if role == "gateway" else "poller"
        user = config.gateway.user if role == "gateway" else config.poller_user
        if user and _uid(user) == peer.uid:
            return None
        return f"uid {peer.uid} is not [{section}] user"
    daemons = {_uid(u) for u in (config.gateway.user, config.poller_user, config.milter_user)}
    if peer.uid in daemons:
        return f"uid {peer.uid} runs a daemon: not an admin"
    try:
        gid = grp.getgrnam(config.helper_group).gr_gid
    except KeyError:
        return f"there is no group {config.helper_group}"
    if gid in peer.groups:
        return None
    return f"uid {peer.uid} is not in group {config.helper_group}"


# -- the asking side -----------------------------------------------------------

def connect(config: Config, role: str, wait: float = 0.0) -> socket.socket:
    """A connection to the helper in ``role``, ready for requests;
    ``PrivsepError`` saying why not.  ``wait``: seconds to wait for a
    helper that is still starting."""
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
    try:
        sock.sendall(json.dumps({"role": role}).encode() + b"\n")
        line = b""
        while not line.endswith(b"\n") and len(line) <= MAX_HELLO:
            chunk = sock.recv(1)   # one byte at a time: nothing after the line is taken
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
        raise PrivsepError(f"the release helper did not answer: {exc}") from None
    except PrivsepError:
        sock.close()
        raise
    return sock


# -- what an admin may ask --------------------------------------------------------

def release_report(ondemand, name: str) -> dict:
    """`flushctl flush NAME`'s release, as data (the same wherever it runs)."""
    from .ondemand import Refused
    try:
        result = ondemand.flush(name, trigger="admin")
    except Refused as exc:
        return {"domain": name, "refused": exc.code, "text": str(exc)}
    report = {"domain": name, "released": result.released, "forwarded": result.forwarded,
              "probed": result.probe is not None,
              "target": result.probe.target if result.probe else None,
              "shared": result.shared, "on_the_way": result.on_the_way,
              "unreachable": [[route, res.text()] for route, res in result.unreachable]}
    if result.shared:
        state = ondemand.ledger.state(name)
        report["since"], report["by"] = state.last_flush, state.last_flush_trigger
    return report


def answer_admin(ondemand, request: dict) -> dict:
    """An admin's request: a release, or one look while ``--wait`` waits."""
    op = request.get("op")
    if op not in ("flush", "wait") or set(request) != {"op", "domain"}:
        raise Malformed(f"not a request an admin sends: {op!r:.40}")
    name = request["domain"]
    if not isinstance(name, str) or name not in ondemand.config.domains:
        raise ValueError(f"{name!r:.80}: not a configured domain")
    if op == "flush":
        return release_report(ondemand, name)
    present, verdict = ondemand.wait_step(name)
    return {"present": present, "verdict": verdict}


# -- the helper ------------------------------------------------------------------

def bind(config: Config) -> socket.socket:
    """The helper's listening socket: root:[helper] group, 0660, in a
    directory only root may write to (created 0755 if missing)."""
    path = config.helper_socket
    try:
        gid = grp.getgrnam(config.helper_group).gr_gid
    except KeyError:
        raise PrivsepError(f"helper: there is no group {config.helper_group!r} "
                           "(create it, or set [helper] group)") from None
    directory = os.path.dirname(path)
    missing = []
    where = directory
    while not os.path.isdir(where):
        missing.append(where)
        where = os.path.dirname(where)
    for part in reversed(missing):
        os.mkdir(part)
        os.chmod(part, 0o755)   # whatever the umask: the group must reach the socket
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        raise PrivsepError(f"helper: {directory} must be a directory of root's that no one "
                           "else may write to")
    if not (st.st_mode & 0o001 or st.st_gid == gid and st.st_mode & 0o010):
        raise PrivsepError(f"helper: {directory} must be searchable by group "
                           f"{config.helper_group} (mode 0755, say)")
    # one helper per socket: the lock is held for as long as this process lives
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                   0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise PrivsepError(f"helper: another helper already listens on {path}") from None
    _LOCKS.append(lock)
    return privsep.listen_unix(path, MAX_CONNECTIONS, (0, gid))


class Helper:
    def __init__(self, config: Config):
        from .gateway import Releaser
        from .ondemand import OnDemand
        self.config = config
        self.listener: socket.socket | None = None   # bound once all else is ready
        self.releaser = Releaser(OnDemand(config), config.gateway.release_window)
        self.releaser.ondemand.ledger   # opened now: a ledger that cannot be is said at start
        self.threads = concurrent.futures.ThreadPoolExecutor(MAX_CONNECTIONS,
                                                             thread_name_prefix="helper")
        self.open: set[socket.socket] = set()
        self.roles: dict[str, int] = {}           # connections per role, once said
        self.waiting: dict[int, int] = {}         # connections per uid not yet said
        self.gate = None                          # the gateways' gate, made in serve()

    async def serve(self, stop: asyncio.Event) -> None:
        from . import cluster
        from .gateway import helper_gate, refresh_peers, with_forwarder
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task] = set()
        peers = await asyncio.to_thread(cluster.peer_addresses, self.config.cluster) \
            if self.config.cluster else frozenset()
        self.gate = helper_gate(self.config, peers)

        async def accept() -> None:
            while True:
                try:
                    conn, _ = await loop.sock_accept(self.listener)
                except OSError as exc:   # out of file descriptors, say: not the end
                    log.error("event=error stage=accept reason=%r", str(exc))
                    await asyncio.sleep(0.5)
                    continue
                conn.setblocking(False)
                if len(self.open) >= MAX_CONNECTIONS:
                    log.warning("event=refused how=helper reason=too_many_connections")
                    conn.close()
                    continue
                self.open.add(conn)
                task = loop.create_task(self.connection(conn))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        async def until_stopped() -> None:
            accepting = loop.create_task(accept())
            refreshing = loop.create_task(refresh_peers(self.config, self.gate))
            await stop.wait()
            accepting.cancel()
            refreshing.cancel()
            for conn in list(self.open):   # the threads' reads end, and so do they
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            for task in list(tasks):
                task.cancel()

        log.info("event=start socket=%s group=%s", self.config.helper_socket,
                 self.config.helper_group)
        await with_forwarder(self.config, self.releaser, until_stopped())
        self.threads.shutdown(wait=False, cancel_futures=True)
        log.info("event=stop")

    async def connection(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        role, peer, counted = "-", None, None
        try:
            peer = peer_of(conn)
            if self.waiting.get(peer.uid, 0) >= MAX_WAITING_PER_UID:
                raise Malformed("too many connections that have not said their role")
            self.waiting[peer.uid] = self.waiting.get(peer.uid, 0) + 1
            try:
                role = await asyncio.wait_for(self._hello(loop, conn), HELLO_TIMEOUT)
            finally:
                self.waiting[peer.uid] -= 1
                if not self.waiting[peer.uid]:
                    del self.waiting[peer.uid]
            why = refusal(role, peer, self.config)
            if why is None and self.roles.get(role, 0) >= PER_ROLE[role]:
                why = f"{PER_ROLE[role]} {role} connections already"
            if why is not None:
                log.warning("event=refused how=helper role=%s uid=%d pid=%d reason=%r",
                            role, peer.uid, peer.pid, why)
                await loop.sock_sendall(conn, json.dumps({"error": why}).encode() + b"\n")
                return
            counted = role
            self.roles[role] = self.roles.get(role, 0) + 1
            await loop.sock_sendall(conn, json.dumps({"role": role}).encode() + b"\n")
            log.info("event=connect role=%s uid=%d pid=%d", role, peer.uid, peer.pid)
            if role == "gateway":
                from .gateway import serve_parent
                await serve_parent(self.config, conn, self.releaser, self.gate)
                return
            conn.setblocking(True)
            if role == "admin":   # an admin's command that stops talking is hung up on
                conn.settimeout(ADMIN_IDLE)
            await loop.run_in_executor(self.threads, self._serve_thread, role, conn)
        except ConnectionError as exc:   # a look whether it listens, or a peer gone
            log.debug("event=hangup how=helper role=%s reason=%r", role, str(exc))
        except (asyncio.TimeoutError, Malformed, ValueError) as exc:
            log.warning("event=refused how=helper role=%s uid=%s reason=%r", role,
                        peer.uid if peer else "-", str(exc) or type(exc).__name__)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("event=error stage=helper role=%s", role)
        finally:
            if counted is not None:
                self.roles[counted] -= 1
            self.open.discard(conn)
            conn.close()

    @staticmethod
    async def _hello(loop, conn: socket.socket) -> str:
        line = b""
        while not line.endswith(b"\n"):
            chunk = await loop.sock_recv(conn, 1)   # not a byte past the line
            if not chunk:
                raise ConnectionError("hung up before saying its role")
            line += chunk
            if len(line) > MAX_HELLO:
                raise Malformed("opening line too long")
        try:
            hello = json.loads(line)
        except ValueError:
            raise Malformed("opening line not JSON") from None
        if not isinstance(hello, dict) or set(hello) != {"role"} \
                or not isinstance(hello["role"], str):
            raise Malformed("opening line is not a role")
        return hello["role"]

    def _serve_thread(self, role: str, conn: socket.socket) -> None:
        """A poller, scrape or admin connection, in a thread of its own with
        its own ``OnDemand`` (its own ledger connection)."""
        from . import metrics, poller
        from .ondemand import OnDemand
        od = OnDemand(self.config)
        if role == "poller":
            ops = poller.LocalOps(od)
            handle, limit = (lambda r: poller.answer(ops, r)), poller.MAX_REQUEST
        elif role == "scrape":
            scrape = metrics.scrape_of(od)
            handle, limit = (lambda r: poller.answer_scrape(scrape, r)), privsep.MAX_MESSAGE
        else:
            handle, limit = (lambda r: answer_admin(od, r)), privsep.MAX_MESSAGE
        if not privsep.serve_channel(conn, handle, role, limit):
            log.error("event=refused how=helper role=%s reason=cut_off", role)


def run(config: Config) -> None:
    """Serve until SIGTERM: the keeper, the forwarder and every role."""
    from .keeper import start_thread
    if os.geteuid() != 0:
        raise PrivsepError("helper: must run as root (postsuper is root's)")
    helper = Helper(config)   # the ledger opened: its socket is bound only once ready
    listener = helper.listener = bind(config)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await helper.serve(stop)

    end_keeper = start_thread(config)
    try:
        asyncio.run(main())
    finally:
        end_keeper()
        listener.close()
        try:
            os.unlink(config.helper_socket)
        except OSError:
            pass
