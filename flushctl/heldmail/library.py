"""HeldMail, the library of held mail: built from its parts, with the plumbing they share.

``HeldMail`` is put together from one part per job, each in its own module:

- ``status``: what each domain holds (snapshots, statuses, the poller's
  candidates);
- ``release``: releasing held mail toward a customer's servers;
- ``intake``: taking in and holding mail the milter did not see;
- ``holdback``: putting mail that failed after a release back on hold;
- ``admin``: pause, resume, purge, return to senders, let a removed
  domain's mail go;
- ``verify``: the keeper's check of every row against the queue, which
  the all-domains views count from.

What they share lives here: the ledger, Postfix's settings and queue
layout, the configured domains, holding mail, and probing (our own hosts
and addresses left out).  Decisions are made by ``rules`` over one snapshot
of a domain's queue entries; the parts carry them out.
"""

from __future__ import annotations

import logging
import os

from flushctl import names
from flushctl.config import Config, Domain
from flushctl.heldmail import rules as rules
from flushctl.heldmail.admin import AdminPart
from flushctl.heldmail.holdback import HoldBackPart
from flushctl.heldmail.intake import IntakePart
from flushctl.heldmail.ledger.store import Ledger
from flushctl.heldmail.release import ReleasePart
from flushctl.heldmail.status import StatusPart
from flushctl.heldmail.verify import VerifyPart, ask_helper
from flushctl.mta.commands import Postfix, PostfixError
from flushctl.mta.queuefiles import QueueLayout, QueueWatch, parse_duration
from flushctl.mta.relays import Overrides
from flushctl.mta.routing import route_of
from flushctl.poller.prober import Prober, ProbeResult, is_ip, probe

log = logging.getLogger("flushctl.release")


def interface_addresses() -> list[str]:
    """Every address of this machine's interfaces (IPv6 scopes dropped)."""
    import psutil
    import socket
    return [a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family in (socket.AF_INET, socket.AF_INET6)]


class HeldMail(StatusPart, ReleasePart, IntakePart, HoldBackPart, AdminPart, VerifyPart):
    """The held mail of this host: one object per process, its parts mixed in."""

    def __init__(self, config: Config, postfix: Postfix | None = None,
                 layout: QueueLayout | None = None, ledger: Ledger | None = None):
        self.config = config
        self.overrides = Overrides(config)   # the relays customers chose
        self.postfix = postfix or Postfix(config.config_directory)
        self._layout = layout
        self._params: dict[str, str] | None = None
        self._prober: Prober | None = None
        self._postfix_prober: Prober | None = None
        # intake's memory between passes
        self._watches: dict[str, QueueWatch] = {}
        self._seen: dict[str, set[str]] = {}      # ids take_in has looked up, per queue
        self._ours_deferred: set[str] = set()     # ours, in the deferred queue at last look
        # the hold queue at intake's last look: (ids, as of when, listing version)
        self._hold_listing: tuple[set[str], float, int] | None = None
        # the keeper's check of every row (verify): its own, and where a
        # process gets one (the helper's, asked over its socket)
        self._check = None
        self._verified_key: tuple | None = None   # the listing and file last checked
        self._checked_at = float("-inf")
        self._check_cost = 0.0
        self.check_source = lambda: ask_helper(self.config)
        self._fingerprint: tuple | None = None
        self._nudged_at = float("-inf")
        self._domains_text: str | None = None
        self._ledger: Ledger | None = None
        self._rebuilt = 0
        if ledger is not None:
            self._take(ledger)

    @property
    def ledger(self) -> Ledger:
        """The ledger, opened on first use: a process that only probes (the
        unprivileged poller) never opens it."""
        if self._ledger is None:
            self._take(Ledger(self.config.state_directory, as_uid=self._milter_uid()))
        return self._ledger

    def _milter_uid(self) -> int | None:
        """The milter's uid: a root process acts as it in the state directory
        the milter shares (see ``ledger.sharing.Guard``)."""
        if not self.config.milter_user or os.geteuid() != 0:
            return None
        import pwd
        try:
            return pwd.getpwnam(self.config.milter_user).pw_uid
        except KeyError:
            return None

    def _take(self, ledger: Ledger) -> None:
        self._ledger = ledger
        # The file this process found is trusted once it was rebuilt from
        # the queue, by whichever process could (it may have been made by
        # one that cannot: the milter).  A file it sees replaced later (a
        # removal, corruption, a backup put back) it rebuilds itself,
        # whatever the new file says.
        self._found = ledger.generation
        self._rebuilt = 0

    def needs_rebuild(self) -> bool:
        """Is the ledger file one this process must rebuild from the queue
        first?  One stat; one row read per file until it is trusted."""
        self.ledger.check_file()
        if self._rebuilt == self.ledger.generation:
            return False
        if self.ledger.marked_generation() == self._found:
            self._rebuilt = self._found
            return False
        return True

    def rebuild_if_needed(self) -> dict[str, int]:
        """Rebuild the ledger from the hold queue if ``needs_rebuild``."""
        if not self.needs_rebuild():
            return {}
        generation = self.ledger.generation
        # tried once per file: a process that cannot read the queue, or a
        # full disk, does not make every call a rebuild
        self._rebuilt = generation
        # what this process remembers of the queue was looked up in a file
        # that is gone, and a watch's listing may be older than the file:
        # every id is listed and looked up again, in this one
        for seen in self._seen.values():
            seen.clear()
        self._ours_deferred.clear()
        self._watches.clear()
        self._hold_listing = None
        counts = self.take_in(queues=("hold",))
        self.ledger.mark_rebuilt(generation)
        return counts

    # -- Postfix's settings, read once per process --------------------------
    def params(self) -> dict[str, str]:
        if self._params is None:
            self._params = self.postfix.get(
                "queue_directory", "hash_queue_names", "hash_queue_depth",
                "maximal_queue_lifetime", "bounce_queue_lifetime",
                "minimal_backoff_time", "maximal_backoff_time",
                "disable_dns_lookups", "smtp_dns_support_level", "myhostname")
        return self._params

    @property
    def layout(self) -> QueueLayout:
        if self._layout is None:
            self._layout = QueueLayout.from_params(self.params())
        return self._layout

    def seconds(self, name: str) -> float:
        return parse_duration(self.params()[name])

    def stale_after(self) -> float:
        """Seconds after which held mail gets a new clock before a release."""
        return rules.stale_after([self.seconds("maximal_queue_lifetime"),
                                  self.seconds("bounce_queue_lifetime")])

    def domain(self, name: str) -> Domain:
        """The configured domain as it routes now (its customer's relay,
        if it chose one), or ``UnknownDomain``."""
        return self.overrides.domain(self.config.domain(name))

    # -- probing ------------------------------------------------------------
    @property
    def prober(self) -> Prober:
        """One prober (and DNS cache) for this process; our own hosts left out."""
        if self._prober is None:
            from flushctl.poller.prober import record_types
            try:
                protocols = self.postfix.get("inet_protocols")["inet_protocols"]
            except (PostfixError, KeyError):
                protocols = "all"
            own = self.own_addresses()
            self._prober = Prober(self.config.probe_timeout, self.own_hosts(),
                                  self.config.nameservers, own, record_types(protocols))
            if self.overrides.editable:
                self._prober.fence = self.fence(own)
        return self._prober

    def fence(self, own: frozenset[str] | None = None):
        """fence(relay, targets, problem): why a relay a customer chose may
        not be used where it resolves (None: it may); see ``mta.relays``."""
        from flushctl.mta.relays import target_refusal
        allow = self.config.portal.relay_allow if self.config.portal else ()
        mine = frozenset(own if own is not None else self.own_addresses()) \
            | frozenset(interface_addresses())
        return lambda relay, found, problem: target_refusal(relay, found, problem, allow, mine)

    def own_hosts(self) -> set[str]:
        """Names of our own MX hosts: [poller] own_hosts, Postfix's
        myhostname and the cluster's peers."""
        own = set(self.config.own_hosts)
        try:
            own.add(self.postfix.get("myhostname")["myhostname"].lower())
        except (PostfixError, KeyError):
            pass
        if self.config.cluster is not None:
            own.update(p.host for p in self.config.cluster.peers if not is_ip(p.host))
        return own

    def own_addresses(self) -> frozenset[str]:
        """Addresses Postfix takes for itself (inet_interfaces, proxy_interfaces)
        and the peers written as addresses."""
        from flushctl.mta.routing import own_addresses
        import socket
        try:
            values = self.postfix.get("inet_interfaces", "proxy_interfaces")
        except PostfixError:
            values = {"inet_interfaces": "all", "proxy_interfaces": ""}
        local = interface_addresses()

        def resolve(name):
            try:
                return [i[4][0] for i in socket.getaddrinfo(name, None)]
            except OSError:
                return []
        own = set(own_addresses(values.get("inet_interfaces", "all"),
                                values.get("proxy_interfaces", ""), local, resolve))
        if self.config.cluster is not None:
            own.update(p.host for p in self.config.cluster.peers if is_ip(p.host))
        return frozenset(own)

    def postfix_prober(self) -> Prober | None:
        """A prober that resolves as Postfix's smtp client does (the system's
        resolv.conf: the on-demand transport is not chrooted), when that can
        differ from ours: only with [poller] nameservers, and only when
        Postfix looks up MX records at all.  None otherwise."""
        if not self.config.nameservers:
            return None
        params = self.params()
        if params.get("disable_dns_lookups", "no") == "yes" or \
                params.get("smtp_dns_support_level", "") == "disabled":
            return None
        if self._postfix_prober is None:
            self._postfix_prober = self.prober.same_view()
        return self._postfix_prober

    def record_probe(self, domain: str, result: ProbeResult) -> None:
        self.ledger.record_probe(domain, result.reachable,
                                 None if result.reachable else result.text(), result.when,
                                 result.outcome.replace(" ", "_"))

    def probe(self, domain: str, route: str | None = None) -> ProbeResult:
        dom = self.domain(domain)
        result = probe(dom, self.prober, route)
        self.record_probe(dom.name, result)
        return result

    # -- used by several parts ------------------------------------------------
    def _customer_route(self, rcpt: str) -> tuple[str, str] | None:
        """(customer domain, route) of a recipient, or None: not a customer's."""
        parts = names.split_recipient(rcpt)
        if parts is None:
            return None
        customer = names.customer_of(parts[1], self.config.domains)
        if customer is None:
            return None
        return customer, route_of(self.domain(customer), parts[1])

    def _hold(self, queue_ids: list[str]) -> None:
        """postsuper -h; a message that moved on meanwhile is not an error."""
        try:
            self.postfix.hold(queue_ids)
        except PostfixError as exc:
            log.warning("event=hold_failed messages=%d error=%r", len(queue_ids), str(exc))

    def _hold_unless_released(self, queue_ids: list[str],
                              seen: dict[str, float | None]) -> set[str]:
        """Hold ``queue_ids``, then read the release marks of those in
        ``seen`` (the mark each hold was decided on: None for none).  A
        release marks its messages, then releases them (``postsuper -H``):
        a mark other than the one seen is a release that came meanwhile,
        and this hold may have landed after its -H.  Read after the hold,
        the marks show every such release, whichever came last: those
        messages go out again, unless their domain was paused since.
        Returns them."""
        self._hold(queue_ids)
        if not seen:
            return set()
        fresh = self.ledger.entries_by_id(list(seen))
        again = [q for q, e in fresh.items()
                 if e.released is not None and e.released != seen[q]]
        paused = {d for d in {fresh[q].domain for q in again} if self.ledger.state(d).paused}
        again = [q for q in again if fresh[q].domain not in paused]
        if again:
            log.info("event=hold_undone messages=%d reason=released_meanwhile", len(again))
            try:
                self.postfix.release(again)
                self.postfix.scan_deferred()
            except PostfixError as exc:
                log.warning("event=release_failed messages=%d error=%r", len(again), str(exc))
        return set(again)
