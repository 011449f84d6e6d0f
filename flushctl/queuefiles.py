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
from dataclasses import dataclass

# Postfix's "safe" alphabet for long queue ids: digits, then consonants.
_SAFE = "0123456789BCDFGHJKLMNPQRSTVWXYZbcdfghjklmnpqrstvwxyz"
_SAFE_VALUE = {c: i for i, c in enumerate(_SAFE)}
LG_TIME_PAD = 10  # six or more chars of seconds, then exactly four of usec
LG_USEC_PAD = 4

# Where a message can be, most likely first for held mail.
QUEUES = ("hold", "incoming", "active", "deferred")


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


@dataclass(frozen=True)
class QueuedMessage:
    """What ``postcat -e -h`` says of one message."""

    queue: str
    queue_id: str
    size: int
    arrival: float | None
    created: float | None
    headers: tuple[tuple[str, str], ...]

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
            queue, _, qid = where.partition("/")
            if title == "ENVELOPE RECORDS":
                if current:
                    result.append(QueuedMessage(**current))
                current = {"queue": queue, "queue_id": qid, "size": 0, "arrival": None,
                           "created": None, "headers": ()}
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
