"""Where a queue file lives, and whether it is still there.

Postfix keeps each message in one file named by its queue id, in one of
the queue directories; "hashed" queues (``hash_queue_names``) add
``hash_queue_depth`` levels of one-character subdirectories.  For long
queue ids the hash is taken from the microsecond part of the id, in
upper-case hex (global/mail_queue.c, MQID_LG_GET_HEX_USEC).

Looking a message up costs a few ``stat`` calls, whatever the size of the
queue: this is what keeps per-domain status flat in queue size.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass

# Postfix's "safe" alphabet for long queue ids: digits, then consonants.
_SAFE = "0123456789BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxyz"
_SAFE_VALUE = {c: i for i, c in enumerate(_SAFE)}
LG_TIME_PAD = 10  # six or more chars of seconds, then exactly four of usec
LG_USEC_PAD = 4

# Where a message can be, most likely first for held mail; maildrop: on
# its way back through pickup (postsuper -r renews its clock), not gone.
QUEUES = ("hold", "incoming", "active", "deferred", "maildrop")
# Postfix marks a message whose expiry an admin forced (postsuper -e/-f)
# with the group-execute bit of its queue file (MAIL_QUEUE_STAT_EXPIRE).
FORCED_EXPIRE_BIT = 0o010
# A directory's modification time moves in steps this short, or shorter
# (ext4: the kernel's tick): two renames within one may leave it unchanged.
MTIME_TICK = 1.0
SET_ASIDE_AFTER = 2.0   # seconds a complete message may sit in incoming unseen by qmgr
# hash subdirectory names: the upper-case hex digits of the hash key
_HEX = "0123456789ABCDEF"


def hash_key(queue_id: str) -> str:
    """The string whose leading characters name the hash subdirectories."""
    sep = queue_id.rfind("z")
    if sep >= LG_TIME_PAD:
        usec = 0
        for ch in queue_id[sep - LG_USEC_PAD:sep]:
            usec = usec * 52 + _SAFE_VALUE[ch]
        return f"{usec:05X}"
    return queue_id


def relative_path(queue: str, queue_id: str, hashed: frozenset[str], depth: int) -> str:
    if queue.lower() in hashed:
        key = hash_key(queue_id)
        parts = [key[i] if i < len(key) else "_" for i in range(depth)]
        return "/".join([queue, *parts, queue_id])
    return f"{queue}/{queue_id}"


@dataclass(frozen=True)
class QueueLayout:
    queue_directory: str
    hashed: frozenset[str]
    depth: int

    @classmethod
    def from_params(cls, params: dict[str, str]) -> "QueueLayout":
        names = params.get("hash_queue_names", "deferred, defer")
        hashed = frozenset(n.lower() for n in names.replace(",", " ").split())
        return cls(params["queue_directory"], hashed, int(params.get("hash_queue_depth", "1")))

    def path(self, queue: str, queue_id: str) -> str:
        return os.path.join(self.queue_directory,
                            relative_path(queue, queue_id, self.hashed, self.depth))

    def make_due(self, queue_id: str, when: float) -> None:
        """Set a held message's retry time (its file's mtime) to ``when``."""
        try:
            os.utime(self.path("hold", queue_id), (when, when))
        except FileNotFoundError:
            pass

    def leaf_directories(self, queue: str) -> list[str]:
        """Every directory of ``queue`` that can hold queue files (one, or
        16 ** depth when the queue is hashed)."""
        top = os.path.join(self.queue_directory, queue)
        if queue.lower() not in self.hashed or self.depth <= 0:
            return [top]
        dirs = [top]
        for _ in range(self.depth):
            dirs = [os.path.join(d, c) for d in dirs for c in _HEX]
        return dirs

    def ids(self, queue: str) -> list[str]:
        """The queue ids in ``queue`` now (one listing per directory)."""
        found = []
        for directory in self.leaf_directories(queue):
            found.extend(_ids_in(directory))
        return found

    def set_aside(self, now: float, after: float = SET_ASIDE_AFTER) -> list[str]:
        """Complete messages that have sat in the incoming queue for more
        than ``after`` seconds: ones qmgr put back there because a delivery
        agent still had them locked ("skipped, still being delivered", a
        flush racing a delivery).  qmgr looks at incoming again only when
        something wakes it, up to five minutes later.  Complete: cleanup
        sets the owner's execute bit when it has written the file; a
        rename (into incoming) sets its ctime."""
        found = []
        for directory in self.leaf_directories("incoming"):
            for queue_id in _ids_in(directory):
                try:
                    st = os.stat(os.path.join(directory, queue_id))
                except FileNotFoundError:
                    continue
                if st.st_mode & stat.S_IXUSR and now - st.st_ctime > after:
                    found.append(queue_id)
        return found

    def locate_once(self, queue_id: str) -> tuple[str, os.stat_result] | None:
        for queue in QUEUES:
            try:
                return queue, os.stat(self.path(queue, queue_id))
            except FileNotFoundError:
                continue
        return None

    def locate(self, queue_id: str) -> tuple[str, os.stat_result] | None:
        """(queue name, stat) of the message, or None when it is gone.

        A message moving between two queues (a rename) can slip between
        two of our stat calls; a second pass makes "gone" trustworthy.
        """
        found = self.locate_once(queue_id)
        if found is None:
            found = self.locate_once(queue_id)
        return found


def _ids_in(directory: str) -> list[str]:
    from flushctl.names import is_queue_id
    try:
        # names only: no DirEntry each (a fifth of a million held's listing)
        return list(filter(is_queue_id, os.listdir(directory)))
    except (FileNotFoundError, NotADirectoryError):
        return []


class QueueWatch:
    """The ids of one queue, listed again only where a directory changed.

    Each directory's listing is kept with its modification time; a file
    renamed in or out changes that time, so one ``stat`` per directory
    tells whether to list it again.  Every ``full_every`` seconds all are
    listed regardless (a change within one clock tick is not missed for
    long).  A changed directory is listed again only once the time since
    its last listing is 1/``share`` times what that listing took: a hold
    queue of a million messages, which changes with every message held
    and takes about a second to list, is listed every 20 s or so, not at
    every pass (a small one still at once).
    """

    def __init__(self, layout: QueueLayout, queue: str, full_every: float = 60.0,
                 share: float = 0.05):
        self.layout = layout
        self.queue = queue
        self.full_every = full_every
        self.share = share
        # directory -> (mtime, ids, when listed, seconds the listing took)
        self._dirs: dict[str, tuple[int, frozenset[str], float, float]] = {}
        self.last_full = float("-inf")   # when every directory was last listed
        # set by ``ids``: the moment as of which its answer holds (a
        # directory changed since its listing holds only as of that
        # listing), and a number that changes whenever a listing is redone
        self.current_at = float("-inf")
        self.version = 0

    def ids(self, now: float) -> set[str]:
        # (a clock stepped back since the last full listing: one now)
        full = not 0 <= now - self.last_full < self.full_every
        if full:
            self.last_full = now
        result: set[str] = set()
        current = now
        for directory in self.layout.leaf_directories(self.queue):
            try:
                mtime = os.stat(directory).st_mtime_ns
            except (FileNotFoundError, NotADirectoryError):
                if self._dirs.pop(directory, None) is not None:
                    self.version += 1
                continue
            known = self._dirs.get(directory)
            # (a clock stepped back since the last listing: due at once)
            if full or known is None or (known[0] != mtime and (
                    now < known[2] or now - known[2] >= known[3] / self.share)):
                start = time.monotonic()
                ids = frozenset(_ids_in(directory))
                known = (mtime, ids, now, time.monotonic() - start)
                self._dirs[directory] = known
                self.version += 1
            elif known[0] != mtime or mtime >= (known[2] - MTIME_TICK) * 1e9:
                # changed since; or changed within a tick of its listing, when
                # a later change in that tick leaves the time as it was
                current = min(current, known[2])
            result |= known[1]
        self.current_at = current
        return result


@dataclass(frozen=True)
class QueuedMessage:
    """What ``postcat -e -h`` says of one message."""

    queue: str
    queue_id: str
    size: int
    arrival: float | None
    created: float | None
    headers: tuple[tuple[str, str], ...]
    recipients: tuple[str, ...] = ()        # still to be delivered
    sender: str = ""

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def _ctime(text: str) -> float | None:
    import time
    try:
        return time.mktime(time.strptime(text.strip(), "%a %b %d %H:%M:%S %Y"))
    except ValueError:
        return None


def parse_postcat(text: str) -> list[QueuedMessage]:
    """Split ``postcat -e -h -q ID...`` output into messages (pure)."""
    result = []
    current = None
    section = None
    for line in text.splitlines():
        if line.startswith("*** ") and line.endswith(" ***"):
            title, _, where = line[4:-4].rpartition(" ")
            # QUEUE/ID, or QUEUE/X/Y/ID in a hashed queue
            parts = where.split("/")
            queue, qid = parts[0], parts[-1]
            if title == "ENVELOPE RECORDS":
                if current:
                    result.append(QueuedMessage(**current))
                current = {"queue": queue, "queue_id": qid, "size": 0, "arrival": None,
                           "created": None, "headers": (), "recipients": (), "sender": ""}
            section = title
            continue
        if current is None:
            continue
        if section == "ENVELOPE RECORDS":
            key, _, value = line.partition(": ")
            if key == "message_size":
                current["size"] = int(value.split()[0])
            elif key == "message_arrival_time":
                current["arrival"] = _ctime(value)
            elif key == "create_time":
                current["created"] = _ctime(value)
            elif key == "recipient":
                current["recipients"] = (*current["recipients"], value.strip())
            elif key == "sender":
                current["sender"] = value.strip()
        elif section == "HEADER EXTRACTED":
            # recipients taken from the headers (sendmail -t), always_bcc,
            # header_checks BCC: cleanup keeps them after the message
            key, _, value = line.partition(": ")
            if key == "recipient":
                current["recipients"] = (*current["recipients"], value.strip())
        elif section == "MESSAGE CONTENTS":
            if line[:1] in (" ", "\t") and current["headers"]:
                *rest, (k, v) = current["headers"]
                current["headers"] = (*rest, (k, v + " " + line.strip()))
            else:
                key, sep, value = line.partition(":")
                if sep:
                    current["headers"] = (*current["headers"], (key.strip(), value.strip()))
    if current:
        result.append(QueuedMessage(**current))
    return result


def parse_duration(value: str) -> float:
    """A Postfix time value ("5d", "300s", "4h", bare number = days) in seconds."""
    value = value.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    if value and value[-1] in units:
        return float(value[:-1]) * units[value[-1]]
    return float(value) * 86400


@dataclass(frozen=True)
class DeferRecord:
    """One recipient's entry in a message's defer log: why its last attempt failed."""

    recipient: str
    status: str     # DSN status, e.g. 4.3.0 (a soft-bounced 5xx keeps its detail: 4.x.y)
    reason: str


def parse_defer_log(text: str) -> list[DeferRecord]:
    """Split a defer logfile (``defer/ID``, name=value records separated by
    empty lines; lines starting with ``<`` are the old readable form) (pure)."""
    records, fields = [], {}
    for line in text.splitlines() + [""]:
        if not line:
            if "recipient" in fields:
                records.append(DeferRecord(fields["recipient"], fields.get("status", ""),
                                           fields.get("reason", "")))
            fields = {}
            continue
        key, sep, value = line.partition("=")
        if sep and not line.startswith("<"):
            fields[key] = value
    return records


def read_defer_log(layout: QueueLayout, queue_id: str) -> list[DeferRecord]:
    """The defer log of a message (its recipients' last failures), or []."""
    try:
        with open(layout.path("defer", queue_id), errors="replace") as fh:
            return parse_defer_log(fh.read())
    except (FileNotFoundError, NotADirectoryError):
        return []
