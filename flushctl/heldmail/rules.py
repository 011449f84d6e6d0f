"""The rules of holding and releasing, as plain functions over a snapshot.

A snapshot is what one pass of ``stat`` calls saw of a domain's ledger
entries at one moment: which queue each message is in, its queue file's
time stamp (Postfix's retry time for deferred mail), whether an admin
forced its expiry.  Every decision here (what to put back on hold, what a
release sends, what is stale, whether a trigger shares a release, how long
the poller waits after failed attempts, what a failed attempt means) is
made from that and the clock; the side effects live in the ``HeldMail`` parts and
``keeper``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

# What a message of ours is doing, by where its queue file is.
HELD = "held"              # in the hold queue: never tried, never expires
WAITING = "waiting"        # released, due in the deferred queue: qmgr takes it next
FAILED = "failed"          # deferred with its retry time ahead: an attempt failed
STRAY = "stray"            # deferred and due, but not released lately: hold it
IN_FLIGHT = "in flight"    # incoming, active, maildrop: Postfix is at work on it
RETURNING = "returning"    # its expiry was forced (postsuper -e/-f): Postfix returns it
GONE = "gone"              # delivered, deleted or returned

# How long after a release its mail may wait, due, in the deferred queue
# for qmgr (a release cut short keeps asking qmgr meanwhile); later it is
# put back on hold.
RELEASE_WATCH = 900.0

# Triggers a customer or an admin sends; the poller is the only automatic one.
# ODMR: the customer's own client, connected and asking (RFC 2645 ATRN).
EXPLICIT_TRIGGERS = frozenset({"admin", "finger", "etrn", "peer", "odmr", "portal"})


@dataclass(frozen=True)
class Item:
    """One ledger entry and where its message was at snapshot time."""

    queue_id: str
    domain: str
    route: str                  # the destination its mail goes to (see routing)
    size: int
    arrival: float
    ctime: float                # when Postfix's lifetime clock for this file started
    queue: str | None           # hold, incoming, active, deferred; None: gone
    mtime: float = 0.0          # the queue file's time stamp (retry time when deferred)
    forced: bool = False        # expiry forced (postsuper -e/-f: group-execute bit)
    released: float | None = None       # when a release last sent it
    refused: str | None = None          # the customer server's last 5xx reply
    refused_since: float | None = None  # when it was first refused


def kind(item: Item, now: float, watch: float = RELEASE_WATCH,
         releasing_until: float | None = None) -> str:
    """What the message is doing (one of the constants above).
    ``releasing_until``: the domain's release is still watched until then
    (Postfix at work on it): released mail due in the deferred queue waits."""
    if item.queue is None:
        return GONE
    if item.queue == "hold":
        return HELD   # an admin's postsuper -e too: Postfix returns it once released
    if item.forced:
        return RETURNING
    if item.queue in ("incoming", "active", "maildrop"):
        return IN_FLIGHT
    if item.mtime > now:
        return FAILED
    if item.released is not None and (now - item.released < watch
                                      or (releasing_until is not None and now < releasing_until)):
        return WAITING
    return STRAY


@dataclass(frozen=True)
class Snapshot:
    items: tuple[Item, ...]
    now: float
    releasing_until: float | None = None   # the domain's release watch

    def kind(self, item: Item) -> str:
        return kind(item, self.now, RELEASE_WATCH, self.releasing_until)

    def of_kind(self, *kinds: str) -> list[Item]:
        return [i for i in self.items if self.kind(i) in kinds]

    def ids(self, *kinds: str) -> list[str]:
        return [i.queue_id for i in self.of_kind(*kinds)]

    @cached_property   # the snapshot does not change: its figures read it several times
    def present(self) -> list[Item]:
        return [i for i in self.items if i.queue is not None]

    @property
    def gone(self) -> list[str]:
        return [i.queue_id for i in self.items if i.queue is None]

    def to_rehold(self) -> list[Item]:
        """Mail that must go back on hold now: failed after a release, or
        lying in the deferred queue without a release sending it."""
        return self.of_kind(FAILED, STRAY)

    def busy(self) -> bool:
        """Is a release of this mail still at work (Postfix has some of it)?"""
        return bool(self.of_kind(IN_FLIGHT, WAITING))

    def figures(self) -> tuple[int, int, float | None]:
        """Held messages (anywhere in the queue), bytes, the oldest arrival."""
        present = self.present
        return (len(present), sum(i.size for i in present),
                min((i.arrival for i in present), default=None))

    def per_queue(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for i in self.present:
            counts[i.queue] = counts.get(i.queue, 0) + 1
        return dict(sorted(counts.items()))

    def routes(self) -> dict[str, int]:
        """Messages present per destination."""
        counts: dict[str, int] = {}
        for i in self.present:
            counts[i.route] = counts.get(i.route, 0) + 1
        return dict(sorted(counts.items()))

    def refused(self) -> list[Item]:
        return [i for i in self.present if i.refused is not None]


@dataclass
class Tally:
    """A domain's held mail counted for the all-domains views (what a
    Snapshot's figures say, without an Item per message: a million held
    made those objects most of the time)."""

    now: float
    releasing_until: float | None = None
    messages: int = 0
    bytes: int = 0
    oldest: float | None = None
    queues: dict = field(default_factory=dict)
    hosts: dict = field(default_factory=dict)
    refused_items: list = field(default_factory=list)

    def add(self, queue: str, route: str, size: int, arrival: float) -> None:
        self.messages += 1
        self.bytes += size
        if self.oldest is None or arrival < self.oldest:
            self.oldest = arrival
        self.queues[queue] = self.queues.get(queue, 0) + 1
        self.hosts[route] = self.hosts.get(route, 0) + 1

    def add_item(self, item: Item) -> None:
        self.add(item.queue, item.route, item.size, item.arrival)
        if item.refused is not None:
            self.refused_items.append(item)

    def figures(self) -> tuple[int, int, float | None]:
        return self.messages, self.bytes, self.oldest

    def per_queue(self) -> dict[str, int]:
        return dict(sorted(self.queues.items()))

    def routes(self) -> dict[str, int]:
        return dict(sorted(self.hosts.items()))

    def refused(self) -> list[Item]:
        return list(self.refused_items)


def releasable(snapshot: Snapshot, trigger: str, routes: set[str] | None = None) -> list[Item]:
    """Held mail a release by ``trigger`` sends: refused mail only when a
    customer or an admin asks (the poller never retries it by itself);
    ``routes``: only these destinations (the ones that answered)."""
    explicit = trigger in EXPLICIT_TRIGGERS
    return [i for i in snapshot.of_kind(HELD)
            if (explicit or i.refused is None) and (routes is None or i.route in routes)]


def stale(items: list[Item], now: float, stale_after: float) -> list[Item]:
    """Held mail whose lifetime clock is too old to survive a failed attempt:
    Postfix returns a message once an attempt fails after its creation time
    plus the lifetime, so it gets a new clock before it is released."""
    return [i for i in items if i.ctime < now - stale_after]


def not_due(items: list[Item], now: float) -> list[Item]:
    """Held mail whose retry time is ahead (it failed an attempt once): a
    release makes it due, or the deferred-queue scan would pass it by."""
    return [i for i in items if i.mtime > now]


def stale_after(lifetimes: list[float]) -> float:
    """Half the shortest lifetime (maximal_queue_lifetime, bounce_queue_lifetime)."""
    return min(lifetimes) / 2


# -- what a failed attempt means ---------------------------------------------
TEMPFAIL = "tempfail"            # the server answered 4xx, or did not answer
REFUSED = "refused"              # a 5xx, a loop, a name that does not exist
NOT_ATTEMPTED = "not attempted"  # "deferred transport": never sent anywhere

# a remote 5xx ("host X said: 550 ...", "host X refused to talk to me: 554 ...")
_REMOTE_5XX = re.compile(r"\b(said|refused to talk to me): 5\d\d\b")
# permanent local reasons: a loop, a name that does not exist (NXDOMAIN),
# a null MX; "Host not found, try again" is a DNS failure of the moment
_PERMANENT_LOCAL = ("loops back to myself", "Host or domain name not found",
                    "Host not found", "null MX", "nullMX", "does not accept mail")
_TEMPORARY_LOCAL = ("try again",)


def _permanent(reason: str) -> bool:
    if _REMOTE_5XX.search(reason):
        return True
    if any(t in reason for t in _TEMPORARY_LOCAL):
        return False
    return any(p in reason for p in _PERMANENT_LOCAL)


def attempt_outcome(reasons: list[str]) -> str:
    """What the recipients' last failures (defer log reasons) mean for the
    message: REFUSED when any was permanent (the on-demand transport turns
    5xx into deferrals, soft_bounce), TEMPFAIL when any was tried, else
    NOT_ATTEMPTED (empty: nothing known, treated as a temporary failure)."""
    if not reasons:
        return TEMPFAIL
    if any(_permanent(r) for r in reasons):
        return REFUSED
    if all(r.strip() == "deferred transport" for r in reasons):
        return NOT_ATTEMPTED
    return TEMPFAIL


def refusal_text(reasons: list[str]) -> str:
    """The reply worth showing of a refused message (the first permanent one)."""
    for r in reasons:
        if _permanent(r):
            return r[:500]
    return (reasons[0] if reasons else "")[:500]


# -- the poller's retry discipline -------------------------------------------
def next_backoff(current: float | None, minimal: float, maximal: float) -> float:
    """Postfix's discipline for a destination whose attempts tempfail: the
    first wait is minimal_backoff_time, each further one doubles, up to
    maximal_backoff_time."""
    if not current:
        return min(minimal, maximal)
    return min(max(current * 2, minimal), maximal)


def poller_may_release(backoff_until: float | None, now: float) -> bool:
    """The poller waits out a backoff; a customer's or an admin's trigger does not."""
    return backoff_until is None or backoff_until <= now


# -- one release window for every trigger ------------------------------------
def shares_window(last_release: float | None, now: float, window: float,
                  arrived_since: bool, trigger: str, last_included_refused: bool,
                  refused_held: bool) -> bool:
    """Does a trigger share the release that started at ``last_release``
    (any trigger's) instead of starting another?  Yes within ``window``
    seconds, unless new mail has arrived since, or this trigger would send
    refused mail that release left out.  The window guards against floods
    of remote and automatic triggers; the admin's `flushctl flush` is
    deliberate and always releases (and starts a window of its own)."""
    if trigger == "admin":
        return False
    if last_release is None or now - last_release >= window or now < last_release:
        return False
    if arrived_since:
        return False
    if trigger in EXPLICIT_TRIGGERS and refused_held and not last_included_refused:
        return False
    return True
