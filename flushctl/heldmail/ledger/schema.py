"""The ledger's shape on disk: its file name, tables, added columns and indexes, row types.

``migrate`` brings a ledger of any earlier version to this one; the row
types are what reads of it return.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

FILENAME = "ledger.sqlite3"

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
CREATE TABLE IF NOT EXISTS history (
    domain   TEXT NOT NULL,
    hour     INTEGER NOT NULL,  -- hours since the epoch
    messages INTEGER NOT NULL,
    PRIMARY KEY (domain, hour)
);
CREATE TABLE IF NOT EXISTS notices (
    domain TEXT NOT NULL,
    kind   TEXT NOT NULL,       -- a notice's kind, or "empty": last seen holding nothing
    sent   REAL NOT NULL,
    PRIMARY KEY (domain, kind)
);
CREATE TABLE IF NOT EXISTS webhooks (
    id        INTEGER PRIMARY KEY,
    domain    TEXT NOT NULL,
    kind      TEXT NOT NULL,
    url       TEXT NOT NULL,
    body      BLOB NOT NULL,
    signature TEXT NOT NULL,
    due       REAL NOT NULL,
    until     REAL NOT NULL,    -- given up after
    attempts  INTEGER NOT NULL DEFAULT 0,
    taken     REAL,             -- handed to the poller then (not handed again for a while)
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,     -- "rebuilt": this file was rebuilt from the queue
    value TEXT NOT NULL
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
    # the all-domains views count mail routed elsewhere than its domain (few rows)
    "CREATE INDEX IF NOT EXISTS messages_routed ON messages (domain, route)"
    " WHERE route IS NOT NULL",
)


def migrate(db) -> None:
    """Make the tables, columns and indexes a ledger of any earlier version
    lacks; inside the caller's transaction."""
    # foreign_mail is a cache of verdicts: one of an older shape
    # (no scope) is dropped and made anew, not migrated
    old = {row[1] for row in db.execute("PRAGMA table_info(foreign_mail)")}
    if old and "scope" not in old:
        db.execute("DROP TABLE foreign_mail")
    for stmt in _SCHEMA.split(";"):
        if stmt.strip():
            db.execute(stmt)
    for table, column, kind in _ADDED_COLUMNS:
        columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if column not in columns:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    for stmt in _ADDED_INDEXES:
        db.execute(stmt)


class Totals(NamedTuple):
    """What ``Records.totals`` reads for the all-domains views."""
    uneven: set                 # domains to count row by row
    held: dict                  # domain -> (messages, bytes, oldest arrival)
    routed: dict                # domain -> {route: messages} (routes other than the domain)
    refused: list               # rows (Entry's fields) of refused mail


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


# the columns of Entry, in its order
ENTRY_SELECT = ("SELECT queue_id, domain, size, arrival, COALESCE(ctime, arrival),"
                " COALESCE(route, domain), released, refused, refused_since, origin"
                " FROM messages")


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
STATE_SELECT = ("SELECT domain, messages, bytes, paused, last_flush, last_flush_trigger,"
                " last_flush_result, last_flush_client, releasing_until, reachable,"
                " last_probe, last_error, backoff_until, backoff,"
                " COALESCE(release_refused, 0) FROM domains")


def domain_state(row) -> DomainState:
    """A row of ``STATE_SELECT`` as a DomainState."""
    values = list(row)
    values[3] = bool(values[3])
    values[9] = None if values[9] is None else bool(values[9])
    values[14] = bool(values[14])
    return DomainState(*values)


@dataclass(frozen=True)
class Forward:
    """A release still to be sent on to a peer of the cluster (as ETRN)."""

    domain: str
    peer: str
    since: float       # when the release here happened
    due: float         # the next attempt
    attempts: int
    last_error: str | None
