"""The logins store: one JSON file of root's, read whole, changed under a lock, replaced whole.

``{"version": 1, "users": {NAME: {"scrypt": ..., "cram": ..., "changed": UNIXTIME}}}``
at ``Config.logins_path``, mode 0600.  It holds plaintext-equivalent
secrets (see ``flushctl.logins.passwords``), so a store that is a symbolic
link, not a regular file, not root's, or open to group or others is
refused, never read.  A change takes an exclusive flock on ``PATH.lock``,
reads the store, writes a new one under a name of its own (O_EXCL,
O_NOFOLLOW, 0600), fsyncs it, renames it over the old one and fsyncs the
directory: two admins adding users at once both get theirs.  No file is
no users.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import time
from typing import Callable, Iterator

from flushctl.config import login_name
from flushctl.logins.model import Login, Logins, LoginsError
from flushctl.logins.passwords import (check_password, cram_secret, parse_scrypt, scrypt_hash,
                                       unb64)

VERSION = 1
WHY = "it holds plaintext-equivalent secrets"


def load(path: str) -> Logins:
    """The logins in the store at ``path`` (none if there is no file), or a
    ``LoginsError`` saying why it cannot be used."""
    return _read(path, os.path.basename(path), None)


def add_user(path: str, name: str, password: str) -> Login:
    """Add the login ``name``; refuses a name that exists."""
    login = _new_login(name, password)

    def change(users: dict[str, Login]) -> None:
        if name in users:
            raise LoginsError(f"{name}: there is a user of that name already")
        users[name] = login
    _update(path, change)
    return login


def set_password(path: str, name: str, password: str) -> Login:
    """Give the login ``name`` a new password; refuses a name that does not exist."""
    login = _new_login(name, password)

    def change(users: dict[str, Login]) -> None:
        if name not in users:
            raise LoginsError(f"{name}: no such user")
        users[name] = login
    _update(path, change)
    return login


def delete_user(path: str, name: str) -> None:
    """Remove the login ``name``; refuses a name that does not exist."""
    _name(name)

    def change(users: dict[str, Login]) -> None:
        if name not in users:
            raise LoginsError(f"{name}: no such user")
        del users[name]
    _update(path, change)


def _name(name: str) -> str:
    try:
        return login_name(name)
    except ValueError as exc:
        raise LoginsError(str(exc)) from None


def _new_login(name: str, password: str) -> Login:
    _name(name)
    try:
        secret = check_password(password)
    except ValueError as exc:
        raise LoginsError(str(exc)) from None
    return Login(name=name, scrypt=scrypt_hash(secret), cram=cram_secret(secret),
                 changed=int(time.time()))


def _read(path: str, name: str, dir_fd: int | None) -> Logins:
    """Read the store ``name`` (in ``dir_fd``, else ``path`` itself), after
    checking it is a file that only root may read."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name if dir_fd is not None else path, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        return Logins()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LoginsError(f"{path}: a symbolic link; refusing it: {WHY}") from None
        raise LoginsError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        _check_safe(path, os.fstat(fd))   # before a byte is read
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read()
    except OSError as exc:
        raise LoginsError(f"{path}: cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    return _decode(path, data)


def _check_safe(path: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise LoginsError(f"{path}: not a regular file; refusing it: {WHY}")
    if st.st_uid != 0:
        raise LoginsError(f"{path}: owned by uid {st.st_uid}, not root; refusing it: {WHY} "
                          f"(chown root {path})")
    if st.st_mode & 0o077:
        raise LoginsError(f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets group or others "
                          f"at it; refusing it: {WHY} (chmod 600 {path})")


def _decode(path: str, data: bytes) -> Logins:
    def bad(what: str) -> LoginsError:
        return LoginsError(f"{path}: not a logins store: {what}")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise bad(f'want {{"version": {VERSION}, "users": {{...}}}}')
    users = doc.get("users")
    if not isinstance(users, dict):
        raise bad('"users" must be an object')
    found = {}
    for name, entry in users.items():
        try:
            login_name(name)
            if not isinstance(entry, dict):
                raise ValueError("an entry must be an object")
            scrypt, cram, changed = entry.get("scrypt"), entry.get("cram"), entry.get("changed")
            parse_scrypt(scrypt)
            if not isinstance(cram, str) or not unb64(cram):
                raise ValueError('"cram" must be the password in base64')
            if isinstance(changed, bool) or not isinstance(changed, (int, float)):
                raise ValueError('"changed" must be a Unix time')
        except ValueError as exc:
            raise bad(f"{name!r}: {exc}") from None
        found[name] = Login(name=name, scrypt=scrypt, cram=cram, changed=int(changed))
    return Logins(found)


def _encode(users: dict[str, Login]) -> bytes:
    doc = {"version": VERSION,
           "users": {name: {"scrypt": users[name].scrypt, "cram": users[name].cram,
                            "changed": users[name].changed} for name in sorted(users)}}
    return (json.dumps(doc, indent=2) + "\n").encode("ascii")


def _update(path: str, change: Callable[[dict[str, Login]], None]) -> None:
    """Read, ``change`` and replace the store, under its lock."""
    if os.geteuid() != 0:
        raise LoginsError(f"{path}: only root may change the logins store ({WHY})")
    name = os.path.basename(path)
    with _locked(path) as dir_fd:
        users = dict(_read(path, name, dir_fd).users)
        change(users)
        _replace(path, name, dir_fd, _encode(users))


@contextlib.contextmanager
def _locked(path: str) -> Iterator[int]:
    """The store's directory, open, while this process holds ``PATH.lock``."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise LoginsError(f"{directory}: no such directory (the state directory; "
                          "create it, or run `flushctl apply`)") from None
    except OSError as exc:
        raise LoginsError(f"{directory}: {exc.strerror}") from None
    lock = -1
    try:
        try:
            lock = os.open(os.path.basename(path) + ".lock",
                           os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                           dir_fd=dir_fd)
        except OSError as exc:
            raise LoginsError(f"{path}.lock: cannot open the lock: {exc.strerror}") from None
        if not stat.S_ISREG(os.fstat(lock).st_mode):
            raise LoginsError(f"{path}.lock: not a regular file")
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield dir_fd
    finally:
        if lock >= 0:
            os.close(lock)
        os.close(dir_fd)


def _replace(path: str, name: str, dir_fd: int, data: bytes) -> None:
    """Put ``data`` in place of the store all at once, on disk before it returns."""
    tmp = f".{name}.{os.urandom(8).hex()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dir_fd)
    except OSError as exc:
        raise LoginsError(f"{path}: cannot write beside it: {exc.strerror}") from None
    try:
        try:
            os.fchmod(fd, 0o600)   # whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        if isinstance(exc, OSError):
            raise LoginsError(f"{path}: cannot write: {exc.strerror}") from None
        raise
    os.fsync(dir_fd)
