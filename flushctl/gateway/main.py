"""`flushctl gateway`: finger and ETRN release a domain's held mail.

One asyncio process serves two listeners:
- finger (RFC 1288) on ``[gateway] finger_listen``: one query line, one
  short answer, then the connection closes;
- Postfix's policy delegation protocol on ``[gateway] policy_listen``:
  smtpd asks it for every ETRN (``check_policy_service`` in
  smtpd_etrn_restrictions, set by ``flushctl apply``).

Parsing lives in ``finger`` and ``policyproto``, authorisation and rate
limits in ``gate``; the release itself is ``HeldMail.flush``, run in a
worker thread.  With ``[cluster]``, the peers' addresses are known to the
gate (their ETRN is a "peer" trigger, not sent on again), and the
process that releases also runs the ``cluster.Forwarder`` that sends this
host's releases on to the peers.  Every listener caps its connections, the length of what
it reads and the time a client may take; a bad request closes that one
connection and nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import time
from dataclasses import dataclass

from flushctl import cluster, names

from flushctl.protocols import finger

from flushctl.protocols import smtpd_policy

from flushctl.privsep import core as privsep
from flushctl.config import Config
from flushctl.metrics import FLUSH_INTERVAL, Counts
from flushctl.gateway.gate import ALLOWED, NOT_ALLOWED, Gate
from flushctl.heldmail.library import HeldMail, Refused, Status

log = logging.getLogger("flushctl.gateway")

RELEASED = "released"
NOTHING = "nothing held"
UNREACHABLE = "unreachable"
NOWHERE = "nowhere"     # this host is the best MX, or Postfix cannot route the domain
PAUSED = "paused"
FAILED = "failed"
REPORTED = "reported"   # a report query: nothing released

PEER_REFRESH = 300.0    # seconds between lookups of the peers' addresses


@dataclass(frozen=True)
class Outcome:
    kind: str
    released: int
    target: str
    detail: str
    before: Status | None  # what was held when the release began
    shared: bool = False    # answered from a release another trigger started


class Releaser:
    """At most one release per domain at a time; triggers inside the window share it.

    Triggers that arrive while a release runs wait for it and get its
    result; triggers within ``window`` seconds after a release get its
    result too, as long as no new mail has arrived for the domain since.
    The window is the ledger's (``HeldMail.flush``): a release by the
    poller, an admin or a peer counts as much as one started here; this
    process's own recent releases are also answered from memory, without
    a worker thread.
    """

    def __init__(self, ondemand: HeldMail, window: float):
        self.ondemand = ondemand
        self.window = window
        self._inflight: dict[str, asyncio.Task] = {}
        self._tasks: set[asyncio.Task] = set()   # releases under way (the loop keeps weak refs)
        self._recent: dict[str, tuple[float, Outcome, float]] = {}
        self._sent_on: dict[str, float] = {}   # domain -> when last queued for the peers
        self.forwarded = None   # called when a release was queued for the peers

    async def trigger(self, domain: str, how: str, client: str) -> Outcome:
        if how == "report":
            try:
                status = await asyncio.to_thread(self.ondemand.status, domain)
            except Exception as exc:   # answered, as a failed release is
                log.exception("event=error stage=report domain=%s", domain)
                return Outcome(REPORTED, 0, "", str(exc), None)
            return Outcome(REPORTED, 0, "", "", status)
        recent = self._recently(domain)
        if recent is not None:
            return recent
        if domain in self._inflight:
            return _shared(await asyncio.shield(self._inflight[domain]))
        # Most queries find nothing held: one row read answers them here,
        # without a worker thread or the queue (unless the ledger file was
        # replaced: its rebuild reads the hold queue, in a worker thread).
        if self.ondemand.needs_rebuild():
            empty = await asyncio.to_thread(self.ondemand.status_if_empty, domain)
        else:
            empty = self.ondemand.status_if_empty(domain)
        if empty is not None:
            # nothing here, but the peers may hold some: they release too
            await self._send_on(domain, how)
            return Outcome(NOTHING, 0, "", "", empty)
        # The release is a task of its own: the trigger that started it may
        # go (its connection closed) while the release runs on and others
        # wait for its outcome.
        # started, or even done, while this one looked at the ledger
        if domain in self._inflight:
            return _shared(await asyncio.shield(self._inflight[domain]))
        recent = self._recently(domain)
        if recent is not None:
            return recent
        task = asyncio.get_running_loop().create_task(self._run(domain, how, client))
        self._inflight[domain] = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    def _recently(self, domain: str) -> Outcome | None:
        """A release a moment ago answers for this trigger too, unless mail
        has arrived since: then there is something new to release."""
        recent = self._recent.get(domain)
        if recent and time.monotonic() - recent[0] < self.window \
                and not self.ondemand.ledger.arrived_since(domain, recent[2]):
            return _shared(recent[1])
        return None

    async def _run(self, domain: str, how: str, client: str) -> Outcome:
        started = time.time()
        try:
            outcome = await asyncio.to_thread(self._release, domain, how, client)
        finally:
            del self._inflight[domain]
        if how != "peer":
            self._sent_on[domain] = time.monotonic()   # flush queued it for the peers
            self._wake()
        # Only a release is worth sharing; "nothing held" or "server down"
        # may change any moment, and the next trigger looks again.
        if outcome.kind == RELEASED:
            self._recent[domain] = (time.monotonic(), outcome, started)
        else:
            self._recent.pop(domain, None)
        return outcome

    async def add_counts(self, items) -> None:
        await asyncio.to_thread(self.ondemand.ledger.add_counts, items)

    async def _send_on(self, domain: str, how: str) -> None:
        if how == "peer" or self.ondemand.config.cluster is None:
            return
        last = self._sent_on.get(domain)
        if last is not None and time.monotonic() - last < self.window:
            return   # a flood of triggers for one domain: one ETRN to each peer
        self._sent_on[domain] = time.monotonic()
        await asyncio.to_thread(self.ondemand.send_on, domain, how)
        self._wake()

    def _wake(self) -> None:
        if self.forwarded is not None:
            self.forwarded()

    def _release(self, domain: str, how: str, client: str) -> Outcome:
        od = self.ondemand
        try:
            before = od.status(domain)
        except Exception:
            log.exception("event=error stage=status domain=%s", domain)
            return Outcome(FAILED, 0, "", "status failed", None)
        try:
            result = od.flush(domain, trigger=how, client=client)
        except Refused as exc:
            kind = {"paused": PAUSED, "nowhere": NOWHERE}.get(exc.code, UNREACHABLE)
            return Outcome(kind, 0, "", str(exc), before)
        except Exception as exc:
            log.exception("event=error stage=release domain=%s", domain)
            return Outcome(FAILED, 0, "", str(exc), before)
        if result.shared:   # a release moments ago, by any trigger, answers for this one
            return Outcome(RELEASED, 0, result.probe.target if result.probe else "", "",
                           before, shared=True)
        if result.probe is None:
            return Outcome(NOTHING, 0, "", "", before)
        return Outcome(RELEASED, result.released, result.probe.target, "", before)


def encode_outcome(outcome: Outcome) -> dict:
    return {"kind": outcome.kind, "released": outcome.released, "target": outcome.target,
            "detail": outcome.detail, "shared": outcome.shared,
            "before": outcome.before.as_json() if outcome.before is not None else None}


def decode_outcome(data: dict) -> Outcome:
    before = data.get("before")
    return Outcome(data["kind"], data["released"], data["target"], data["detail"],
                   Status(**before) if before is not None else None, data["shared"])


def _shared(outcome: Outcome) -> Outcome:
    return Outcome(outcome.kind, outcome.released, outcome.target, outcome.detail,
                   outcome.before, shared=True)


def finger_reply(domain: str, outcome: Outcome, verbose: bool) -> list[str]:
    """The plain lines a customer reads after fingering its domain."""
    st = outcome.before
    lines = []
    if st is None or st.messages == 0:
        lines.append(f"{domain}: no mail held.")
    else:
        age = finger.age_text(time.time() - st.oldest_arrival) if st.oldest_arrival else "-"
        lines.append(f"{domain}: {st.messages} message(s), {st.bytes} bytes held; "
                     f"oldest {age}.")
    if outcome.kind == RELEASED:
        where = f" ({outcome.target})" if outcome.target else ""
        lines.append(f"Delivery started to your mail server{where}.")
    elif outcome.kind == UNREACHABLE:
        lines.append("Delivery not started: your mail server does not answer; "
                     "your mail stays held.")
    elif outcome.kind == NOWHERE:
        lines.append("Delivery not started: there is nowhere to deliver it from here "
                     "(check your domain's MX records); your mail stays held.")
    elif outcome.kind == PAUSED:
        lines.append("Delivery not started: releases for this domain are paused here.")
    elif outcome.kind == FAILED:
        lines.append("Delivery not started: temporary problem here; try again later.")
    if verbose and st is not None and st.last_flush:
        when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(st.last_flush))
        lines.append(f"Previous release: {when} ({st.last_flush_trigger}).")
    return lines


def etrn_action(domain: str, outcome: Outcome) -> str:
    if outcome.kind in (RELEASED, NOTHING):
        return "OK"
    if outcome.kind == UNREACHABLE:
        return f"458 4.4.1 <{domain}>: unable to queue messages: your mail server does not answer"
    if outcome.kind == NOWHERE:
        return (f"458 4.4.4 <{domain}>: unable to queue messages: nowhere to deliver from "
                "here (check your MX records)")
    if outcome.kind == PAUSED:
        return f"458 4.7.1 <{domain}>: releases for this domain are paused here"
    return "451 4.3.0 temporary problem here; try again later"


class Gateway:
    """The network side: listeners, parsing, authorisation, rate limits.

    ``releaser`` is a ``Releaser`` when everything runs in one process, or
    a ``privsep.RemoteReleaser`` asking the release helper.
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

    def _log(self, how: str, client: str, domain: str, result: str,
             protocol: str | None = None, detail: str = "") -> None:
        result = result.replace(" ", "_")
        protocol = protocol or ("etrn" if how == "etrn" else "finger")
        self.counts.add("gateway_requests", protocol, result)
        log.info("event=trigger how=%s client=%s domain=%s result=%s%s",
                 how, client, domain or "-", result, detail)

    async def _decide(self, how: str, client: str, domain: str,
                      passed_on: bool = False) -> tuple[str, Outcome | None]:
        protocol = "etrn" if how == "etrn" else "finger"
        if how != "report" and (passed_on or self.gate.is_peer(client)):
            how = "peer"   # a release passed on by another MX: released here, not sent on
        verdict = self.gate.check(client, domain, time.monotonic())
        if verdict != ALLOWED:
            self._log(how, client, domain, verdict, protocol)
            return verdict, None
        try:
            outcome = await self.releaser.trigger(domain, how, client)
        except privsep.PrivsepError as exc:
            outcome = Outcome(FAILED, 0, "", str(exc), None)
        self._log(how, client, domain, "shared" if outcome.shared else outcome.kind, protocol,
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
        how = "report" if query.kind == finger.REPORT else "finger"
        verdict, outcome = await self._decide(how, client, query.domain)
        if verdict == NOT_ALLOWED:
            return [finger.NOT_SERVED.format(domain=query.domain)]
        if outcome is None:
            return [finger.BUSY_LINE]
        if outcome.kind == REPORTED and outcome.before is not None:
            st = outcome.before
            return [finger.report_line(query.domain, st.messages, st.bytes, st.oldest_arrival,
                                       st.reachable)]
        if outcome.kind == REPORTED:   # the status could not be read
            return ["Temporary problem here; try again later."]
        return finger_reply(query.domain, outcome, query.verbose)

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
            log.warning("event=refused how=etrn reason=not_postfix uid=%d", peer)
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
                    log.warning("event=refused how=etrn reason=request_too_long")
                    return
                try:
                    request = smtpd_policy.parse(block)
                except smtpd_policy.ProtocolError as exc:
                    log.warning("event=refused how=etrn reason=%r", str(exc))
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
            return "501 5.5.4 invalid domain name"
        # a peer's forwarder marks its ETRN: released here, never sent on
        passed_on = marked or request.helo_name.lower().rstrip(".") in self.peer_names
        verdict, outcome = await self._decide("etrn", client, domain, passed_on)
        if verdict == NOT_ALLOWED and self.gate.is_peer(client):
            return f"554 5.7.1 <{domain}>: not a domain of this host"   # the peer stops trying
        if verdict == NOT_ALLOWED:
            return f"459 4.7.1 <{domain}>: not served here"
        if outcome is None:
            return "450 4.7.1 too many requests; try again later"
        return etrn_action(domain, outcome)

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
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, asked)
        watching = None
        if closed is not None:   # the release helper hung up: nobody can release
            watching = loop.create_task(closed.wait())   # held: the loop's refs are weak
            watching.add_done_callback(lambda _: stop.set())
        log.info("event=start finger=%s policy=%s domains=%d user=%s",
                 self.config.finger_listen, self.config.policy_listen,
                 len(self.config.domains), privsep.current_user())
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


def helper_gate(config: Config, peers: frozenset[str]) -> Gate:
    """The release helper's own gate: one for every gateway that connects."""
    return Gate(config.domains, per_minute=config.gateway.rate_per_minute,
                burst=config.gateway.rate_burst, peers=peers)


async def serve_parent(config: Config, channel, releaser, gate: Gate) -> None:
    """The release helper's side of one gateway: carry out its requests,
    deciding again with ``gate`` (the helper's, shared by every gateway
    connection) what protects a customer (flush_from, rate limits,
    peers), and answering every one."""
    await privsep.serve_releases(
        channel, releaser, config.domains, encode_outcome, gate,
        refused=lambda verdict: Outcome(FAILED, 0, "", f"refused: {verdict}", None),
        failed=lambda text: Outcome(FAILED, 0, "", text, None))


async def with_forwarder(config: Config, rel: Releaser, serving) -> None:
    """Run the coroutine ``serving`` and, with [cluster], the forwarder
    that sends ``rel``'s releases on to the peers beside it."""
    if config.cluster is None:
        await serving
        return
    forwarder = cluster.Forwarder(rel.ondemand.ledger, config.cluster)
    rel.forwarded = forwarder.wake.set
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(forwarder.run(stop))
    try:
        await serving
    finally:
        stop.set()
        task.cancel()   # not waiting out a peer's timeout: what is pending stays queued
        try:
            await task
        except asyncio.CancelledError:
            pass


async def refresh_peers(config: Config, gate: Gate, stop: asyncio.Event | None = None
                        ) -> None:
    """The peers' names may move to other addresses: look them up again now
    and then (the gateway and the release helper each keep their own gate)."""
    if config.cluster is None:
        return
    stop = stop or asyncio.Event()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), PEER_REFRESH)
            return
        except asyncio.TimeoutError:
            pass
        try:
            found = await asyncio.to_thread(cluster.peer_addresses, config.cluster)
        except Exception:   # the next look may do better; the gate keeps what it has
            log.exception("event=error stage=peers")
            continue
        if found and found != gate.peers:
            log.info("event=peers addresses=%s", ",".join(sorted(found)))
            gate.peers = found


def bind(config: Config) -> list:
    """The gateway's listeners, finger and policy (root's work: port 79,
    Postfix's private/); both or neither."""
    finger = privsep.bind(config.finger_listen, backlog=1024)
    try:
        return [finger, privsep.bind(config.policy_listen, backlog=128)]
    except BaseException:
        finger.close()
        raise


def run(config: Config, ondemand: HeldMail | None = None) -> None:
    """Serve.  Started as root with ``[gateway] user`` empty, one process
    binds and releases itself.  Otherwise it serves as ``[gateway] user``
    (as root, it becomes that user before anything else) with no privilege
    at all: the release helper (``flushctl helper``, root) binds its
    listeners (port 79, the policy socket in Postfix's private/) and hands
    them over, and decides again every release it asks for."""
    from flushctl.privsep import helper
    user = config.gateway.user
    root = os.geteuid() == 0
    if root and not user:
        sockets = bind(config)
        peers = _peers(config)

        async def single():
            try:
                rel = Releaser(ondemand or HeldMail(config), config.gateway.release_window)
                rel.ondemand.ledger   # opened now: a ledger that cannot be is said at start
            except (OSError, sqlite3.Error) as exc:
                raise privsep.PrivsepError(
                    f"cannot open the ledger in {config.state_directory}: {exc}") from None
            await with_forwarder(config, rel, Gateway(config, rel, peers).serve(sockets))
        asyncio.run(single())
        return

    if root:
        privsep.drop_privileges(privsep.account(user), "gateway", groups=True)
    channel, sockets = helper.connect_gateway(config, wait=helper.CONNECT_WAIT)
    peers = _peers(config)

    async def main():
        remote = privsep.RemoteReleaser(channel, decode_outcome)
        await remote.start()
        gateway = Gateway(config, remote, peers)
        await gateway.serve(sockets, closed=remote.closed)
        if not gateway.asked_to_stop:
            # not a stop asked for: exit with an error, and the supervisor restarts us
            raise privsep.PrivsepError("gateway: the release helper is gone")
    asyncio.run(main())


def _peers(config: Config) -> frozenset:
    peers = cluster.peer_addresses(config.cluster) if config.cluster else frozenset()
    if peers:
        log.info("event=peers addresses=%s", ",".join(sorted(peers)))
    return peers
