"""The gateway's listeners: finger and Postfix's policy protocol (ETRN), with
their connection caps, timeouts and per-request admission (``Gate``).

``releaser`` is a ``Releaser`` when everything runs in one process, or a
``RemoteReleaser`` asking the release helper.
"""

from __future__ import annotations

import asyncio
import logging
import time

from flushctl import stopsignals
from flushctl import names
from flushctl.cluster import refresh_peers
from flushctl.config import Config
from flushctl.gateway import replies
from flushctl.gateway.gate import ALLOWED, NOT_ALLOWED, Gate
from flushctl.heldmail.outcome import FAILED, RELEASED, REPORTED, Outcome
from flushctl.metrics import FLUSH_INTERVAL, Counts
from flushctl.privsep.accounts import current_user
from flushctl.privsep.errors import PrivsepError
from flushctl.protocols import finger, smtpd_policy

log = logging.getLogger("flushctl.gateway")


class Gateway:
    """The network side: listeners, parsing, authorisation, rate limits.

    ``releaser`` is a ``Releaser`` when everything runs in one process, or
    a ``RemoteReleaser`` asking the release helper.
    """

    def __init__(self, config: Config, releaser, peers: frozenset[str] = frozenset()):
        self.config = config
        self.settings = config.gateway
        self.gate = Gate(config.domains, per_minute=self.settings.rate_per_minute,
                         burst=self.settings.rate_burst, peers=peers)
        self.releaser = releaser
        # the peers' names: an ETRN whose EHLO names one came from a peer's
        # forwarder even if its address was not recognised (NAT, a new
        # address): it is never sent on, so a loop cannot start
        self.peer_names = frozenset(p.host for p in config.cluster.peers) \
            if config.cluster else frozenset()
        self.open = {"finger": 0, "policy": 0}
        # who may ask the policy service over its unix socket: Postfix (and root)
        self.policy_uids = frozenset({0, *_uid_of("postfix")})
        self.tasks: set[asyncio.Task] = set()
        self.counts = Counts()   # handed to the ledger by the releaser every few seconds
        self.asked_to_stop = False   # by SIGTERM or SIGINT

    def _log(self, trigger: str, client: str, domain: str, result: str,
             protocol: str | None = None, detail: str = "") -> None:
        result = result.replace(" ", "_")
        protocol = protocol or ("etrn" if trigger == "etrn" else "finger")
        self.counts.add("gateway_requests", protocol, result)
        log.info("event=request trigger=%s client=%s domain=%s result=%s%s",
                 trigger, client, domain or "-", result, detail)

    async def _decide(self, trigger: str, client: str, domain: str,
                      passed_on: bool = False, login: str = "") -> tuple[str, Outcome | None]:
        protocol = "etrn" if trigger == "etrn" else "finger"
        if trigger != "report" and (passed_on or self.gate.is_peer(client)):
            trigger = "peer"   # a release passed on by another MX: released here, not sent on
        verdict = self.gate.check(client, domain, time.monotonic(), login)
        if verdict != ALLOWED:
            self._log(trigger, client, domain, verdict, protocol)
            return verdict, None
        try:
            outcome = await self.releaser.trigger(domain, trigger, client, login)
        except PrivsepError as exc:
            outcome = Outcome(FAILED, 0, "", str(exc), None)
        self._log(trigger, client, domain, "shared" if outcome.shared else outcome.kind, protocol,
                  f"_{outcome.released}" if outcome.kind == RELEASED and not outcome.shared
                  else "")
        return verdict, outcome

    async def _hand_over_counts(self, stop: asyncio.Event) -> None:
        """Every FLUSH_INTERVAL seconds, and at the end: the counts go to the ledger."""
        while True:
            try:
                await asyncio.wait_for(stop.wait(), FLUSH_INTERVAL)
                last = True
            except asyncio.TimeoutError:
                last = False
            items = self.counts.drain()
            if items:
                try:
                    await self.releaser.add_counts(items)
                except Exception as exc:   # the ledger or the helper: next time
                    self.counts.restore(items)
                    log.warning("event=error stage=counts reason=%r", str(exc))
            if last:
                return

    # -- finger --------------------------------------------------------------
    # A Protocol rather than streams: a finger connection is one short line
    # in and a few lines out, and at thousands of queries a second the
    # stream objects and their per-connection task cost more than the query.
    def finger_protocol(self) -> "FingerConnection":
        return FingerConnection(self)

    async def _finger_lines(self, client: str, query: finger.Query) -> list[str]:
        if query.kind == finger.EMPTY:
            return [finger.SERVICE_LINE]
        if query.kind == finger.FORWARD:
            self._log("finger", client, "", "forwarding refused")
            return [finger.FORWARD_LINE]
        if query.kind == finger.INVALID:
            self._log("finger", client, "", "invalid query")
            return [finger.INVALID_LINE]
        trigger = "report" if query.kind == finger.REPORT else "finger"
        verdict, outcome = await self._decide(trigger, client, query.domain)
        if verdict == NOT_ALLOWED:
            return [finger.NOT_SERVED.format(domain=query.domain)]
        if outcome is None:
            return [finger.BUSY_LINE]
        if outcome.kind == REPORTED:
            return replies.finger_report(query.domain, outcome)
        return replies.finger_reply(query.domain, outcome, query.verbose)

    # -- policy (ETRN) -------------------------------------------------------
    async def handle_policy(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        if self.open["policy"] >= self.settings.max_connections:
            writer.close()
            return
        peer = _peer_uid(writer)
        if peer is not None and peer not in self.policy_uids:
            # only Postfix's smtpd asks: a local user who got at the socket
            # (its directory's permissions loosened) is not heard
            log.warning("event=refused protocol=etrn reason=not_postfix uid=%d", peer)
            writer.close()
            return
        self.open["policy"] += 1
        try:
            while True:
                try:
                    # smtpd keeps the connection open between requests
                    block = await asyncio.wait_for(reader.readuntil(b"\n\n"),
                                                   self.config.gateway.idle_timeout * 30)
                except (asyncio.IncompleteReadError, asyncio.TimeoutError):
                    return
                except (asyncio.LimitOverrunError, ValueError):
                    log.warning("event=refused protocol=etrn reason=request_too_long")
                    return
                try:
                    request = smtpd_policy.parse(block)
                except smtpd_policy.ProtocolError as exc:
                    log.warning("event=refused protocol=etrn reason=%r", str(exc))
                    return
                writer.write(smtpd_policy.answer(await self._policy_action(request)))
                await writer.drain()
        except ConnectionError:
            pass
        except asyncio.CancelledError:
            pass   # the gateway stops: the connection ends with it, nothing to say
        except Exception:
            log.exception("event=error stage=policy")
        finally:
            self.open["policy"] -= 1
            writer.close()

    async def _policy_action(self, request: smtpd_policy.Request) -> str:
        if request.state != "ETRN":
            return smtpd_policy.DUNNO
        client = request.client_address
        argument, marked = names.unmark(request.etrn_domain)
        try:
            domain = names.wire_domain(argument)
        except ValueError:
            self._log("etrn", client, "", "invalid domain")
            return replies.ETRN_INVALID
        # a peer's forwarder marks its ETRN: released here, never sent on
        passed_on = marked or request.helo_name.lower().rstrip(".") in self.peer_names
        verdict, outcome = await self._decide("etrn", client, domain, passed_on,
                                              _login(request.sasl_username))
        if verdict == NOT_ALLOWED:
            return replies.etrn_not_served(domain, self.gate.is_peer(client))
        if outcome is None:
            return replies.ETRN_BUSY
        return replies.etrn_action(domain, outcome)

    # -- running -------------------------------------------------------------
    async def serve(self, sockets, ready=None, closed: asyncio.Event | None = None) -> None:
        """Serve the bound ``sockets`` (finger, policy) until SIGTERM or ``closed``."""
        finger_sock, policy_sock = sockets
        finger_server = await asyncio.get_running_loop().create_server(
            self.finger_protocol, sock=finger_sock)
        policy_server = await asyncio.start_server(
            self.handle_policy, sock=policy_sock, limit=smtpd_policy.MAX_REQUEST)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def asked():
            self.asked_to_stop = True
            stop.set()
        stopsignals.on_stop(loop, asked)
        watching = None
        if closed is not None:   # the release helper hung up: nobody can release
            watching = loop.create_task(closed.wait())   # held: the loop's refs are weak
            watching.add_done_callback(lambda _: stop.set())
        log.info("event=start finger=%s policy=%s domains=%d user=%s",
                 self.config.finger_listen, self.config.policy_listen,
                 len(self.config.domains), current_user())
        if ready:
            ready()
        refresh = loop.create_task(refresh_peers(self.config, self.gate, stop))
        counting = loop.create_task(self._hand_over_counts(stop))
        async with finger_server, policy_server:
            await stop.wait()
        refresh.cancel()
        if watching is not None:
            watching.cancel()
        await counting
        log.info("event=stop")



class FingerConnection(asyncio.Protocol):
    """One finger client: read one line (or what came before EOF), answer, close."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self.transport = None
        self.buffer = b""
        self.answered = False
        self.counted = False
        self.client = "unknown"
        self.timer = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        gw = self.gateway
        if gw.open["finger"] >= gw.settings.max_connections:
            self.answered = True
            transport.abort()
            return
        gw.open["finger"] += 1
        self.counted = True
        self.client = _peer(transport)
        self.timer = asyncio.get_running_loop().call_later(gw.settings.idle_timeout,
                                                           self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return
        self.buffer += data
        newline = self.buffer.find(b"\n")
        if newline >= 0:
            self._answer(self.buffer[:newline + 1])
        elif len(self.buffer) > finger.MAX_LINE:
            self._answer(b"x" * (finger.MAX_LINE + 1))

    def eof_received(self) -> bool:
        if not self.answered:
            self._answer(self.buffer)  # no newline before the client closed its side
        return True  # keep the transport: the answer still has to go out

    def _timed_out(self) -> None:
        if not self.answered:
            self.gateway._log("finger", self.client, "", "timeout")
        self.answered = True
        self.transport.abort()

    def _answer(self, line: bytes) -> None:
        self.answered = True
        self.timer.cancel()
        # the loop keeps only weak references to tasks: hold this one until done
        task = asyncio.get_running_loop().create_task(self._reply(finger.parse(line)))
        self.gateway.tasks.add(task)
        task.add_done_callback(self.gateway.tasks.discard)

    async def _reply(self, query: finger.Query) -> None:
        try:
            lines = await self.gateway._finger_lines(self.client, query)
        except Exception:
            log.exception("event=error stage=finger client=%s", self.client)
            self.transport.abort()
            return
        if self.transport.is_closing():
            return
        self.transport.write(finger.lines_to_bytes(lines))
        self.transport.close()
        if self.transport.get_write_buffer_size():
            # a client that does not read its answer gets idle_timeout to do so
            self.timer = asyncio.get_running_loop().call_later(
                self.gateway.settings.idle_timeout, self.transport.abort)

    def connection_lost(self, exc) -> None:
        if self.counted:
            self.counted = False
            self.gateway.open["finger"] -= 1
        if self.timer is not None:
            self.timer.cancel()


def _peer(transport) -> str:
    peer = transport.get_extra_info("peername")
    return peer[0] if isinstance(peer, tuple) and peer else "unknown"


def _uid_of(user: str) -> tuple[int, ...]:
    import pwd
    try:
        return (pwd.getpwnam(user).pw_uid,)
    except KeyError:
        return ()


def _peer_uid(writer) -> int | None:
    """The uid of the process at the other end of a unix socket (None: TCP)."""
    import socket
    import struct
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _login(sasl_username: str) -> str:
    """The SMTP AUTH name as a login of ours; "" for none, or for a name no
    domain's ``users`` could hold (it authorises nothing)."""
    from flushctl.config import login_name
    try:
        return login_name(sasl_username) if sasl_username else ""
    except ValueError:
        return ""
