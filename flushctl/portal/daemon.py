"""``flushctl portal``: the web portal's daemon.

It binds ``[portal] listen`` (loopback by default: it is meant to sit
behind the provider's HTTPS reverse proxy), becomes ``[portal] user`` if
started as root, connects to the release helper in the ``portal`` role
and serves the application (``app``) with uvicorn until SIGTERM.  It
reads what browsers send and never runs as root; it never sees the
credentials store or the queue.  Sessions are signed with a key made at
start: a restart logs everyone out (as a helper restart does, whose
tokens the sessions carry).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from flushctl import stopsignals
from flushctl.config import Config
from flushctl.privsep import client
from flushctl.privsep.accounts import account, current_user, drop_privileges
from flushctl.privsep.errors import PrivsepError

log = logging.getLogger("flushctl.portal")


def bind(config: Config) -> socket.socket:
    where = config.portal.listen
    family = socket.AF_INET6 if ":" in where.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((where.host, where.port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


def _preload() -> None:
    """Import now what would be imported on first use: after dropping root
    the interpreter's own files may not be readable any more."""
    import concurrent.futures.thread  # noqa: F401
    import email.header  # noqa: F401
    import encodings.idna  # noqa: F401
    import jinja2  # noqa: F401
    import multipart  # noqa: F401
    import uvicorn.lifespan.off  # noqa: F401
    import uvicorn.loops.asyncio  # noqa: F401
    import uvicorn.protocols.http.h11_impl  # noqa: F401
    from flushctl.portal import app, views  # noqa: F401
    views.assets()


def run(config: Config) -> None:
    settings = config.portal
    if settings is None:
        raise PrivsepError("portal: the config has no [portal] section")
    stopsignals.catch()
    sock = bind(config)
    _preload()
    if os.geteuid() == 0:
        if not settings.user:
            raise PrivsepError("portal: [portal] user is empty; it never runs as root")
        drop_privileges(account(settings.user, "portal"), "portal", groups=True)
    try:
        helper = client.HelperLink(config, "portal")   # a stop meanwhile exits at once
        asyncio.run(_serve(config, sock, helper))
    finally:
        sock.close()


async def _serve(config: Config, sock: socket.socket, helper: client.HelperLink) -> None:
    import uvicorn
    from flushctl.portal.app import build
    settings = config.portal
    app = build(helper, settings)
    server = uvicorn.Server(uvicorn.Config(
        app, proxy_headers=True, forwarded_allow_ips=",".join(settings.trusted_proxies),
        access_log=False, log_config=None, lifespan="off", server_header=False,
        timeout_keep_alive=10, limit_concurrency=200, http="h11", ws="none",
        loop="asyncio"))
    server.install_signal_handlers = lambda: None   # ours (stopsignals) stop it
    loop = asyncio.get_running_loop()
    stopsignals.on_stop(loop, lambda: setattr(server, "should_exit", True))
    log.info("event=start listen=%s user=%s", settings.listen, current_user())

    async def watch_helper():
        await helper.gone.wait()
        server.should_exit = True
    watching = loop.create_task(watch_helper())
    await server.serve(sockets=[sock])
    watching.cancel()
    if helper.gone.is_set():
        log.error("event=stop reason=helper_gone")
        raise PrivsepError("portal: the release helper went away")
    log.info("event=stop")
