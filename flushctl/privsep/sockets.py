"""Listening sockets bound as root: a unix socket with its owner and mode, or TCP.

The release helper binds the gateway's listeners (port 79, Postfix's
private/) and its own socket with these; so does a gateway that runs as
one process, as root.
"""

from __future__ import annotations

import os
import pwd
import socket

from flushctl.privsep.errors import PrivsepError


def bind_unix(path: str, backlog: int) -> socket.socket:
    """A listening unix socket at ``path`` that only Postfix may reach: owner
    postfix, mode 0660 (in the release helper, as root: its directory is
    Postfix's private/, 0700 postfix).  A stale socket is replaced."""
    import grp
    try:
        postfix = pwd.getpwnam("postfix")
        gid = grp.getgrnam("postfix").gr_gid
    except KeyError:
        raise PrivsepError("there is no postfix user or group: is Postfix installed?") from None
    return listen_unix(path, backlog, (postfix.pw_uid, gid) if os.geteuid() == 0 else None)


def listen_unix(path: str, backlog: int, owner: tuple[int, int] | None) -> socket.socket:
    """A listening, non-blocking unix socket at ``path``, mode 0660, given
    to ``owner`` (uid, gid) when set; a stale socket is replaced."""
    if os.path.lexists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o660)   # while ours: after the chown it may be another's
        if owner is not None:
            os.chown(path, *owner)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def bind(hp, backlog: int) -> socket.socket:
    """A listening socket on ``hp`` (as root, in the helper or a one-process gateway): TCP for
    a HostPort or an inet Listen, ``bind_unix`` for a unix Listen."""
    if getattr(hp, "kind", "inet") == "unix":
        return bind_unix(hp.path, backlog)
    infos = socket.getaddrinfo(hp.host, hp.port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
