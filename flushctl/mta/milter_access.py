"""The milter's socket directory and its share of the ledger, made ready by root.

Run by `flushctl apply` as root.  The socket's directory is made the
milter's by a walk over descriptors from ``/``, so that neither the
milter nor anyone else can point apply at another directory.
"""

from __future__ import annotations

import grp
import os
import stat

from flushctl.config import Config
from flushctl.heldmail.ledger.sharing import share


def prepare_milter(config: Config) -> None:
    """What the milter, never root, cannot do for itself: a directory of its
    own for its socket (owner [milter] user, group postfix, 02750: only
    Postfix reaches in, and the socket the milter makes there is postfix's
    group by the setgid bit), and the ledger its group may write."""
    from flushctl.mta.apply import ApplyError   # apply.py imports this module
    from flushctl.privsep.accounts import account
    from flushctl.privsep.errors import PrivsepError
    uid, gid = 0, None
    if config.milter_user:
        try:
            entry = account(config.milter_user, "milter")
        except PrivsepError as exc:
            raise ApplyError(f"{config.path}: {exc}") from None
        uid, gid = entry.pw_uid, entry.pw_gid
    listen = config.milter_listen
    if listen.kind == "unix":
        try:
            postfix = grp.getgrnam("postfix").gr_gid
        except KeyError:
            raise ApplyError("there is no postfix group: is Postfix installed?") from None
        directory = os.path.dirname(listen.path)
        taken = {os.path.normpath(config.state_directory): "the state directory",
                 os.path.dirname(config.helper_socket): "the release helper's directory"}
        if directory in taken:
            raise ApplyError(f"{config.path}: milter.listen: {directory} is {taken[directory]}: "
                             "give the milter's socket a directory of its own")
        _milter_directory(config, directory, os.path.basename(listen.path), uid, postfix)
    if gid is not None:
        try:
            share(config.state_directory, gid)
        except OSError as exc:
            raise ApplyError(f"cannot share the ledger with the milter: {exc}") from None


def _milter_directory(config: Config, directory: str, name: str, uid: int, gid: int) -> None:
    """Make ``directory`` the milter's (``uid``, group ``gid``, 02750), root
    all the way: every step is opened without following a link, below
    directories only root may change (or sticky ones, like /tmp), and the
    last is changed through its descriptor; so neither the milter (which
    owns the last) nor anyone else can point apply at another directory."""
    from flushctl.mta.apply import ApplyError   # apply.py imports this module
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    parts = [p for p in directory.split("/") if p]
    fd = os.open("/", flags)
    try:
        for depth, part in enumerate(parts):
            st = os.fstat(fd)
            if st.st_uid != 0 or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
                above = "/" + "/".join(parts[:depth])
                raise ApplyError(f"{config.path}: milter.listen: {above} may be changed by "
                                 "others than root: the milter's socket needs a directory "
                                 "below directories only root may change")
            try:
                step = os.open(part, flags, dir_fd=fd)
            except FileNotFoundError:
                os.mkdir(part, 0o755, dir_fd=fd)
                step = os.open(part, flags, dir_fd=fd)
            except OSError as exc:   # a link (ELOOP), a file (ENOTDIR)
                where = "/" + "/".join(parts[:depth + 1])
                raise ApplyError(f"{config.path}: milter.listen: {where}: not a directory "
                                 f"({exc.strerror})") from None
            os.close(fd)
            fd = step
        others = sorted(set(os.listdir(fd)) - {name})
        if others:
            raise ApplyError(f"{config.path}: milter.listen: {directory} holds other files "
                             f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): "
                             "give the milter's socket a directory of its own")
        st = os.fstat(fd)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.fchown(fd, uid, gid)
            st = os.fstat(fd)   # a chown may clear the setgid bit
        if stat.S_IMODE(st.st_mode) != 0o2750:
            os.fchmod(fd, 0o2750)
    finally:
        os.close(fd)
