"""The one place that runs Postfix commands.

Every call is an argument list (never a shell), has a timeout, passes
``-c config_directory``, and takes only validated domains and queue ids.
Failures come back as ``PostfixError`` carrying the command's own words.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Iterable

from flushctl import names

DEFAULT_TIMEOUT = 60.0
SEARCH_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


_POSTCAT_GONE = re.compile(r"open queue file ([0-9A-Za-z]+)")


SENDMAIL_TIMEOUT = 10.0   # seconds a notice's sendmail may take (the keeper waits on it)


class PostfixError(Exception):
    """A Postfix command failed; the text says which and why."""


def _binary(name: str) -> str:
    path = shutil.which(name, path=SEARCH_PATH)
    if path is None:
        raise PostfixError(f"{name}: not found (is Postfix installed?)")
    return path


@dataclass(frozen=True)
class Postfix:
    config_directory: str
    timeout: float = DEFAULT_TIMEOUT

    def _run(self, argv: list[str], stdin: str | None = None,
             check: bool = True, keep_sigpipe_ignored: bool = False,
             timeout: float | None = None) -> subprocess.CompletedProcess:
        for arg in argv[1:]:
            if "\0" in arg or "\n" in arg:
                raise PostfixError(f"refusing argument with control characters: {arg!r}")
        try:
            # errors="replace": a header in raw 8-bit (a legacy mailer's
            # Latin-1 Subject, which Postfix accepts) must not make a
            # command's output unreadable
            proc = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                                  errors="replace", timeout=timeout or self.timeout,
                                  check=False,
                                  restore_signals=not keep_sigpipe_ignored)
        except subprocess.TimeoutExpired:
            raise PostfixError(f"{argv[0]}: no answer within {timeout or self.timeout:.0f}s") \
                from None
        except OSError as exc:
            raise PostfixError(f"{argv[0]}: {exc}") from None
        if check and proc.returncode != 0:
            err = (proc.stderr or proc.stdout).strip().splitlines()
            tail = err[-1] if err else f"exit status {proc.returncode}"
            raise PostfixError(f"{' '.join(argv[:4])}: {tail}")
        return proc

    # -- postconf ----------------------------------------------------------
    def get(self, *params: str) -> dict[str, str]:
        """Current values (``postconf -h``-style, unexpanded) of main.cf parameters."""
        for p in params:
            _param_name(p)
        out = self._run([_binary("postconf"), "-c", self.config_directory, "-x", *params]).stdout
        return _parse_postconf(out)

    def get_explicit(self, *params: str) -> dict[str, str]:
        """Values as written in main.cf; parameters left at their default are absent."""
        for p in params:
            _param_name(p)
        out = self._run([_binary("postconf"), "-c", self.config_directory, "-n", *params],
                        check=False).stdout
        return _parse_postconf(out)

    def set(self, settings: dict[str, str]) -> None:
        if not settings:
            return
        args = []
        for key, value in settings.items():
            _param_name(key)
            args.append(f"{key}={value}")
        self._run([_binary("postconf"), "-c", self.config_directory, "-e", *args])

    def services(self) -> dict[str, str]:
        """master.cf services: ``name/type`` -> the whole entry, one line."""
        out = self._run([_binary("postconf"), "-c", self.config_directory, "-M"]).stdout
        result = {}
        for line in out.splitlines():
            fields = line.split()
            if len(fields) >= 8:
                result[f"{fields[0]}/{fields[1]}"] = " ".join(fields)
        return result

    def set_service(self, entry: str) -> None:
        fields = entry.split()
        if len(fields) < 8:
            raise PostfixError(f"bad master.cf entry: {entry!r}")
        key = f"{fields[0]}/{fields[1]}"
        self._run([_binary("postconf"), "-c", self.config_directory, "-M", f"{key}={entry}"])

    def remove_service(self, key: str) -> None:
        """Delete the master.cf entry ``name/type``."""
        if not re.fullmatch(r"[A-Za-z0-9_.:\[\]-]+/(inet|unix|fifo|pass|unix-dgram)", key):
            raise PostfixError(f"bad master.cf service key: {key!r}")
        self._run([_binary("postconf"), "-c", self.config_directory, "-M", "-X", key])

    # -- postmap / postfix -------------------------------------------------
    def postmap(self, map_spec: str) -> None:
        if map_spec.startswith("-"):
            raise PostfixError(f"bad map: {map_spec!r}")
        self._run([_binary("postmap"), "-c", self.config_directory, map_spec])

    def check(self) -> None:
        self._run([_binary("postfix"), "-c", self.config_directory, "check"])

    def running(self) -> bool:
        proc = self._run([_binary("postfix"), "-c", self.config_directory, "status"], check=False)
        return proc.returncode == 0

    def reload(self) -> None:
        self._run([_binary("postfix"), "-c", self.config_directory, "reload"])

    # -- queue -------------------------------------------------------------
    def _postsuper_ids(self, flag: str, ids: Iterable[str], queue: str | None = None) -> int:
        id_list = [names.queue_id(i) for i in ids]
        if not id_list:
            return 0
        argv = [_binary("postsuper"), "-c", self.config_directory, flag, "-"]
        if queue is not None:
            argv.append(_queue_name(queue))
        self._run(argv, stdin="\n".join(id_list) + "\n")
        return len(id_list)

    def hold(self, ids: Iterable[str]) -> int:
        """Put deferred mail on hold (only from the deferred queue: a message
        qmgr has taken into the active queue meanwhile is left to it)."""
        return self._postsuper_ids("-h", ids, "deferred")

    def release(self, ids: Iterable[str]) -> int:
        return self._postsuper_ids("-H", ids, "hold")

    def expire_release(self, ids: Iterable[str]) -> int:
        """``postsuper -f``: force expiry and release from hold; qmgr returns
        the message to its sender with its defer log's reasons."""
        return self._postsuper_ids("-f", ids)

    def delete(self, ids: Iterable[str]) -> int:
        return self._postsuper_ids("-d", ids)

    def requeue(self, ids: Iterable[str]) -> int:
        """``postsuper -r``: back through pickup and cleanup, new id, new lifetime clock."""
        count = self._postsuper_ids("-r", ids)
        if count:
            self._kick("pickup", "W")
        return count

    def read_messages(self, ids: Iterable[str], batch: int = 200) -> str:
        """``postcat -e -h`` of queued messages (envelope and headers), by queue id."""
        id_list = [names.queue_id(i) for i in ids]
        out = []
        for start in range(0, len(id_list), batch):
            chunk = id_list[start:start + batch]
            while chunk:
                proc = self._run([_binary("postcat"), "-c", self.config_directory, "-e",
                                  "-h", "-q", *chunk], check=False)
                out.append(proc.stdout)
                # postcat stops at the first message that is gone (delivered
                # meanwhile): go on with the ones after it
                gone = _POSTCAT_GONE.search(proc.stderr or "") if proc.returncode else None
                if gone is None or gone.group(1) not in chunk:
                    break
                chunk = chunk[chunk.index(gone.group(1)) + 1:]
        return "".join(out)

    def scan_deferred(self) -> None:
        """Ask qmgr for a deferred-queue scan that ignores defer_transports once.

        Only messages whose retry time has come are taken (no 'A' flag, so
        this is not ``postqueue -f``).  qmgr keeps the override ('F') for
        its next incoming scan as well, whenever that starts (the next
        mail to arrive, or the master's wakeup of qmgr, every 300 s by
        default): mail arriving meanwhile would go out past
        defer_transports (a renewed copy of held mail, a paused or
        offline customer's local mail).  'I' starts that scan now, so the
        override covers what is in the incoming queue at this moment (and,
        when a scan is under way, what comes in before it ends and its
        one rescan; while the active queue is full, until it drains).
        """
        self._kick("qmgr", "FDI")

    def scan_incoming(self) -> None:
        """Ask qmgr to look at the incoming queue now."""
        self._kick("qmgr", "I")

    def send_mail(self, sender: str, recipients: Iterable[str], message: str) -> None:
        """Queue ``message`` through Postfix's sendmail (pickup, cleanup, the
        milters, the queue: retried and logged like any mail).  ``sender``
        "" is the null sender; every address was validated by the config."""
        rcpts = [r for r in recipients]
        for address in (sender, *rcpts):
            if address and (address.startswith("-") or not names.split_recipient(address)):
                raise PostfixError(f"sendmail: not an address: {address!r}")
        if not rcpts:
            raise PostfixError("sendmail: no recipient")
        self._run([_binary("sendmail"), "-C", self.config_directory, "-i", "-f", sender,
                   "--", *rcpts], stdin=message, timeout=SENDMAIL_TIMEOUT)

    def _kick(self, service: str, request: str) -> None:
        """postkick, robustly.

        postkick writes the request and then one more byte; a server that
        has read the request may close first, and the last write then
        kills postkick with SIGPIPE although the request arrived.  With
        SIGPIPE left ignored (as Python has it) that write just fails.
        A refused connection (the service restarting) is tried again.
        """
        argv = [_binary("postkick"), "-c", self.config_directory, "public", service, request]
        for attempt in range(5):
            try:
                self._run(argv, keep_sigpipe_ignored=True)
                return
            except PostfixError:
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))


def _parse_postconf(out: str) -> dict[str, str]:
    result = {}
    for line in out.splitlines():
        key, sep, value = line.partition(" = ")
        if sep:
            result[key.strip()] = value.strip()
        elif line.endswith(" ="):
            result[line[:-2].strip()] = ""
    return result


def _param_name(name: str) -> str:
    if not name or not all(c.isalnum() or c == "_" for c in name):
        raise PostfixError(f"bad parameter name: {name!r}")
    return name


def _queue_name(name: str) -> str:
    if name not in {"hold", "incoming", "active", "deferred", "maildrop"}:
        raise PostfixError(f"bad queue name: {name!r}")
    return name
