"""The ledger's file and the one connection to it that a process's threads share.

Opening makes the file (0660, in the state directory's group) and brings
its schema up to date; a file that is not a database any more is set
aside and started afresh; one removed or replaced under a running process
is noticed (``check_file``) and opened again.  ``LedgerFile`` is the base
of the ledger's parts (see ``store``): its lock, transactions and the
helpers they share.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from contextlib import contextmanager

from flushctl.heldmail.ledger.schema import FILENAME, migrate
from flushctl.heldmail.ledger.sharing import Guard, identity

# only these errors mean the file is not a usable database (a full disk does not)
CORRUPT = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
log = logging.getLogger("flushctl.ledger")


class LedgerFile:
    """The ledger file and its connection; ``generation`` counts the files
    this object has opened."""

    def __init__(self, state_directory: str, as_uid: int | None = None):
        """``as_uid``: in a root process, the uid (the milter's) whose rights
        it takes in the state directory when others may write there."""
        os.makedirs(state_directory, mode=0o750, exist_ok=True)
        self.path = os.path.join(state_directory, FILENAME)
        self._as_uid = as_uid
        self._lock = Guard()
        self.generation = 0
        self._open()

    def _open(self) -> None:
        self._lock.identity = identity(os.path.dirname(self.path), self._as_uid)
        with self._lock:
            self._open_file()

    def _open_file(self) -> None:
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
                migrate(self._db)
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

    @property
    def file_id(self) -> int:
        """The inode of the file this object has open (a check of another
        file, a backup put back, says nothing of this one)."""
        return self._inode

    def marked_generation(self) -> int | None:
        """This object's generation if its file says it was rebuilt from the
        queue since it was made (None if not).  A file any process made
        (the milter on its next message, the keeper, a command) holds only
        what was recorded since, until one that can read the queue
        rebuilds it and marks it (``mark_rebuilt``)."""
        with self._lock:
            row = self._db.execute("SELECT 1 FROM meta WHERE key = 'rebuilt'").fetchone()
            return self.generation if row is not None else None

    def mark_rebuilt(self, generation: int) -> bool:
        """Mark the file rebuilt, if it is still the one of ``generation``
        (a file swapped in meanwhile got none of the rebuild); True if so."""
        with self._tx() as db:
            if self.generation != generation:
                return False
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('rebuilt', ?)",
                       (repr(time.time()),))
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
