"""One turned-around ODMR session, from the customer's greeting to its QUIT.

The session takes Postfix's connections to its domains' relay addresses
from then on (the provider hands them over), asks the release helper
to release them with the trigger ``odmr``, then watches: it ends when
nothing of its domains is queued any more, or what is left is back on
hold (a 4xx from the customer's server; a 5xx comes back marked refused,
never bounced), or the customer hangs up, or the session's time cap
([odmr] session_timeout) is reached.  Then the relay addresses answer
421 again (mail on its way is deferred and held again), the customer gets
QUIT, and the session is logged as one line.
"""

from __future__ import annotations

import asyncio
import logging
import time

from flushctl.odmr.relay import Relay, SessionOver
from flushctl.privsep.errors import PrivsepError

log = logging.getLogger("flushctl.odmr")

WAIT_INTERVAL = 1.0   # seconds between looks at the session's mail


class Session:
    def __init__(self, provider, user: str, token: str, client: str, domains: list[str]):
        self.provider = provider
        self.user = user
        self.token = token
        self.client = client
        self.domains = domains
        self.started = time.monotonic()
        self.released = 0
        self.result = "delivered"

    async def run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        relay = Relay(reader, writer, self.domains)
        limit = self.provider.settings.session_timeout
        try:
            await asyncio.wait_for(self._run(relay), limit)
        except asyncio.TimeoutError:
            self.result = "timeout"
        except SessionOver as exc:
            self.result, relay.error = "lost", str(exc)
        except PrivsepError as exc:
            self.result, relay.error = "failed", str(exc)
        except Exception as exc:   # a session's bug must not end the daemon
            log.exception("event=error stage=session user=%s", self.user)
            self.result, relay.error = "failed", str(exc)
        finally:
            self.provider.end(self.domains)   # the relay addresses answer 421 again
            if relay.over.is_set() and self.result == "delivered":
                self.result = "lost"
            if self.result == "delivered":
                try:
                    await asyncio.wait_for(relay.quit(), 30)
                except asyncio.TimeoutError:
                    await relay.abort()
                if not relay.delivered:
                    self.result = "nothing_delivered"
            else:   # cut short: no QUIT into what may be the middle of a message
                await relay.abort()
            log.info("event=session user=%s client=%s domains=%s result=%s released=%d "
                     "delivered=%d connections=%d seconds=%.1f%s", self.user, self.client,
                     ",".join(self.domains), self.result, self.released, relay.delivered,
                     relay.connections, time.monotonic() - self.started,
                     f" reason={relay.error!r}" if relay.error else "")
            try:
                await self.provider.call({"op": "end", "token": self.token,
                                          "domains": self.domains, "result": self.result,
                                          "delivered": relay.delivered})
            except PrivsepError as exc:
                log.error("event=error stage=session_end reason=%r", str(exc))

    async def _run(self, relay: Relay) -> None:
        if not await relay.start(min(120.0, self.provider.settings.session_timeout)):
            self.result = "refused_greeting"
            return
        for d in self.domains:
            self.provider.relays[d] = relay
        for d in self.domains:
            outcome = await self.provider.call({"op": "release", "token": self.token,
                                                "domain": d})
            self.released += int(outcome.get("released") or 0)
        pending = set(self.domains)
        while pending and not relay.over.is_set() and not self.provider.stopping.is_set():
            try:
                await asyncio.wait_for(relay.over.wait(), WAIT_INTERVAL)
            except asyncio.TimeoutError:
                pass
            for d in sorted(pending):
                reply = await self.provider.call({"op": "wait", "token": self.token,
                                                  "domain": d})
                if reply.get("verdict") is not None:
                    pending.discard(d)
        if self.provider.stopping.is_set() and pending:
            self.result = "stopped"
        elif relay.over.is_set():
            raise SessionOver(relay.error or "the customer hung up")
