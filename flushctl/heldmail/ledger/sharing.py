"""The ledger shared with the milter's group, without a way to root through it.

``share`` (run as root by `flushctl apply`) lets the milter's group write
the state directory and the ledger's files; a root process working in such
a directory holds the ledger's lock (``Guard``) as the filesystem identity
``identity`` gives it, so a name the milter planted there gets root no
further than the milter itself could go.
"""

from __future__ import annotations

import os
import stat
import threading

from flushctl.heldmail.ledger.schema import FILENAME


def share(state_directory: str, gid: int) -> None:
    """Let the group ``gid`` (the milter's) write the ledger: the state
    directory root:gid, 0770 (and others' search bit, if it had it: a socket
    may live below), the ledger's files 0660 in that group.  As root, by
    `flushctl apply`.  No setgid bit: systemd's RestrictSUIDSGID refuses
    it, and the ledger makes its files in the directory's group itself.

    The group may write the directory, so a name in it may be a link the
    milter planted: nothing here follows one (each file is opened with
    O_NOFOLLOW and changed through its descriptor, and only a regular file
    with one link is changed)."""
    os.makedirs(state_directory, mode=0o750, exist_ok=True)
    dfd = os.open(state_directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        st = os.fstat(dfd)
        if (st.st_uid, st.st_gid) != (0, gid):
            os.fchown(dfd, 0, gid)
        mode = 0o770 | (st.st_mode & 0o001)
        if st.st_mode & 0o7777 != mode:
            os.fchmod(dfd, mode)
        for suffix in ("", "-wal", "-shm"):
            try:
                fd = os.open(FILENAME + suffix, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                             | os.O_CLOEXEC, dir_fd=dfd)
            except FileNotFoundError:
                continue
            except OSError as exc:   # ELOOP: a symbolic link
                raise OSError(f"{state_directory}/{FILENAME}{suffix}: not the ledger's "
                              f"file ({exc.strerror}); remove it") from None
            try:
                fst = os.fstat(fd)
                if not stat.S_ISREG(fst.st_mode) or fst.st_nlink != 1:
                    raise OSError(f"{state_directory}/{FILENAME}{suffix}: not the ledger's "
                                  "file (not a regular file with one name); remove it")
                os.fchown(fd, -1, gid)
                os.fchmod(fd, 0o660)
            finally:
                os.close(fd)
    finally:
        os.close(dfd)


_LIBC = None


def set_fs_ids(uid: int, gid: int) -> None:
    """This thread's filesystem uid and gid (Linux's setfsuid/setfsgid are
    per thread, unlike setuid); raises if the kernel did not take them."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        _LIBC = ctypes.CDLL(None, use_errno=True)
    if uid == os.geteuid():   # back to root first: its capabilities come back with it
        _LIBC.setfsuid(uid)
        _LIBC.setfsgid(gid)
    else:
        _LIBC.setfsgid(gid)
        _LIBC.setfsuid(uid)
    # -1 changes nothing and returns the current value
    if _LIBC.setfsuid(-1) != uid or _LIBC.setfsgid(-1) != gid:
        raise OSError(f"cannot take the filesystem identity {uid}:{gid} for the ledger")


class Guard:
    """The ledger's lock (reentrant, one thread at a time). In a root
    process whose state directory others may write (the milter's group),
    holding it also makes the thread act on files as ``identity`` (the
    milter's uid and the directory's group): SQLite opens its files by
    name (-wal, -shm, the database again after a replacement) in that
    directory, and a name the milter planted there (a link to a file of
    root's) must get root no further than the milter itself could go."""

    def __init__(self):
        self._lock = threading.RLock()
        self._depth = 0
        self._active: tuple[int, int] | None = None   # what the holder took
        self.identity: tuple[int, int] | None = None

    def __enter__(self):
        self._lock.acquire()
        self._depth += 1
        if self._depth == 1:
            self._active = self.identity
            if self._active is not None:
                try:
                    set_fs_ids(*self._active)
                except BaseException:
                    self._leave()
                    raise
        return self

    def __exit__(self, *exc) -> None:
        self._leave()

    def _leave(self) -> None:
        try:
            if self._depth == 1 and self._active is not None:
                self._active = None
                set_fs_ids(os.geteuid(), os.getegid())
        finally:
            self._depth -= 1
            self._lock.release()


def identity(state_directory: str, uid: int | None) -> tuple[int, int] | None:
    """Whom a root process acts as in the ledger's directory: nobody but
    itself (None) when only root may write there; else ``uid`` (the
    milter's; 65534 if unknown) and the directory's group."""
    if os.geteuid() != 0:
        return None
    st = os.stat(state_directory)
    if st.st_uid == 0 and not st.st_mode & 0o002 and not (st.st_mode & 0o020 and st.st_gid):
        return None
    return (65534 if uid is None else uid, st.st_gid)
