"""Who may ask the release helper for what: the roles, their limits, and the peer's uid.

Who asks is told by the kernel (the socket's peer credentials), never by
the asker.  A connection opens with one line naming the role it wants;
``refusal`` says why that peer may not take it, and the limits here say
how many may be at it at once:

- ``gateway`` ([gateway] user): releases for finger and ETRN, and request
  counts;
- ``poller`` ([poller] user): what to probe, probe results, a release with
  the poller's probes;
- ``scrape`` ([poller] user): the metrics' figures;
- ``odmr`` ([odmr] user): logins checked against the credentials store,
  and releases for a login's own ODMR domains;
- ``portal`` ([portal] user): logins checked against the credentials
  store, and a login's own domains: their status, held list, releases,
  pause and resume, refused mail returned;
- ``admin`` (root, or a member of ``[helper] group`` that is none of the
  daemons' users): `flushctl flush` and its ``--wait``.

Root may take any role.
"""

from __future__ import annotations

import grp
import pwd
import socket
import struct
from dataclasses import dataclass

from flushctl.config import Config

ROLES = ("gateway", "poller", "scrape", "admin", "odmr", "portal")
MAX_HELLO = 200          # bytes of the opening line
MAX_GRANT = 4096         # bytes of the helper's answer to it (the gateway's: where it listens)
HELLO_TIMEOUT = 10.0     # seconds a connection may take to say its role
MAX_CONNECTIONS = 64     # connections served at once
# connections per role at once: a daemon taken over cannot take the others' room
PER_ROLE = {"gateway": 4, "poller": 2, "scrape": 2, "admin": 16, "odmr": 4, "portal": 4}
MAX_WAITING_PER_UID = 8  # connections of one uid that have not said their role yet
ADMIN_IDLE = 120.0       # seconds an admin's connection may stay silent
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)   # Linux 4.13


@dataclass(frozen=True)
class Peer:
    """Who is at the other end of a unix socket, as the kernel says."""
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    try:   # Python reads at most 1024 bytes: 256 groups
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        groups = struct.unpack(f"{len(raw) // 4}I", raw[:len(raw) // 4 * 4])
    except OSError:   # an older kernel, or more groups: the primary group only
        groups = ()
    return Peer(pid, uid, gid, frozenset(groups) | {gid})


def uid_of(user: str) -> int | None:
    """``user``'s uid; None for no user or one that does not exist."""
    try:
        return pwd.getpwnam(user).pw_uid if user else None
    except KeyError:
        return None


def refusal(role: str, peer: Peer, config: Config) -> str | None:
    """Why ``peer`` may not take ``role``; None when it may."""
    if role not in ROLES:
        return f"no such role: {role!r:.40}"
    if peer.uid == 0:
        return None
    if role in ("gateway", "poller", "scrape", "odmr", "portal"):
        section = "poller" if role == "scrape" else role
        user = {"gateway": config.gateway.user, "odmr": config.odmr.user if config.odmr else "",
                "portal": config.portal.user if config.portal else ""
                }.get(role, config.poller_user)
        if user and uid_of(user) == peer.uid:
            return None
        return f"uid {peer.uid} is not [{section}] user"
    daemons = {uid_of(u) for u in (config.gateway.user, config.poller_user, config.milter_user,
                                   config.odmr.user if config.odmr else "",
                                   config.portal.user if config.portal else "")}
    if peer.uid in daemons:
        return f"uid {peer.uid} runs a daemon: not an admin"
    try:
        gid = grp.getgrnam(config.helper_group).gr_gid
    except KeyError:
        return f"there is no group {config.helper_group}"
    if gid in peer.groups:
        return None
    return f"uid {peer.uid} is not in group {config.helper_group}"
