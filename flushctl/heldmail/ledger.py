"""The ledger: which queued message belongs to which customer domain.

An SQLite database in WAL mode under the state directory.  The milter adds
one row per held message before it lets Postfix accept the message; the
rows are an index into Postfix's queue, not a copy of it: every read that
must be exact checks the queue file itself (see ``queuefiles``), and rows
whose message is gone are pruned.  Per-domain totals are kept beside the
rows in the same transaction, so a quota check is one row read.

WAL with ``synchronous=NORMAL`` survives any crash of our processes; after
a power loss the newest rows may be missing, which is what rebuilding from
the queue's tag headers is for.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

FILENAME = "ledger.sqlite3"

# only these errors mean the file is not a usable database (a full disk does not)
CORRUPT = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
log = logging.getLogger("flushctl.ledger")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    queue_id TEXT PRIMARY KEY,
    domain   TEXT NOT NULL,
    size     INTEGER NOT NULL,
    arrival  REAL NOT NULL,
    ctime    REAL
);
CREATE INDEX IF NOT EXISTS messages_by_domain ON messages (domain, arrival);
CREATE TABLE IF NOT EXISTS domains (
    domain             TEXT PRIMARY KEY,
    messages           INTEGER NOT NULL DEFAULT 0,
    bytes              INTEGER NOT NULL DEFAULT 0,
    paused             INTEGER NOT NULL DEFAULT 0,
    last_flush         REAL,
    last_flush_trigger TEXT,
    last_flush_result  TEXT,
    last_flush_client  TEXT,
    releasing_until    REAL,
    reachable          INTEGER,
    last_probe         REAL,
    last_error         TEXT
);
CREATE TABLE IF NOT EXISTS forwards (
    domain     TEXT NOT NULL,
    peer       TEXT NOT NULL,
    since      REAL NOT NULL,
    due        REAL NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    PRIMARY KEY (domain, peer)
);
CREATE INDEX IF NOT EXISTS forwards_by_due ON forwards (due);
CREATE TABLE IF NOT EXISTS foreign_mail (
    scope    TEXT NOT NULL,     -- the config it was judged under (its domains)
    queue    TEXT NOT NULL,
    queue_id TEXT NOT NULL,
    domain   TEXT,
    PRIMARY KEY (scope, queue, queue_id)
);
CREATE TABLE IF NOT EXISTS counters (
    name   TEXT NOT NULL,
    labels TEXT NOT NULL,
    value  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (name, labels)
);
"""


# Columns added after the first release of the schema: (table, column, type).
_ADDED_COLUMNS = (
    ("messages", "ctime", "REAL"),
    ("domains", "last_flush_client", "TEXT"),
    ("messages", "route", "TEXT"),           # destination (routing.route_of); NULL: the domain
    ("messages", "recorded", "REAL"),        # when the row was added
    ("messages", "released", "REAL"),        # when a release last sent it
    ("messages", "refused", "TEXT"),         # the customer server's last 5xx reply
    ("messages", "refused_since", "REAL"),   # when it was first refused
    ("messages", "origin", "TEXT"),          # smtpd (the milter), queue (the keeper), adopted
    ("domains", "backoff_until", "REAL"),    # the poller waits until then (attempts tempfailed)
    ("domains", "backoff", "REAL"),          # the current backoff step, seconds
    ("domains", "release_refused", "INTEGER"),  # did the last release include refused mail
    ("domains", "recount_asked", "REAL"),    # the milter refused at a quota: count again
)


# Indexes on added columns (made after the columns exist).
_ADDED_INDEXES = (
    "CREATE INDEX IF NOT EXISTS messages_refused ON messages (domain, refused_since)"
    " WHERE refused_since IS NOT NULL",
)


@dataclass(frozen=True)
class Entry:
    queue_id: str
    domain: str
    size: int
    arrival: float
    ctime: float  # when Postfix's lifetime clock for this queue file started
    route: str = ""
    released: float | None = None
    refused: str | None = None
    refused_since: float | None = None
    origin: str | None = None


@dataclass(frozen=True)
class DomainState:
    domain: str
    messages: int = 0
    bytes: int = 0
    paused: bool = False
    last_flush: float | None = None
    last_flush_trigger: str | None = None
    last_flush_result: str | None = None
    last_flush_client: str | None = None
    releasing_until: float | None = None
    reachable: bool | None = None
    last_probe: float | None = None
    last_error: str | None = None
    backoff_until: float | None = None
    backoff: float | None = None
    release_refused: bool = False


# the columns of DomainState, in its order
_STATE_SELECT = ("SELECT domain, messages, bytes, paused, last_flush, last_flush_trigger,"
                 " last_flush_result, last_flush_client, releasing_until, reachable,"
                 " last_probe, last_error, backoff_until, backoff,"
                 " COALESCE(release_refused, 0) FROM domains")


def _state(row) -> DomainState:
    values = list(row)
    values[3] = bool(values[3])
    values[9] = None if values[9] is None else bool(values[9])
    values[14] = bool(values[14])
    return DomainState(*values)


def _count(db, name: str, labels, n: int = 1) -> None:
    db.execute("INSERT INTO counters (name, labels, value) VALUES (?, ?, ?)"
               " ON CONFLICT (name, labels) DO UPDATE SET value = value + excluded.value",
               (name, json.dumps(list(labels)), int(n)))


@dataclass(frozen=True)
class Forward:
    """A release still to be sent on to a peer of the cluster (as ETRN)."""

    domain: str
    peer: str
    since: float       # when the release here happened
    due: float         # the next attempt
    attempts: int
    last_error: str | None


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


def _set_fs_ids(uid: int, gid: int) -> None:
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


class _Guard:
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
                    _set_fs_ids(*self._active)
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
                _set_fs_ids(os.geteuid(), os.getegid())
        finally:
            self._depth -= 1
            self._lock.release()


def _identity(state_directory: str, uid: int | None) -> tuple[int, int] | None:
    """Whom a root process acts as in the ledger's directory: nobody but
    itself (None) when only root may write there; else ``uid`` (the
    milter's; 65534 if unknown) and the directory's group."""
    if os.geteuid() != 0:
        return None
    st = os.stat(state_directory)
    if st.st_uid == 0 and not st.st_mode & 0o002 and not (st.st_mode & 0o020 and st.st_gid):
        return None
    return (65534 if uid is None else uid, st.st_gid)


class Ledger:
    """The ledger file, and one connection to it shared by a process's threads.

    A ledger removed or replaced under a running process is noticed on the
    next use (one stat) and opened afresh; one that is not a database any
    more is set aside and started afresh. ``generation`` counts the files
    this object has opened: when it moves, the queue is the only truth
    left, and ``HeldMail`` rebuilds the rows from the tag headers.
    """

    def __init__(self, state_directory: str, as_uid: int | None = None):
        """``as_uid``: in a root process, the uid (the milter's) whose rights
        it takes in the state directory when others may write there."""
        os.makedirs(state_directory, mode=0o750, exist_ok=True)
        self.path = os.path.join(state_directory, FILENAME)
        self._as_uid = as_uid
        self._lock = _Guard()
        self.generation = 0
        self.fresh = False  # did our last open create the file?
        self._open()

    def _open(self) -> None:
        self._lock.identity = _identity(os.path.dirname(self.path), self._as_uid)
        with self._lock:
            self._open_file()

    def _open_file(self) -> None:
        self.fresh = not os.path.exists(self.path)
        try:
            self._create()
            self._connect()
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorcode", None) not in CORRUPT:
                raise   # a full disk, a lock, permissions: not a reason to start afresh
            aside = f"{self.path}.corrupt-{int(time.time())}"
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(self.path + suffix):
                    os.replace(self.path + suffix, aside + suffix)
            log.warning("event=ledger_corrupt path=%s kept_as=%s", self.path, aside)
            self.fresh = True
            self._create()
            self._connect()
        self.generation += 1

    def _connect(self) -> None:
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=30000")
            with self._tx():
                # foreign_mail is a cache of verdicts: one of an older shape
                # (no scope) is dropped and made anew, not migrated
                old = {row[1] for row in self._db.execute("PRAGMA table_info(foreign_mail)")}
                if old and "scope" not in old:
                    self._db.execute("DROP TABLE foreign_mail")
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        self._db.execute(stmt)
                for table, column, kind in _ADDED_COLUMNS:
                    columns = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
                    if column not in columns:
                        self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                for stmt in _ADDED_INDEXES:
                    self._db.execute(stmt)
        except sqlite3.DatabaseError:
            self._db.close()
            raise
        self._inode = os.stat(self.path).st_ino

    def _create(self) -> None:
        """Make a missing ledger file before SQLite does: 0660, in the state
        directory's group, whoever creates it and whatever its umask.  SQLite
        gives the -wal and -shm files the database file's mode (and, run by
        root, its owner and group), so an unprivileged milter sharing that
        group (``share``) can always write all three."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o660)
        except FileExistsError:
            return
        try:
            os.fchmod(fd, 0o660)
            if os.geteuid() == 0 and self._lock.identity is None:
                os.fchown(fd, -1, os.stat(os.path.dirname(self.path)).st_gid)
        finally:
            os.close(fd)

    def ask_recount(self, domain: str, when: float) -> None:
        """The milter refused mail at the domain's quota by running totals it
        cannot check against the queue: the keeper counts it again."""
        self._update(domain, recount_asked=when)

    def recounts_asked(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT domain FROM domains WHERE recount_asked IS NOT NULL")]

    def recounted(self, domain: str, asked_before: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE domains SET recount_asked = NULL WHERE domain = ? "
                       "AND recount_asked <= ?", (domain, asked_before))

    def check_file(self) -> bool:
        """Open the ledger afresh if its file was removed or replaced; True if so."""
        try:
            inode = os.stat(self.path).st_ino
        except FileNotFoundError:
            inode = None
        if inode == self._inode:
            return False
        with self._lock:
            log.warning("event=ledger_replaced path=%s", self.path)
            self._db.close()
            self._open()
        return True

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _ensure_domain(self, db, domain: str) -> None:
        db.execute("INSERT OR IGNORE INTO domains (domain) VALUES (?)", (domain,))

    # -- messages ----------------------------------------------------------
    def record(self, queue_id: str, domain: str, size: int, arrival: float | None = None,
               ctime: float | None = None, counted: tuple | None = None,
               route: str | None = None, origin: str = "smtpd") -> bool:
        """Add a held message; False if the id was already recorded.
        ``counted``: (counter name, *labels) to count in the same transaction."""
        now = time.time()
        when = now if arrival is None else arrival
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO messages (queue_id, domain, size, arrival, ctime, route,"
                " recorded, origin) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (queue_id, domain, int(size), when, when if ctime is None else ctime,
                 None if route == domain else route, now, origin))
            if cur.rowcount == 0:
                return False
            if counted:
                _count(db, counted[0], counted[1:])
            self._ensure_domain(db, domain)
            db.execute("UPDATE domains SET messages = messages + 1, bytes = bytes + ?"
                       " WHERE domain = ?", (int(size), domain))
            return True

    _ENTRY_SELECT = ("SELECT queue_id, domain, size, arrival, COALESCE(ctime, arrival),"
                     " COALESCE(route, domain), released, refused, refused_since, origin"
                     " FROM messages")

    def entries(self, domain: str) -> list[Entry]:
        with self._lock:
            rows = self._db.execute(self._ENTRY_SELECT + " WHERE domain = ? ORDER BY arrival",
                                    (domain,)).fetchall()
        return [Entry(*row) for row in rows]

    def entries_by_id(self, queue_ids) -> dict[str, Entry]:
        return {row[0]: Entry(*row) for row in
                self._rows_in(self._ENTRY_SELECT + " WHERE queue_id IN ({})", queue_ids)}

    def _rows_in(self, sql: str, queue_ids, *before) -> list:
        """Rows of ``sql`` (its ``{}`` the IN list) for many ids, 500 at a time;
        ``before``: the values of the placeholders ahead of the list."""
        ids = list(queue_ids)
        rows = []
        with self._lock:
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                rows += self._db.execute(sql.format(",".join("?" * len(chunk))),
                                         [*before, *chunk]).fetchall()
        return rows

    def all_ids(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT queue_id FROM messages")}

    def recorded_since(self, domain: str, recorded_after: float, arrived_before: float) -> int:
        """Rows recorded after a moment for mail that arrived before it:
        copies of held mail requeued meanwhile (a refresh keeps the arrival)."""
        with self._lock:
            return self._db.execute(
                "SELECT COUNT(*) FROM messages WHERE domain = ? AND recorded > ?"
                " AND arrival <= ?", (domain, recorded_after, arrived_before)).fetchone()[0]

    def unrefused_routes(self) -> dict[str, list[str]]:
        """{domain: routes} of recorded mail not refused (the poller's work)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT domain, COALESCE(route, domain) FROM messages"
                " WHERE refused IS NULL ORDER BY 1, 2").fetchall()
        result: dict[str, list[str]] = {}
        for dom, route in rows:
            result.setdefault(dom, []).append(route)
        return result

    def refused_before(self, domain: str, when: float) -> bool:
        """Does the domain hold mail first refused before ``when``?"""
        with self._lock:
            return self._db.execute(
                "SELECT 1 FROM messages WHERE domain = ? AND refused_since < ? LIMIT 1",
                (domain, when)).fetchone() is not None

    def mark_released(self, queue_ids, when: float) -> None:
        ids = list(queue_ids)
        with self._tx() as db:
            db.executemany("UPDATE messages SET released = ? WHERE queue_id = ?",
                           [(when, q) for q in ids])

    def set_outcomes(self, outcomes, when: float) -> None:
        """``outcomes``: (queue_id, refusal text or None) of mail put back on
        hold after a failed attempt: a refusal is kept (first time kept too),
        a temporary failure clears it; either way the message is not in a
        release any more."""
        rows = list(outcomes)
        with self._tx() as db:
            for qid, refusal in rows:
                if refusal is None:
                    db.execute("UPDATE messages SET refused = NULL, refused_since = NULL,"
                               " released = NULL WHERE queue_id = ?", (qid,))
                else:
                    db.execute("UPDATE messages SET refused = ?, released = NULL,"
                               " refused_since = COALESCE(refused_since, ?) WHERE queue_id = ?",
                               (refusal, when, qid))

    def reassign(self, queue_id: str, domain: str, route: str) -> None:
        """A message whose remaining recipients belong to another customer domain."""
        with self._tx() as db:
            row = db.execute("SELECT domain, size FROM messages WHERE queue_id = ?",
                             (queue_id,)).fetchone()
            if row is None:
                return
            db.execute("UPDATE messages SET domain = ?, route = ? WHERE queue_id = ?",
                       (domain, None if route == domain else route, queue_id))
            if row[0] != domain:
                self._ensure_domain(db, domain)
                db.execute("UPDATE domains SET messages = messages - 1, bytes = bytes - ?"
                           " WHERE domain = ?", (row[1], row[0]))
                db.execute("UPDATE domains SET messages = messages + 1, bytes = bytes + ?"
                           " WHERE domain = ?", (row[1], domain))

    # -- held mail that is not ours, read once ---------------------------------
    # Each verdict holds for the config it was made under (``scope``: a
    # fingerprint of the domains): a process still running an
    # older config never decides for one running the newer.
    foreign_scope = ""

    def set_foreign_scope(self, scope: str) -> None:
        """Judge under ``scope`` from now on; verdicts made under other
        scopes are dropped (a config changed: what was not ours may be)."""
        self.foreign_scope = scope
        with self._tx() as db:
            db.execute("DELETE FROM foreign_mail WHERE scope != ?", (scope,))

    def foreign(self, queue: str) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute(
                "SELECT queue_id FROM foreign_mail WHERE scope = ? AND queue = ?",
                (self.foreign_scope, queue))}

    def foreign_among(self, queue: str, queue_ids) -> set[str]:
        return {r[0] for r in self._rows_in(
            "SELECT queue_id FROM foreign_mail WHERE scope = ? AND queue = ?"
            " AND queue_id IN ({})", queue_ids, self.foreign_scope, queue)}

    def foreign_for_customers(self) -> dict[str, int]:
        """Held mail for customer domains that is not ours, per domain."""
        with self._lock:
            rows = self._db.execute(
                "SELECT domain, COUNT(*) FROM foreign_mail WHERE scope = ? AND"
                " domain IS NOT NULL AND queue = 'hold' GROUP BY domain",
                (self.foreign_scope,)).fetchall()
        return dict(rows)

    def add_foreign(self, queue: str, items) -> None:
        """``items``: (queue_id, customer domain or None)."""
        with self._tx() as db:
            db.executemany("INSERT OR IGNORE INTO foreign_mail VALUES (?, ?, ?, ?)",
                           [(self.foreign_scope, queue, qid, dom) for qid, dom in items])

    def prune_foreign(self, queue: str, present: set[str]) -> None:
        gone = self.foreign(queue) - present
        if gone:
            with self._tx() as db:
                db.executemany("DELETE FROM foreign_mail WHERE scope = ? AND queue = ?"
                               " AND queue_id = ?",
                               [(self.foreign_scope, queue, qid) for qid in gone])

    def arrived_since(self, domain: str, when: float) -> bool:
        """Has mail for the domain been recorded with an arrival after ``when``?"""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM messages WHERE domain = ? AND arrival > ? LIMIT 1",
                (domain, when)).fetchone()
        return row is not None

    def known(self, queue_ids) -> set[str]:
        """Which of these ids the ledger has."""
        return {r[0] for r in self._rows_in(
            "SELECT queue_id FROM messages WHERE queue_id IN ({})", queue_ids)}

    def forget(self, queue_ids) -> int:
        """Drop rows (their messages are gone); totals follow."""
        ids = list(queue_ids)
        removed = 0
        with self._tx() as db:
            for qid in ids:
                row = db.execute("DELETE FROM messages WHERE queue_id = ? RETURNING domain, size",
                                 (qid,)).fetchone()
                if row is None:
                    continue
                removed += 1
                db.execute("UPDATE domains SET messages = messages - 1, bytes = bytes - ?"
                           " WHERE domain = ?", (row[1], row[0]))
        return removed

    # -- releases to send on to the cluster's peers ------------------------
    def queue_forwards(self, domain: str, peers, now: float | None = None) -> None:
        """A release happened here: each peer is to get it now (again, if one
        was still pending: the retry period starts afresh)."""
        now = time.time() if now is None else now
        with self._tx() as db:
            db.executemany(
                "INSERT INTO forwards (domain, peer, since, due) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (domain, peer) DO UPDATE SET since = excluded.since,"
                " due = excluded.due, attempts = 0",
                [(domain, str(peer), now, now) for peer in peers])

    def forwards(self, due_by: float | None = None) -> list[Forward]:
        """Pending forwards, the earliest due first (only those due by ``due_by``)."""
        sql = "SELECT domain, peer, since, due, attempts, last_error FROM forwards"
        args: tuple = ()
        if due_by is not None:
            sql += " WHERE due <= ?"
            args = (due_by,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY due", args).fetchall()
        return [Forward(*row) for row in rows]

    def next_forward_due(self) -> float | None:
        with self._lock:
            return self._db.execute("SELECT MIN(due) FROM forwards").fetchone()[0]

    def forward_done(self, domain: str, peer: str, since: float) -> None:
        """The peer acknowledged (or refused for good) the release of ``since``;
        a newer one queued meanwhile stays."""
        with self._tx() as db:
            db.execute("DELETE FROM forwards WHERE domain = ? AND peer = ? AND since = ?",
                       (domain, peer, since))

    def forward_retry(self, domain: str, peer: str, since: float, due: float,
                      error: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE forwards SET due = ?, attempts = attempts + 1, last_error = ?"
                       " WHERE domain = ? AND peer = ? AND since = ?",
                       (due, error, domain, peer, since))

    # -- domains -----------------------------------------------------------
    def state(self, domain: str) -> DomainState:
        with self._lock:
            row = self._db.execute(_STATE_SELECT + " WHERE domain = ?", (domain,)).fetchone()
        if row is None:
            return DomainState(domain)
        return _state(row)

    def _update(self, domain: str, _counted: tuple | None = None, **fields) -> None:
        cols = ", ".join(f"{name} = ?" for name in fields)
        with self._tx() as db:
            self._ensure_domain(db, domain)
            db.execute(f"UPDATE domains SET {cols} WHERE domain = ?", (*fields.values(), domain))
            if _counted:
                _count(db, _counted[0], _counted[1:])

    def has_domain(self, domain: str) -> bool:
        """Has this ledger ever had a row for ``domain``?"""
        with self._lock:
            return self._db.execute("SELECT 1 FROM domains WHERE domain = ?",
                                    (domain,)).fetchone() is not None

    def states(self) -> dict[str, DomainState]:
        """Every domain's row, in one read."""
        with self._lock:
            rows = self._db.execute(_STATE_SELECT).fetchall()
        return {row[0]: _state(row) for row in rows}

    # -- event counters (Prometheus counters that outlive any process) ------
    def add_counts(self, items) -> None:
        """``items``: (name, labels tuple, n) each, added in one transaction."""
        items = list(items)
        if not items:
            return
        with self._tx() as db:
            for name, labels, n in items:
                _count(db, name, labels, n)

    def counters(self) -> list[tuple[str, tuple, int]]:
        with self._lock:
            rows = self._db.execute("SELECT name, labels, value FROM counters"
                                    " ORDER BY name, labels").fetchall()
        return [(name, tuple(json.loads(labels)), value) for name, labels, value in rows]

    def set_paused(self, domain: str, paused: bool) -> None:
        self._update(domain, paused=int(paused))

    def record_flush(self, domain: str, trigger: str, result: str,
                     releasing_until: float | None, when: float | None = None,
                     client: str | None = None) -> None:
        """A release: the domain's last-flush fields, and releases{domain,trigger} + 1."""
        self._update(domain, last_flush=time.time() if when is None else when,
                     last_flush_trigger=trigger, last_flush_result=result,
                     last_flush_client=client, releasing_until=releasing_until,
                     _counted=("releases", domain, trigger))

    def set_releasing_until(self, domain: str, until: float | None) -> None:
        self._update(domain, releasing_until=until)

    def set_backoff(self, domain: str, until: float | None, step: float | None) -> None:
        self._update(domain, backoff_until=until, backoff=step)

    def claim_release(self, domain: str, now: float, trigger: str, client: str | None,
                      includes_refused: bool, releasing_until: float, shares) -> bool:
        """Start a release unless one shares it: ``shares(state)`` decides
        from the row read in the same transaction, so two processes never
        both start one.  True: this caller releases (the row says so)."""
        with self._tx() as db:
            self._ensure_domain(db, domain)
            row = db.execute(_STATE_SELECT + " WHERE domain = ?", (domain,)).fetchone()
            if shares(_state(row)):
                return False
            db.execute("UPDATE domains SET last_flush = ?, last_flush_trigger = ?,"
                       " last_flush_result = ?, last_flush_client = ?, releasing_until = ?,"
                       " release_refused = ? WHERE domain = ?",
                       (now, trigger, f"releasing (pid {os.getpid()})", client, releasing_until,
                        int(includes_refused), domain))
            _count(db, "releases", (domain, trigger))
            return True

    def set_flush_result(self, domain: str, result: str) -> None:
        self._update(domain, last_flush_result=result)

    def record_probe(self, domain: str, reachable: bool, error: str | None,
                     when: float | None = None, outcome: str | None = None) -> None:
        """A probe's result, and probes{domain,outcome} + 1."""
        self._update(domain, reachable=int(reachable), last_error=error,
                     last_probe=time.time() if when is None else when,
                     _counted=("probes", domain,
                               outcome or ("reachable" if reachable else "unreachable")))

    def domains_with_mail(self) -> list[str]:
        """Unpaused domains whose running totals show held mail."""
        with self._lock:
            rows = self._db.execute(
                "SELECT domain FROM domains WHERE messages > 0 AND paused = 0"
                " ORDER BY domain").fetchall()
        return [r[0] for r in rows]

    def releasing_domains(self, now: float | None = None) -> list[str]:
        when = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT domain FROM domains WHERE releasing_until IS NOT NULL"
                " AND releasing_until > ?", (when,)).fetchall()
        return [r[0] for r in rows]
