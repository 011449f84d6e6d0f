"""`flushctl odmr`: the ODMR provider daemon (RFC 2645), never root.

Started as root (or with CAP_NET_BIND_SERVICE), it binds [odmr] listen
(port 366), the implicit-TLS ports and, for Postfix's odmr transport, each
ODMR domain's relay address (127.A.B.C:[odmr] relay_port, a port only
root may bind), becomes [odmr] user (a systemd unit starts it as that
user, with that one capability), and from then on reads what customers
send as that user.  It keeps a few connections to the release helper
(role ``odmr``), which checks every CRAM-MD5 login and releases.  It
stops on SIGTERM: sessions under way are ended (their mail not yet
delivered is held again); while it is down, Postfix defers the ODMR
domains' mail (nothing answers their relay addresses).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import socket
import ssl
import warnings

from flushctl import stopsignals
from flushctl.config import Config
from flushctl.mta.routing import odmr_address
from flushctl.odmr.provider import Provider
from flushctl.odmr.relay import MAX_LINE
from flushctl.odmr.server import OdmrSMTP
from flushctl.privsep import client
from flushctl.privsep.accounts import account, current_user, drop_privileges
from flushctl.privsep.errors import PrivsepError

log = logging.getLogger("flushctl.odmr")

PLAIN, TLS, RELAY = "plain", "tls", "relay"


def bind(config: Config) -> list[tuple[socket.socket, str]]:
    """(listening socket, kind) for every [odmr] address and relay address."""
    out = []
    settings = config.odmr
    relays = sorted({odmr_address(d.name) for d in config.domains_where("odmr")})
    for (host, port), kind in [((w.host, w.port), PLAIN) for w in settings.listen] + \
            [((w.host, w.port), TLS) for w in settings.tls_listen] + \
            [((a, settings.relay_port), RELAY) for a in relays]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(128)
        except OSError:
            sock.close()
            for s, _ in out:
                s.close()
            raise
        sock.setblocking(False)
        out.append((sock, kind))
    return out


def tls_context(config: Config) -> ssl.SSLContext | None:
    settings = config.odmr
    if not settings.tls_cert_file:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    return ctx


def postfix_uid(config: Config) -> int | None:
    """The uid of Postfix's delivery agents (mail_owner): the one user whose
    connections a session's relay takes."""
    from flushctl.mta.commands import Postfix
    return pwd.getpwnam(Postfix(config.config_directory).get("mail_owner")["mail_owner"]).pw_uid


def _preload() -> None:
    """Import now what would be imported on first use: after dropping root
    the interpreter's own files may not be readable any more."""
    import concurrent.futures.thread  # noqa: F401  asyncio.to_thread's executor
    import encodings.idna  # noqa: F401
    import flushctl.odmr.session  # noqa: F401
    import hashlib  # noqa: F401
    import aiosmtpd.proxy_protocol  # noqa: F401


def run(config: Config) -> None:
    settings = config.odmr
    if settings is None:
        raise PrivsepError("odmr: the config has no [odmr] section")
    stopsignals.catch()
    try:   # as whoever starts it: under systemd, [odmr] user (give it the key's group)
        tls = tls_context(config)
    except (OSError, ssl.SSLError) as exc:
        raise PrivsepError(f"odmr: cannot read the TLS certificate or key "
                           f"({settings.tls_cert_file}, {settings.tls_key_file}): {exc}") \
            from None
    owner = postfix_uid(config)
    listeners = bind(config)
    _preload()
    if os.geteuid() == 0 and settings.user:
        drop_privileges(account(settings.user, "odmr"), "odmr")
    try:
        helper = client.HelperLink(config, "odmr")   # waits for the helper: a stop meanwhile exits at once
        asyncio.run(_serve(config, listeners, tls, owner, helper))
    finally:
        for sock, _ in listeners:
            sock.close()


async def _serve(config: Config, listeners, tls, owner: int | None,
                 helper: client.HelperLink) -> None:
    settings = config.odmr
    # aiosmtpd's own log: a line per command, and a deprecation warning per login
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="aiosmtpd")
    provider = Provider(config, helper, owner)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stopsignals.on_stop(loop, stop.set)
    servers = []
    hostname = socket.getfqdn()

    def factory(implicit: bool):
        # STARTTLS is offered on the plain ports only
        return lambda: OdmrSMTP(provider, hostname=hostname, ident="ODMR provider (RFC 2645)",
                                data_size_limit=None,
                                tls_context=None if implicit else tls,
                                timeout=settings.idle_timeout)

    for sock, kind in listeners:
        if kind == RELAY:
            servers.append(await asyncio.start_server(provider.postfix_connection, sock=sock,
                                                      limit=MAX_LINE))
            continue
        servers.append(await loop.create_server(factory(kind == TLS), sock=sock,
                                                ssl=tls if kind == TLS else None))
    log.info("event=start user=%s listen=%s tls_listen=%s relays=%d relay_port=%d",
             current_user(), ",".join(map(str, settings.listen)),
             ",".join(map(str, settings.tls_listen)) or "-",
             sum(kind == RELAY for _, kind in listeners), settings.relay_port)
    gone = loop.create_task(helper.gone.wait())
    stopped = loop.create_task(stop.wait())
    await asyncio.wait([gone, stopped], return_when=asyncio.FIRST_COMPLETED)
    for s in servers:
        s.close()
    provider.stopping.set()     # sessions end: their mail not yet delivered is held again
    if provider.running:
        await asyncio.wait(set(provider.running), timeout=60)
    if helper.gone.is_set() and not stop.is_set():
        log.error("event=stop reason=helper_gone")
        raise PrivsepError("odmr: the release helper went away")
    log.info("event=stop")
