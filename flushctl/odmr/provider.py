"""The ODMR provider's state and decisions: who may ATRN what, live sessions, failed logins.

One ``Provider`` per daemon.  It knows the live sessions (at most one per
domain), takes Postfix's connections to the domains' relay addresses
(``mta.routing.odmr_address``, port [odmr] relay_port) and hands each to
its domain's session, counts failed logins per client address and per
user, and decides every ATRN by RFC 2645 §5.2.1 before a session turns
a connection around.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from flushctl import names
from flushctl.config import Config
from flushctl.mta.routing import odmr_address
from flushctl.odmr.relay import loopback_peer_uid
from flushctl.privsep.errors import PrivsepError

log = logging.getLogger("flushctl.odmr")

FAILURE_MEMORY = 900.0        # seconds a failed login counts against a client or a user


class Provider:
    def __init__(self, config: Config, helper, postfix_uid: int | None):
        self.config = config
        self.settings = config.odmr
        self.helper = helper                 # async call(request) -> reply
        self.postfix_uid = postfix_uid
        self.relays: dict = {}               # domain -> its live session's Relay
        self.by_address: dict[str, list[str]] = {}   # relay address -> its domains
        for d in config.domains.values():
            if d.odmr:
                self.by_address.setdefault(odmr_address(d.name), []).append(d.name)
        self.busy: set[str] = set()          # domains with a session, turned around or turning
        self._failures: dict[str, deque] = {}
        self.connections = 0                 # at once
        self.stopping = asyncio.Event()      # the daemon stops: sessions end
        self.running: set[asyncio.Future] = set()   # sessions turned around

    # -- Postfix's connections to the relay addresses -----------------------------
    async def postfix_connection(self, reader: asyncio.StreamReader,
                                 writer: asyncio.StreamWriter) -> None:
        """Postfix's odmr transport, connected to a domain's relay address:
        passed to that domain's live session, else 421 (deferred, held
        again).  Any other local user is turned away: only Postfix's
        mail_owner may talk to a customer's MTA as us."""
        sock = writer.get_extra_info("socket")
        ours, theirs = sock.getsockname()[:2], sock.getpeername()[:2]
        if self.postfix_uid is not None and loopback_peer_uid(ours, theirs) != self.postfix_uid:
            log.warning("event=refused reason=not_postfix peer=%s:%d", *theirs)
            writer.close()
            return
        relay = next((self.relays[d] for d in self.by_address.get(ours[0], ())
                      if d in self.relays), None)
        if relay is None:
            writer.write(b"421 4.3.0 No ODMR session for this domain now\r\n")
            writer.close()
            return
        await relay.serve_postfix(reader, writer)

    # -- logins -----------------------------------------------------------------
    def _recent(self, key: str) -> deque:
        q = self._failures.setdefault(key, deque())
        now = time.monotonic()
        while q and q[0] < now - FAILURE_MEMORY:
            q.popleft()
        if not q:
            self._failures.pop(key, None)
        return q

    def blocked(self, client: str) -> bool:
        return len(self._recent("client " + client)) >= self.settings.auth_failures

    def failed(self, client: str, user: str) -> bool:
        """Count a failed login; True when the client or the user is over the limit."""
        now = time.monotonic()
        over = False
        for key in ("client " + client, "user " + user[:64]):
            q = self._recent(key)
            q.append(now)
            self._failures[key] = q
            over = over or len(q) >= self.settings.auth_failures
        return over

    async def login(self, mechanism: str, user: str, proof: dict, client: str) -> str | None:
        """A token from the helper when the login is right; None when it is not."""
        if len(self._recent("user " + user[:64])) >= self.settings.auth_failures:
            return None   # this user is locked out for a while, whoever asks
        reply = await self.helper({"op": "login", "mechanism": mechanism, "user": user[:200],
                                   "client": client, **proof})
        return reply.get("token") or None

    def domains_of(self, user: str) -> list[str]:
        return sorted(d.name for d in self.config.domains.values()
                      if d.odmr and user in d.users)

    # -- ATRN -------------------------------------------------------------------
    async def atrn(self, user: str, token: str, arg: str | None, client: str):
        """(the reply, a ``Session`` to run after it or None)."""
        mine = self.domains_of(user)
        if arg is None or not arg.strip():
            wanted = mine
        else:
            wanted = []
            for part in arg.split(","):
                try:
                    wanted.append(names.domain(part.strip()))
                except ValueError:
                    return "501 5.5.4 Syntax: ATRN [domain[,domain]...]", None
            wanted = sorted(set(wanted))
        if not wanted or any(d not in mine for d in wanted):
            # refuse all, reveal nothing (RFC 2645: no rights to any one of them)
            log.warning("event=refused user=%s client=%s domains=%s reason=not_yours",
                        user, client, ",".join(wanted)[:200])
            return "450 4.7.1 ATRN request refused", None
        if any(d in self.busy for d in wanted):
            return "451 4.3.0 Another session delivers this mail now; try again later", None
        try:
            held = (await self.helper({"op": "held", "token": token, "domains": wanted}))["held"]
        except (PrivsepError, KeyError, TypeError) as exc:
            log.error("event=error stage=atrn reason=%r", str(exc))
            return "451 4.3.0 Unable to process ATRN request now", None
        wanted = [d for d in wanted if held.get(d)]
        if not wanted:
            return "453 4.3.0 You have no mail", None
        if any(d in self.busy for d in wanted):   # taken while we asked
            return "451 4.3.0 Another session delivers this mail now; try again later", None
        from flushctl.odmr.session import Session
        self.busy.update(wanted)
        return "250 2.0.0 OK now reversing the connection", \
            Session(self, user, token, client, wanted)

    async def call(self, request: dict) -> dict:
        return await self.helper(request)

    def end(self, domains) -> None:
        for d in domains:
            self.relays.pop(d, None)
            self.busy.discard(d)

