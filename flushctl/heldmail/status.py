"""What each domain holds: snapshots of its queue entries, statuses, the poller's candidates.

A snapshot is one ``stat`` pass over a domain's ledger entries (rows whose
message is gone are pruned); a status adds the ledger's row for the domain
(probes, the last release, pause, backoff).  Reads only, but for pruning.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from flushctl import names
from flushctl.bulk import collector_paused
from flushctl.config import Domain, UnknownDomain
from flushctl.heldmail import rules as rules
from flushctl.heldmail.ledger.schema import DomainState, Entry
from flushctl.heldmail.rules import Item, Snapshot, Tally
from flushctl.mta.queuefiles import FORCED_EXPIRE_BIT


# held messages from which an all-domains view lists the hold queue once
# rather than stat each message
LIST_FROM = 1000


@dataclass   # not frozen: a frozen one's fields cost a call each to set (100,000 rows)
class Status:
    domain: str
    messages: int
    bytes: int
    oldest_arrival: float | None
    reachable: bool | None
    last_probe: float | None
    last_error: str | None
    last_flush: float | None
    last_flush_trigger: str | None
    last_flush_result: str | None
    last_flush_client: str | None
    paused: bool
    queues: dict[str, int]
    refused: int = 0                      # held after the customer's server refused (5xx)
    refused_reply: str | None = None      # the last such reply
    backoff_until: float | None = None    # the poller waits until then (attempts tempfailed)
    hosts: dict[str, int] = field(default_factory=dict)   # held per destination
    configured: bool = True               # False: held mail of a domain no longer configured

    def as_json(self) -> dict:
        """Every field by its name, in order (the fields' own mapping,
        copied: a quarter of the cost of naming each for 100,000 domains)."""
        return dict(self.__dict__)


# an idle domain's fields, in Status's order
_IDLE = dict(Status("", 0, 0, None, None, None, None, None, None, None, None, False,
                    {}).__dict__)


class IdleStatus(Status):
    """The status of a configured domain the ledger has no row for: nothing
    held, never probed, released, paused or backed off.  Every one is the
    same but its name: most of a provider's 100,000 domains.  So a row
    keeps only its name; every other field is the class's own (the empty
    ``queues`` and ``hosts`` made for the row when first read), and the
    CLI writes it as JSON from one template.  A quarter of the cost of
    setting each field in each row, and of freeing them."""

    def __setattr__(self, name, value):
        # written as its template (``cli.status.status_json``): a changed
        # one would be written wrong, so none is changed (nor made by
        # ``dataclasses.replace``)
        raise AttributeError(f"an idle domain's status is not changed: {name}")

    @classmethod
    def of(cls, domain: str) -> IdleStatus:
        row = object.__new__(cls)
        row.__dict__["domain"] = domain
        return row

    @property
    def queues(self) -> dict[str, int]:
        return self.__dict__.setdefault("queues", {})

    @property
    def hosts(self) -> dict[str, int]:
        return self.__dict__.setdefault("hosts", {})

    def as_json(self) -> dict:
        return {**_IDLE, "domain": self.domain, "queues": self.queues, "hosts": self.hosts}


for _name, _value in _IDLE.items():   # the class's own fields: all but the three above
    if _name not in ("domain", "queues", "hosts"):
        setattr(IdleStatus, _name, _value)


def _item(entry: Entry, found) -> Item:
    if found is None:
        return Item(entry.queue_id, entry.domain, entry.route, entry.size, entry.arrival,
                    entry.ctime, None, released=entry.released, refused=entry.refused,
                    refused_since=entry.refused_since)
    queue, st = found
    return Item(entry.queue_id, entry.domain, entry.route, entry.size, entry.arrival,
                entry.ctime, queue, st.st_mtime, bool(st.st_mode & FORCED_EXPIRE_BIT),
                entry.released, entry.refused, entry.refused_since)


class StatusPart:
    """``HeldMail``'s reading part (see ``library``): what is held where."""

    def snapshot(self, domain: str) -> Snapshot:
        """Where each of the domain's ledger entries is now: one ``stat``
        pass; rows whose message is gone are pruned."""
        self.rebuild_if_needed()
        return self._snapshot(self.ledger.entries(domain),
                              self.ledger.state(domain).releasing_until)

    def _snapshot(self, entries: list[Entry], releasing_until: float | None = None,
                  prune: bool = True) -> Snapshot:
        items = tuple(_item(e, self.layout.locate(e.queue_id)) for e in entries)
        snap = Snapshot(items, time.time(), releasing_until)
        if snap.gone and prune:
            self.ledger.forget(snap.gone)
        return snap

    locate = snapshot   # the name the milter's quota recount uses

    def status(self, domain: str | Domain) -> Status:
        dom = self._known_domain(domain)
        return self._status(dom, self.snapshot(dom), self.ledger.state(dom))

    def _known_domain(self, domain: str | Domain) -> str:
        """A configured domain, or one the ledger still holds mail for."""
        try:
            return self.domain(domain).name
        except UnknownDomain:
            name = names.domain(getattr(domain, "name", domain))
            if name in self.removed_domains():
                return name
            raise

    def status_if_empty(self, domain: str) -> Status | None:
        """The status of a domain the ledger records nothing for, from one row
        read (no queue access); None when it may hold mail or is paused."""
        dom = self.domain(domain).name
        self.rebuild_if_needed()
        state = self.ledger.state(dom)
        if state.messages > 0 or state.paused:
            return None
        return self._status(dom, None, state)

    def _status(self, dom: str, snap: Snapshot | Tally | None, state: DomainState,
                now: float | None = None) -> Status:
        """``snap`` None: nothing held (most of 100,000 domains: no figures
        worked out for them)."""
        if snap is None:
            messages, size, oldest, refused, reply, queues, hosts = 0, 0, None, 0, None, {}, {}
            now = time.time() if now is None else now
        else:
            messages, size, oldest = snap.figures()
            items, queues, hosts, now = snap.refused(), snap.per_queue(), snap.routes(), snap.now
            # the latest refusal; of equal times the same one whatever the order read
            last_refusal = max(items, key=lambda i: (i.refused_since or 0, i.queue_id),
                               default=None)
            refused, reply = len(items), last_refusal.refused if last_refusal else None
        backoff = state.backoff_until
        # by position, in the order of Status's fields: 100,000 of them
        return Status(
            dom, messages, size, oldest, state.reachable, state.last_probe, state.last_error,
            state.last_flush, state.last_flush_trigger, state.last_flush_result,
            state.last_flush_client, state.paused, queues, refused, reply,
            backoff if backoff and backoff > now else None, hosts,
            dom in self.config.domains)

    def status_all(self, exact: bool = False) -> list[Status]:
        """Every configured domain's status, then held mail of removed ones
        (``exact``: see ``located_all``)."""
        now = time.time()
        idle = IdleStatus.of
        with collector_paused():
            return [idle(name) if state is None else self._status(name, snap, state, now)
                    for name, snap, state in self.located_all(exact)]

    def located_all(self, exact: bool = False):
        """(domain, Snapshot or Tally or None, DomainState or None: the
        ledger has no row for it) for every
        configured domain and every removed one that still holds mail: one
        read of all the domains' rows, and the queue looked at only for
        those whose totals show mail (None: nothing held).  With much held,
        a Tally of each domain comes from the ledger's totals (``_tallied``)
        instead of a ``stat`` and an Item per message: checked against one
        listing of the hold queue, or, unless ``exact``, against the
        keeper's recent check of every row (``verify``), with no listing;
        a domain with rows not in the hold queue is counted row by row."""
        self.rebuild_if_needed()
        states = self.ledger.states()
        removed = sorted(d for d, s in states.items()
                         if d not in self.config.domains and s.messages > 0)
        held = sum(s.messages for s in states.values() if s.messages > 0)
        tallies = None
        if held >= LIST_FROM:
            check = None if exact else self.trusted_check(time.time())
            if check is None:
                tallies = self._tallied(set(self.layout.ids("hold")), states)
            else:
                # the keeper's check: rows of domains with mail elsewhere at
                # the check, in a release or released since are looked up
                tallies = self._tallied(None, states, check.outside.union(
                    d for d, s in states.items() if s.messages > 0 and (
                        s.releasing_until or (s.last_flush or 0) >= check.at - 1)))
        for name in [*sorted(self.config.domains), *removed]:
            state = states.get(name)
            if state is None or state.messages <= 0:
                yield name, None, state
            elif tallies is None:   # the row's other fields stand; the counts come from the queue
                yield name, self.snapshot(name), state
            else:
                yield name, tallies.get(name) or Tally(time.time(), state.releasing_until), state

    def _tallied(self, in_hold: set[str] | None, states: dict[str, DomainState],
                 looked_up: frozenset[str] = frozenset()) -> dict[str, Tally]:
        """Each holding domain's mail counted from the ledger's totals, all
        of it in the hold queue as listed (``Records.totals``; ``in_hold``
        None: as the keeper's check found it); a domain with rows the
        listing does not show (elsewhere in the queue, gone, recorded or
        moved since), or in ``looked_up``, is counted row by row
        (``_listed``)."""
        now = time.time()
        totals = self.ledger.totals(in_hold)
        totals.uneven.update(looked_up)
        refused: dict[str, list[Item]] = {}
        for row in totals.refused:
            refused.setdefault(row[1], []).append(_held_item(row))
        tallies: dict[str, Tally] = {}
        for domain, (messages, size, oldest) in totals.held.items():
            state = states.get(domain) or DomainState(domain)
            if domain in totals.uneven:
                tallies[domain] = self._listed(domain, in_hold, state)
                continue
            routed = totals.routed.get(domain, {})
            own = messages - sum(routed.values())
            hosts = dict(routed, **{domain: own}) if own else dict(routed)
            tallies[domain] = Tally(now, state.releasing_until, messages, size, oldest,
                                    {"hold": messages} if messages else {}, hosts,
                                    refused.get(domain, []))
        return tallies

    def _listed(self, name: str, in_hold: set[str] | None, state: DomainState) -> Tally:
        tally = Tally(time.time(), state.releasing_until)
        missing = []
        for row in self.ledger.rows(name):
            # Entry's fields: queue_id, domain, size, arrival, ctime, route,
            # released, refused, refused_since, origin
            if in_hold is None or row[0] not in in_hold:
                missing.append(Entry(*row))
            elif row[7] is None:
                tally.add("hold", row[5], row[2], row[3])
            else:
                tally.add_item(_held_item(row))
        if missing:
            for item in self._snapshot(missing, state.releasing_until).present:
                tally.add_item(item)   # elsewhere in the queue, or moved meanwhile
        return tally

    def removed_domains(self) -> list[str]:
        """Domains the ledger holds mail for that the config does not name."""
        return sorted(d for d, s in self.ledger.states().items()
                      if d not in self.config.domains and s.messages > 0)

    def holding(self) -> list[str]:
        """Configured, unpaused domains the ledger says hold mail (no queue scan)."""
        self.rebuild_if_needed()
        return [d for d in self.ledger.domains_with_mail() if d in self.config.domains]

    def poller_candidates(self) -> tuple[dict[str, list[str]], dict[str, float]]:
        """What the poller looks at: {domain: routes} of configured, unpaused
        domains holding mail it may send (not refused; not ODMR's), and {domain: until}
        of those it must leave alone while they back off.  Ledger reads only."""
        self.rebuild_if_needed()
        now = time.time()
        states = self.ledger.states()
        candidates, waiting = {}, {}
        for dom, routes in self.ledger.unrefused_routes().items():
            state = states.get(dom)
            if dom not in self.config.domains or state is None or state.paused:
                continue
            if self.config.domains[dom].odmr:   # its customer connects to us: nothing to probe
                continue
            if not rules.poller_may_release(state.backoff_until, now):
                waiting[dom] = state.backoff_until
                continue
            candidates[dom] = routes
        return candidates, waiting

    def recount_asked(self) -> list[str]:
        """Count again from the queue (pruning what is gone) every domain
        the milter asked for: it runs unprivileged, cannot read Postfix's
        queue, and answers 4xx at a quota by the ledger's running totals
        until a pass of this finds the mail an admin deleted or Postfix
        delivered."""
        done = []
        for name in self.ledger.recounts_asked():
            started = time.time()
            if name in self.config.domains:
                self.snapshot(name)
            self.ledger.recounted(name, started)
            done.append(name)
        return done


def _held_item(row: tuple) -> Item:
    """An Item in the hold queue from a row of Entry's fields (queue_id,
    domain, size, arrival, ctime, route, released, refused, refused_since)."""
    return Item(row[0], row[1], row[5], row[2], row[3], row[4], "hold",
                released=row[6], refused=row[7], refused_since=row[8])
