"""The cluster: a release on one backup MX happens on all of them.

Every release here that did not come from a peer (finger, ETRN, the
poller, `flushctl flush`) queues in the ledger one forward per peer of
``[cluster] peers``.  The gateway's ``Forwarder`` sends each as
``ETRN domain`` to that peer's own Postfix, the protocol every MX already
speaks; the peer's smtpd asks its gateway (policy service), which knows
the peers by address, releases there and does not send it on: no loops,
with any number of hosts.  A peer that is down, or answers 4xx, is tried
again with backoff (1 s doubling, at most 60 s apart) for
``[cluster] retry_for`` seconds; 2xx ends it, and so does 5xx (the peer
will not do it; logged).

``finger '?domain@peer'`` asks a peer what it holds without releasing
anything (finger.REPORT); `flushctl status --cluster` reads every peer
that way.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass

from flushctl.protocols import finger
from flushctl.names import forwarded
from flushctl.config import Cluster, Peer
from flushctl.heldmail.ledger.schema import Forward
from flushctl.heldmail.ledger.store import Ledger

log = logging.getLogger("flushctl.cluster")

BACKOFF_CAP = 60.0
PER_SESSION = 50          # ETRN commands per SMTP session (smtpd_junk_command_limit is 100)
TIMEOUT = 30.0            # one whole SMTP session to a peer
POLL = 0.5                # how often forwards queued by other processes are looked for
MAX_REPLY_LINES = 100


class PeerError(Exception):
    """The peer did not speak SMTP as expected."""


def backoff(attempts: int) -> float:
    """Seconds before the next try after ``attempts`` failed ones."""
    return min(BACKOFF_CAP, 2.0 ** max(0, attempts - 1))


def helo_name(cluster: Cluster) -> str:
    return cluster.helo or socket.getfqdn()


def peer_addresses(cluster: Cluster) -> frozenset[str]:
    """The addresses the peers' names resolve to (a name that does not
    resolve now is left out, and logged)."""
    found: set[str] = set()
    for peer in cluster.peers:
        try:
            infos = socket.getaddrinfo(peer.host, None, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError) as exc:
            log.warning("event=peer_unresolved peer=%s reason=%r", peer, str(exc))
            continue
        found.update(info[4][0] for info in infos)
    return frozenset(found)


async def _read_reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines = []
    while True:
        try:
            line = await reader.readline()
        except ValueError:   # longer than the stream's limit
            raise PeerError("reply line too long") from None
        if not line.endswith(b"\n"):
            raise PeerError("connection closed" if not line else "reply line too long")
        if len(line) < 4 or not line[:3].isdigit() or line[3:4] not in (b" ", b"-", b"\r"):
            raise PeerError(f"not an SMTP reply: {line[:80]!r}")
        lines.append(line[4:].decode("utf-8", "replace").strip())
        if line[3:4] != b"-":
            return int(line[:3]), lines[0]
        if len(lines) > MAX_REPLY_LINES:
            raise PeerError("reply too long")


async def send_etrn(peer: Peer, domains: list[str], helo: str, source: str | None = None,
                    timeout: float = TIMEOUT, results: dict | None = None,
                    sent: list | None = None) -> dict[str, tuple[int, str]]:
    """One SMTP session: EHLO, then a forwarded ETRN for each domain; the
    peer's reply to each.  Each step (connecting and the greeting, EHLO,
    each ETRN's reply: the peer answers once its release is decided) has
    ``timeout`` seconds; the replies land in ``results`` as they come, so
    a session cut short keeps the ones it got, and each domain whose ETRN
    was sent in ``sent``."""
    results = {} if results is None else results
    sent = [] if sent is None else sent
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            peer.host, peer.port, local_addr=(source, 0) if source else None, limit=4096)
    try:
        async with asyncio.timeout(timeout):
            code, text = await _read_reply(reader)
            if code != 220:
                raise PeerError(f"greeting {code} {text}")
            writer.write(f"EHLO {helo}\r\n".encode())
            code, text = await _read_reply(reader)
            if code != 250:
                raise PeerError(f"EHLO: {code} {text}")
        plain = False   # a peer of an older version: the plain form for the rest
        for domain in domains:
            sent.append(domain)
            async with asyncio.timeout(timeout):
                writer.write(f"ETRN {domain if plain else forwarded(domain)}\r\n".encode())
                reply = await _read_reply(reader)
                if reply[0] == 501 and not plain:
                    # it does not know the forwarded form (it knows its peers
                    # by address and EHLO name, as it always did); one such
                    # error per session, smtpd counts them
                    plain = True
                    writer.write(f"ETRN {domain}\r\n".encode())
                    reply = await _read_reply(reader)
            results[domain] = reply
        writer.write(b"QUIT\r\n")
        async with asyncio.timeout(timeout):
            await writer.drain()
        return results
    finally:
        writer.close()


async def ask_report(peer: Peer, domain: str, port: int, source: str | None = None,
                     timeout: float = 10.0) -> dict:
    """The peer's finger report of ``domain`` (what it holds; nothing released)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            peer.host, port, local_addr=(source, 0) if source else None, limit=4096)
        try:
            writer.write(f"{finger.REPORT_PREFIX}{domain}\r\n".encode())
            answer = await reader.read(4096)
        finally:
            writer.close()
    line = answer.decode("utf-8", "replace").strip()
    report = finger.parse_report(line)
    if report is None:
        raise PeerError(line[:200] or "no answer")
    return report


@dataclass
class Forwarder:
    """In the release helper: sends the ledger's pending forwards."""

    ledger: Ledger
    cluster: Cluster

    def __post_init__(self):
        self.helo = helo_name(self.cluster)
        self.peers = {str(peer): peer for peer in self.cluster.peers}
        self.wake = asyncio.Event()
        self._sessions: dict[str, asyncio.Task] = {}   # peer -> its session under way

    async def run(self, stop: asyncio.Event) -> None:
        log.info("event=forwarder_start peers=%s", ",".join(self.peers))
        try:
            while not stop.is_set():
                self.wake.clear()   # a wake from here on is seen below
                try:
                    await self.round(wait=False)
                    next_due = await asyncio.to_thread(self.ledger.next_forward_due,
                                                       frozenset(self._sessions))
                except Exception:
                    log.exception("event=error stage=forward")
                    next_due = None
                delay = POLL if next_due is None else min(POLL, max(0.0, next_due - time.time()))
                waits = [asyncio.ensure_future(stop.wait()),
                         asyncio.ensure_future(self.wake.wait())]
                await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()
        finally:
            # not waiting out a peer's timeout: what is pending stays queued
            for task in list(self._sessions.values()):
                task.cancel()

    async def round(self, wait: bool = True) -> None:
        """Start a session to each peer with forwards due and none under way.
        Each peer has its own: a slow or silent peer holds up only its own
        forwards, never the other peers' (``wait``: until these end)."""
        # a peer with a session under way when the rows are read waits for
        # the next round, even if the session ends during the read: its rows
        # may be stale (acked or put off meanwhile); the session's end wakes
        # the loop
        busy = set(self._sessions)
        due = await asyncio.to_thread(self.ledger.forwards, time.time())
        by_peer: dict[str, list[Forward]] = {}
        for fwd in due:
            if fwd.peer not in busy:
                by_peer.setdefault(fwd.peer, []).append(fwd)
        started = []
        for name, rows in by_peer.items():
            task = asyncio.get_running_loop().create_task(self._session(name, rows))
            self._sessions[name] = task
            task.add_done_callback(lambda _, name=name: self._ended(name))
            started.append(task)
        if wait and started:
            await asyncio.gather(*started)

    async def _session(self, name: str, rows: list[Forward]) -> None:
        try:
            await self._peer(name, rows)
        except Exception:   # its rows stay queued; not straight back at them
            log.exception("event=error stage=forward peer=%s", name)
            await asyncio.sleep(POLL)

    def _ended(self, name: str) -> None:
        self._sessions.pop(name, None)
        self.wake.set()   # forwards queued for that peer meanwhile are due

    async def _done(self, fwd: Forward, event: str, detail: str) -> None:
        level = logging.INFO if event == "forward_acked" else logging.WARNING
        log.log(level, "event=%s domain=%s peer=%s attempts=%d reply=%r",
                event, fwd.domain, fwd.peer, fwd.attempts + 1, detail)
        await asyncio.to_thread(self.ledger.forward_done, fwd.domain, fwd.peer, fwd.since)
        await self._count(fwd, event.removeprefix("forward_"))

    async def _count(self, fwd: Forward, result: str) -> None:
        await asyncio.to_thread(self.ledger.add_counts, [("forwards", (fwd.peer, result), 1)])

    async def _retry(self, fwd: Forward, detail: str) -> None:
        wait = backoff(fwd.attempts + 1)
        log.info("event=forward_retry domain=%s peer=%s attempts=%d next_in=%.0f reason=%r",
                 fwd.domain, fwd.peer, fwd.attempts + 1, wait, detail)
        await asyncio.to_thread(self.ledger.forward_retry, fwd.domain, fwd.peer, fwd.since,
                                time.time() + wait, detail)
        await self._count(fwd, "retry")

    async def _peer(self, name: str, rows: list[Forward]) -> None:
        peer = self.peers.get(name)
        now = time.time()
        live = []
        for fwd in rows:
            if peer is None:
                await self._done(fwd, "forward_dropped", "no longer a configured peer")
            elif now - fwd.since > self.cluster.retry_for:
                await self._done(fwd, "forward_expired", fwd.last_error or "")
            else:
                live.append(fwd)
        for start in range(0, len(live), PER_SESSION):
            chunk = live[start:start + PER_SESSION]
            replies: dict[str, tuple[int, str]] = {}
            sent: list[str] = []
            settled: set[str] = set()
            try:
                unsent = await self._chunk(peer, chunk, replies, sent, settled)
            except asyncio.CancelledError:
                # stopping: what the peer answered is settled now (no await
                # left to us), the rest stays queued for the next start
                for fwd in chunk:
                    code = replies.get(fwd.domain, (0, ""))[0]
                    if fwd.domain not in settled and code // 100 in (2, 5):
                        self.ledger.forward_done(fwd.domain, fwd.peer, fwd.since)
                        log.info("event=forward_settled_at_stop domain=%s peer=%s reply=%r",
                                 fwd.domain, fwd.peer, " ".join(map(str, replies[fwd.domain])))
                raise
            if unsent:
                return   # the next round reads the rows again, in the order they are due

    async def _chunk(self, peer: Peer, chunk: list[Forward], replies: dict, sent: list,
                     settled: set) -> bool:
        """One session for ``chunk``; each forward settled by its reply (in
        ``settled`` once done).  True when some were never sent because the
        peer took too long over one before them: those stay due, and go in
        the next session, ahead of it (it backs off).  Any other failure
        backs off every domain the peer did not answer."""
        reason, slow = None, False
        try:
            await send_etrn(peer, [f.domain for f in chunk], self.helo,
                            self.cluster.source, results=replies, sent=sent)
        except (OSError, PeerError, TimeoutError) as exc:
            reason, slow = str(exc) or type(exc).__name__, isinstance(exc, TimeoutError)
        unsent = False
        for fwd in chunk:
            if fwd.domain not in replies:
                if slow and sent and fwd.domain not in sent:
                    unsent = True
                    continue
                await self._retry(fwd, reason or "no reply")
            else:
                code, text = replies[fwd.domain]
                detail = f"{code} {text}"
                if 200 <= code < 300:
                    await self._done(fwd, "forward_acked", detail)
                elif 500 <= code < 600:
                    await self._done(fwd, "forward_refused", detail)
                else:
                    await self._retry(fwd, detail)
            settled.add(fwd.domain)
        return unsent


HERE = "(here)"


async def cluster_status(cluster: Cluster, local: list, pending: list[Forward],
                         concurrency: int = 20) -> list[dict]:
    """Each domain's held mail on this host (``local``: Status rows) and on
    every peer (its finger report), with any ETRN still pending to it."""
    waiting = {(f.domain, f.peer): f for f in pending}
    limit = asyncio.Semaphore(concurrency)

    async def peer_row(domain: str, peer: Peer) -> dict:
        row = {"domain": domain, "host": str(peer), "messages": None, "bytes": None,
               "oldest_arrival": None, "reachable": None, "error": None, "pending": None}
        try:
            async with limit:
                report = await ask_report(peer, domain, cluster.finger_port, cluster.source)
            row.update({k: report[k] for k in ("messages", "bytes", "oldest_arrival",
                                                "reachable")})
        except (OSError, PeerError, TimeoutError) as exc:
            row["error"] = str(exc) or type(exc).__name__
        fwd = waiting.get((domain, str(peer)))
        if fwd is not None:
            row["pending"] = {"since": fwd.since, "attempts": fwd.attempts,
                              "last_error": fwd.last_error}
        return row

    rows = []
    for st in local:
        rows.append({"domain": st.domain, "host": HERE, "messages": st.messages,
                     "bytes": st.bytes, "oldest_arrival": st.oldest_arrival,
                     "reachable": st.reachable, "error": None, "pending": None})
        rows.extend(await asyncio.gather(*(peer_row(st.domain, p) for p in cluster.peers)))
    return rows


PEER_REFRESH = 300.0    # seconds between lookups of the peers' addresses


async def refresh_peers(config, gate, stop: asyncio.Event | None = None
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
            found = await asyncio.to_thread(peer_addresses, config.cluster)
        except Exception:   # the next look may do better; the gate keeps what it has
            log.exception("event=error stage=peers")
            continue
        if found and found != gate.peers:
            log.info("event=peers addresses=%s", ",".join(sorted(found)))
            gate.peers = found
