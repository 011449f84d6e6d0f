"""The daemons' users: look one up, become it for good, say who we run as.

What reads what strangers send runs as its own user, never root: the
gateway, the poller and the milter give up root with ``drop_privileges``
at once where they are started as root.
"""

from __future__ import annotations

import os
import pwd

from flushctl.privsep.errors import PrivsepError


def account(user: str, who: str = "gateway") -> pwd.struct_passwd:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PrivsepError(f"{who}: user {user!r} does not exist "
                           f"(create it, or set [{who}] user)") from None
    if entry.pw_uid == 0:
        raise PrivsepError(f"{who}: user {user!r} is root; name an unprivileged user")
    return entry


def drop_privileges(entry: pwd.struct_passwd, who: str = "gateway",
                    groups: bool = False) -> None:
    """Become ``entry`` for good: groups (none, or with ``groups`` the
    user's own from the group database), gid, then uid; no way back."""
    if groups:
        os.initgroups(entry.pw_name, entry.pw_gid)
    else:
        os.setgroups([])
    os.setresgid(entry.pw_gid, entry.pw_gid, entry.pw_gid)
    os.setresuid(entry.pw_uid, entry.pw_uid, entry.pw_uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise PrivsepError(f"{who}: could not give up root")
    os.chdir("/")


def current_user() -> str:
    """The name this process runs as (for the log)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())
