"""`flushctl helper`: the release helper, the one flushctl daemon that keeps root.

Releasing held mail takes ``postsuper``, which Postfix keeps for root; so
does the keeper's work (holding again what failed after a release, taking
in mail the milter never saw).  Nothing else needs root, so nothing else
keeps it: the gateway, the poller and admins who are not root ask the
helper over one unix socket (``[helper] socket``, root:``[helper] group``,
mode 0660), and the helper does the root work itself, with the keeper and
the cluster's forwarder beside it.

Who may take which role is ``roles``'s to say; this module serves each
granted role's narrow requests and no other.  For a gateway, flush_from,
the rate limits and who is a peer are decided again here, by the
helper's own gate; for the poller, the helper never talks to a
customer's server.  A request its role never sends cuts that connection
off (``errors.Malformed``); every other request is answered, an error
included.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import grp
import json
import logging
import os
import socket
import stat

from flushctl import stopsignals
from flushctl.config import Config
from flushctl.privsep import sockets, wire
from flushctl.privsep.client import gateway_listen
from flushctl.privsep.errors import Malformed, PrivsepError
from flushctl.privsep.roles import ADMIN_IDLE, HELLO_TIMEOUT, MAX_CONNECTIONS, MAX_HELLO, \
    MAX_WAITING_PER_UID, PER_ROLE, peer_of, refusal, uid_of

log = logging.getLogger("flushctl.helper")

_LOCKS: list[int] = []   # the helper's lock file, open for as long as it runs


# -- what an admin may ask --------------------------------------------------------

def answer_admin(heldmail, request: dict) -> dict:
    """An admin's request: a release, one look while ``--wait`` waits, or
    the keeper's check of the ledger (the all-domains views count from it)."""
    op = request.get("op")
    if request == {"op": "check"}:
        check = heldmail.check_source()
        return {"check": check.as_json() if check is not None else None}
    if op not in ("flush", "wait") or set(request) != {"op", "domain"}:
        raise Malformed(f"not a request an admin sends: {op!r:.40}")
    name = request["domain"]
    if not isinstance(name, str) or name not in heldmail.config.domains:
        raise ValueError(f"{name!r:.80}: not a configured domain")
    if op == "flush":
        return heldmail.flush(name, trigger="admin").as_json()
    present, verdict = heldmail.wait_step(name)
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
    return sockets.listen_unix(path, MAX_CONNECTIONS, (0, gid))


class Helper:
    def __init__(self, config: Config):
        from flushctl.gateway.releaser import Releaser
        from flushctl.heldmail.library import HeldMail
        self.config = config
        self.listener: socket.socket | None = None   # bound once all else is ready
        self.releaser = Releaser(HeldMail(config), config.gateway.release_window)
        self.releaser.heldmail.ledger   # opened now: a ledger that cannot be is said at start
        self.threads = concurrent.futures.ThreadPoolExecutor(MAX_CONNECTIONS,
                                                             thread_name_prefix="helper")
        self.open: set[socket.socket] = set()
        self.roles: dict[str, int] = {}           # connections per role, once said
        self.waiting: dict[int, int] = {}         # connections per uid not yet said
        self.gate = None                          # the gateways' gate, made in serve()
        self.keeper_check = lambda: None          # the keeper's check, once it runs
        self.listeners: list[socket.socket] | None = None   # the gateway's, once asked for
        from flushctl.logins.tokens import Tokens
        self.odmr_logins = Tokens(config.odmr.session_timeout * 2 + 600,
                                  config.odmr.auth_failures) if config.odmr else Tokens(0)
        self.portal_logins = Tokens(config.portal.session_lifetime,
                                    config.portal.login_failures) if config.portal else Tokens(0)

    async def serve(self, stop: asyncio.Event) -> None:
        from flushctl import cluster
        from flushctl.cluster import refresh_peers
        from flushctl.gateway.daemon import helper_gate, with_forwarder
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
                    log.warning("event=refused reason=too_many_connections")
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
                log.warning("event=refused role=%s uid=%d pid=%d reason=%r",
                            role, peer.uid, peer.pid, why)
                await loop.sock_sendall(conn, json.dumps({"error": why}).encode() + b"\n")
                return
            granted, fds = {"role": role}, []
            # the listeners go to the gateway's user only: not to root, whose
            # own gateway binds for itself, nor to anyone else
            if role == "gateway" and peer.uid == uid_of(self.config.gateway.user):
                try:
                    listeners = self._gateway_listeners()
                except (OSError, PrivsepError) as exc:
                    log.error("event=error stage=listen reason=%r", str(exc))
                    await loop.sock_sendall(conn, json.dumps(
                        {"error": f"cannot listen for the gateway: {exc}"}).encode() + b"\n")
                    return
                granted["listen"] = gateway_listen(self.config)
                fds = [sock.fileno() for sock in listeners]
            counted = role
            self.roles[role] = self.roles.get(role, 0) + 1
            # the gateway's listeners travel with the answer (SCM_RIGHTS); a
            # reply this short goes whole into an empty socket buffer
            data = json.dumps(granted).encode() + b"\n"
            if socket.send_fds(conn, [data], fds) != len(data):
                raise ConnectionError("could not answer in one piece")
            log.info("event=connect role=%s uid=%d pid=%d", role, peer.uid, peer.pid)
            if role == "gateway":
                from flushctl.gateway.daemon import serve_parent
                await serve_parent(self.config, conn, self.releaser, self.gate)
                return
            conn.setblocking(True)
            if role == "admin":   # an admin's command that stops talking is hung up on
                conn.settimeout(ADMIN_IDLE)
            await loop.run_in_executor(self.threads, self._serve_thread, role, conn)
        except ConnectionError as exc:   # a look whether it listens, or a peer gone
            log.debug("event=hangup role=%s reason=%r", role, str(exc))
        except (asyncio.TimeoutError, Malformed, ValueError) as exc:
            log.warning("event=refused role=%s uid=%s reason=%r", role,
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

    def _gateway_listeners(self) -> list[socket.socket]:
        """The gateway's finger and policy sockets: bound here, as root (port
        79; Postfix's private/ is postfix's alone), the first time a gateway
        asks, and kept open for as long as the helper runs, so that the
        gateway itself never needs root and a restarted one gets the same
        sockets (what came in meanwhile waits in their backlog)."""
        if self.listeners is not None and not all(map(_listening, self.listeners)):
            # a gateway shut them down (they are one socket, shared): bind anew
            log.warning("event=rebind for=gateway reason=not_listening")
            self.close_listeners()
        if self.listeners is None:
            from flushctl.gateway.daemon import bind as bind_gateway
            self.listeners = bind_gateway(self.config)
            log.info("event=listen for=gateway finger=%s policy=%s",
                     self.config.finger_listen, self.config.policy_listen)
        return self.listeners

    def close_listeners(self) -> None:
        for sock in self.listeners or ():
            sock.close()
        if self.listeners and self.config.policy_listen.kind == "unix":
            try:
                os.unlink(self.config.policy_listen.path)
            except OSError:
                pass
        self.listeners = None

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
        its own ``HeldMail`` (its own ledger connection)."""
        from flushctl import metrics
        from flushctl.poller import loop as poller
        from flushctl.heldmail.library import HeldMail
        od = HeldMail(self.config)
        od.check_source = self.keeper_check   # the keeper's, in this process
        if role == "poller":
            ops = poller.LocalOps(od)
            handle, limit = (lambda r: poller.answer(ops, r)), poller.MAX_REQUEST
        elif role == "odmr":
            from flushctl.odmr import authority
            handle, limit = (lambda r: authority.answer(od, self.odmr_logins, r)), \
                wire.MAX_MESSAGE
        elif role == "portal":
            from flushctl.portal import authority as portal
            handle, limit = (lambda r: portal.answer(od, self.portal_logins, r)), \
                wire.MAX_MESSAGE
        elif role == "scrape":
            scrape = metrics.scrape_of(od)
            handle, limit = (lambda r: poller.answer_scrape(scrape, r)), wire.MAX_MESSAGE
        else:
            handle, limit = (lambda r: answer_admin(od, r)), wire.MAX_MESSAGE
        if not wire.serve_channel(conn, handle, role, limit):
            log.error("event=refused role=%s reason=cut_off", role)


def _listening(sock: socket.socket) -> bool:
    """Does the socket still take connections?  A gateway holds the same
    socket and may have shut it down: then TCP's says it no longer
    accepts, and a unix socket refuses a connection."""
    try:
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return False
        if sock.family != socket.AF_UNIX:
            return True
        with socket.socket(socket.AF_UNIX) as probe:
            probe.setblocking(False)
            try:
                probe.connect(sock.getsockname())
            except BlockingIOError:   # a full backlog: still listening
                pass
        return True
    except OSError:
        return False


def _finish_relay_changes(config: Config) -> None:
    """A relay change cut short: the transport map made to say what
    relays.json says, and the held mail of each such domain routed anew."""
    from flushctl.heldmail.library import HeldMail
    from flushctl.mta.relay_change import reconcile, settled
    held = HeldMail(config)
    try:
        for name in reconcile(config, held.postfix):
            held.route_anew(name)
            settled(config, name)
    except Exception:   # the rest of the helper's work must start all the same
        log.exception("event=error stage=relay_reconcile")


def run(config: Config) -> None:
    """Serve until SIGTERM: the keeper, the forwarder and every role."""
    from flushctl.heldmail.keeper import start_thread
    if os.geteuid() != 0:
        raise PrivsepError("helper: must run as root (postsuper is root's)")
    stopsignals.catch()
    helper = Helper(config)   # the ledger opened: its socket is bound only once ready
    listener = helper.listener = bind(config)   # (one helper at a time: this one)
    _finish_relay_changes(config)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        stopsignals.on_stop(loop, stop.set)
        await helper.serve(stop)

    end_keeper, kept = start_thread(config)
    helper.keeper_check = kept.current_check
    try:
        asyncio.run(main())
    finally:
        end_keeper()
        helper.close_listeners()
        listener.close()
        try:
            os.unlink(config.helper_socket)
        except OSError:
            pass
