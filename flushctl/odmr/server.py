"""The ODMR provider's SMTP side (RFC 2645), on aiosmtpd.

aiosmtpd does the SMTP server's work: the greeting, EHLO, STARTTLS,
AUTH's exchanges, line limits, the idle timeout.  What is ODMR's is here:

- EHLO advertises ``ATRN`` and ``AUTH``: CRAM-MD5 (RFC 2645 requires it;
  fetchmail knows nothing else) always, PLAIN and LOGIN only over TLS;
- every login is checked by the release helper, which alone reads the
  credentials store; failures are answered late, and too many from one
  address or for one user end the connection with 421;
- ``ATRN [domain,...]`` is answered as RFC 2645 §5.2.1 says (250, 450,
  451, 453, 530, 502/503), and after 250 the connection turns around: the
  command handler keeps the connection (aiosmtpd's command loop waits on
  it) and hands its reader and writer to a ``relay.Relay``; aiosmtpd has
  no notion of a reversed session, so that part is ours (``session``);
- MAIL, RCPT, DATA and the like are not served: this port takes no mail.
"""

from __future__ import annotations

import asyncio
import logging

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, auth_mechanism

from flushctl.privsep.errors import PrivsepError

log = logging.getLogger("flushctl.odmr")

NOT_HERE = "502 5.5.1 Not served here: this is an ODMR (RFC 2645) port, it takes no mail"


class Handler:
    """aiosmtpd's hooks: what EHLO advertises."""

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        out = [r for r in responses if not r.startswith("250-AUTH")
               and not r.startswith("250-8BITMIME") and not r.startswith("250-SMTPUTF8")
               and r != "250 HELP"]
        mechanisms = ["CRAM-MD5"] + (["LOGIN", "PLAIN"] if server.tls_active else [])
        out += ["250-AUTH " + " ".join(mechanisms), "250-ENHANCEDSTATUSCODES", "250 ATRN"]
        return out


class OdmrSMTP(SMTP):
    """One customer's connection (aiosmtpd makes one per connection)."""

    def __init__(self, provider, **kwargs):
        super().__init__(Handler(), auth_require_tls=False, **kwargs)
        self.provider = provider
        self.user: str | None = None
        self.token: str | None = None

    def connection_made(self, transport):
        self.provider.connections += 1
        self._counted = True
        if self.provider.connections > self.provider.settings.max_sessions:
            transport.write(b"421 4.7.0 Too many connections; try again later\r\n")
            transport.close()
            return
        super().connection_made(transport)

    def connection_lost(self, exc):
        if getattr(self, "_counted", False):
            self._counted = False
            self.provider.connections -= 1
        if self.session is None:   # turned away before aiosmtpd saw it
            return
        super().connection_lost(exc)

    @property
    def tls_active(self) -> bool:
        return self._tls_protocol is not None or (
            self.transport is not None and self.transport.get_extra_info("ssl_object") is not None)

    @property
    def client(self) -> str:
        peer = self.session.peer if self.session else None
        return peer[0] if isinstance(peer, tuple) else "unknown"

    # -- what this port does not serve --------------------------------------------
    async def smtp_MAIL(self, arg):
        await self.push(NOT_HERE)

    smtp_RCPT = smtp_DATA = smtp_VRFY = smtp_EXPN = smtp_MAIL

    # -- AUTH ---------------------------------------------------------------------
    async def smtp_AUTH(self, arg):
        if self.provider.blocked(self.client):
            await self.goodbye("421 4.7.0 Too many failed logins; try again later")
            return
        await super().smtp_AUTH(arg)

    @auth_mechanism("CRAM-MD5")
    async def auth_CRAM_MD5(self, _, args) -> AuthResult:
        if len(args) != 1:
            await self.push("501 5.5.4 CRAM-MD5 takes no initial response")
            return AuthResult(success=False, handled=True)
        try:   # the helper's: good for one answer, so no exchange can be replayed
            challenge = (await self.provider.call({"op": "challenge"}))["challenge"]
        except (PrivsepError, KeyError, TypeError) as exc:
            log.error("event=error stage=login reason=%r", str(exc))
            await self.push("454 4.7.0 Temporary authentication failure")
            return AuthResult(success=False, handled=True)
        response = await self.challenge_auth(challenge)
        if response is MISSING:
            return AuthResult(success=False, handled=True)
        user, _, digest = response.decode("utf-8", "replace").rpartition(" ")
        return await self.login("CRAM-MD5", user, {"challenge": challenge, "response": digest})

    async def auth_PLAIN(self, _, args) -> AuthResult:
        if not self.tls_active:
            return await self._needs_tls()
        return await self._checked(await super().auth_PLAIN(_, args), "PLAIN")

    async def auth_LOGIN(self, _, args) -> AuthResult:
        if not self.tls_active:
            return await self._needs_tls()
        return await self._checked(await super().auth_LOGIN(_, args), "LOGIN")

    async def _needs_tls(self) -> AuthResult:
        await self.push("538 5.7.11 Encryption required for requested authentication "
                        "mechanism (STARTTLS first)")
        return AuthResult(success=False, handled=True)

    def _authenticate(self, mechanism, auth_data):
        # aiosmtpd's PLAIN and LOGIN end here with the login and password;
        # they are checked asynchronously by ``_checked``
        return AuthResult(success=False, handled=False, auth_data=auth_data,
                          message="pending")

    async def _checked(self, result: AuthResult, mechanism: str) -> AuthResult:
        if result.message != "pending":
            return result
        login, password = result.auth_data
        return await self.login(mechanism, login.decode("utf-8", "replace"),
                                {"password": password.decode("utf-8", "replace")})

    async def login(self, mechanism: str, user: str, proof: dict) -> AuthResult:
        """Ask the helper; on success the session is the user's."""
        try:
            granted = await self.provider.login(mechanism, user, proof, self.client)
        except PrivsepError as exc:
            log.error("event=error stage=login reason=%r", str(exc))
            await self.push("454 4.7.0 Temporary authentication failure")
            return AuthResult(success=False, handled=True)
        if granted is None:
            log.warning("event=auth_failed user=%s client=%s mechanism=%s",
                        ascii(user[:64]), self.client, mechanism)
            await asyncio.sleep(self.provider.settings.auth_delay)
            if self.provider.failed(self.client, user):
                await self.goodbye("421 4.7.0 Too many failed logins; try again later")
                return AuthResult(success=False, handled=True)
            return AuthResult(success=False, handled=False)   # aiosmtpd answers 535
        self.user, self.token = user, granted
        log.info("event=login user=%s client=%s mechanism=%s tls=%s", user, self.client,
                 mechanism, "yes" if self.tls_active else "no")
        return AuthResult(success=True, auth_data=user)

    async def goodbye(self, reply: str) -> None:
        await self.push(reply)
        self._handler_coroutine.cancel()
        self.transport.close()

    # -- ATRN ---------------------------------------------------------------------
    async def smtp_ATRN(self, arg):
        if not self.session.extended_smtp:
            await self.push("503 5.5.1 EHLO first")
            return
        if not self.session.authenticated:
            await self.push("530 5.7.0 Authentication required")
            return
        if self.envelope.mail_from is not None:
            await self.push("503 5.5.1 ATRN is not allowed inside a mail transaction")
            return
        reply, session = await self.provider.atrn(self.user, self.token, arg, self.client)
        await self.push(reply)
        if session is None:
            return
        if self._timeout_handle is not None:   # the session has a time cap of its own
            self._timeout_handle.cancel()
        # aiosmtpd cancels this handler when the customer hangs up; the
        # session runs on by itself until its own end (the map, QUIT, the
        # log line, the helper told), so it is shielded from that
        running = asyncio.ensure_future(session.run(self._reader, self._writer))
        self.provider.running.add(running)
        running.add_done_callback(self.provider.running.discard)
        try:
            await asyncio.shield(running)
        finally:
            self._handler_coroutine.cancel()
            if self.transport is not None:
                self.transport.close()
