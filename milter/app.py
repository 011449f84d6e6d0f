"""The milter daemon: tag, account and hold every message for a customer domain.

pymilter calls one ``OnDemandMilter`` object per SMTP connection, each in
its own thread.  Decisions come from ``policy``; this module only talks
to libmilter, the ledger and the queue.  Callbacks we do not need are
negotiated away, headers and body are streamed without replies: on a
unix socket the milter costs next to nothing per message.

The milter only takes mail in, as smtpd and cleanup do in Postfix; the
queue housekeeping (mail that failed after a release back on hold, mail
that never passed smtpd taken in) is the keeper's, in the poller.
"""

from __future__ import annotations

import grp
import logging
import os
import threading
import time

import Milter

from flushctl import privsep
from flushctl.config import Config
from flushctl.metrics import Counts
from flushctl.ondemand import OnDemand
from flushctl.settings import OUR_HEADERS

from . import policy

log = logging.getLogger("flushctl.milter")

QUOTA_RECHECK = 10.0  # seconds between exact recounts of a domain near its quota
COUNTS_INTERVAL = 5.0  # seconds between handing the refusals counted to the ledger


class Shared:
    """What every connection of one milter process shares."""

    def __init__(self, config: Config, ondemand: OnDemand):
        self.config = config
        self.domains = config.domains
        self.ondemand = ondemand
        self.ledger = ondemand.ledger
        self.counts = Counts()   # refusals; "held" is counted with the ledger record
        self._recount_lock = threading.Lock()
        self._recounted: dict[str, float] = {}
        self.queue_unreadable = False

    def totals(self, domain: str, size: int = 0) -> tuple[int, int]:
        """Held (messages, bytes) for a domain, exact whenever it matters.

        The ledger's running totals can still include mail delivered since
        the last prune; when they say a message of ``size`` would not fit
        the quota, recount from the queue (at most every QUOTA_RECHECK
        seconds per domain).
        """
        state = self.ledger.state(domain)
        totals = (state.messages, state.bytes)
        if policy.over_quota(self.domains[domain], *totals, size=size):
            with self._recount_lock:
                due = time.monotonic() - self._recounted.get(domain, -1e9) > QUOTA_RECHECK
                if due:
                    self._recounted[domain] = time.monotonic()
            if due:
                if not self.queue_unreadable:
                    try:
                        self.ondemand.locate(domain)  # prunes what is gone
                    except PermissionError as exc:
                        # unprivileged, the queue is Postfix's: the keeper counts
                        # again the domains we ask it to (a pass every few seconds)
                        self.queue_unreadable = True
                        log.info("event=recount_by_keeper reason=%r", str(exc))
                if self.queue_unreadable:
                    self.ledger.ask_recount(domain, time.time())
                state = self.ledger.state(domain)
                totals = (state.messages, state.bytes)
        return totals


class OnDemandMilter(Milter.Base):
    shared: Shared  # set by run()

    def __init__(self):
        self.local = False
        self._reset()

    def _reset(self):
        self.klass: str | None = None
        self.route: str | None = None
        self.size = 0
        self.forged: dict[str, int] = {}   # headers of ours a sender wrote, by name
        self.untaken = False   # local mail we would have refused: left to the keeper

    def _refuse(self, reply: policy.Reply) -> int:
        if self.local and reply is not policy.LOCAL_PROBLEM:
            # no client to tell: the keeper takes the customer's part in later
            self.untaken = True
            log.info("event=left_to_keeper reason=%r", reply.text)
            return Milter.CONTINUE
        self.shared.counts.add("milter_decisions", policy.result_name(reply))
        self.setreply(reply.code, reply.dsn, reply.text)
        return Milter.TEMPFAIL if reply.temporary else Milter.REJECT

    def connect(self, hostname, family, hostaddr):
        # Mail that comes through pickup (sendmail) has no SMTP client: Postfix
        # presents it as localhost, port 0.  Nothing can be refused to it (a
        # refused recipient would leave the whole message in maildrop, retried
        # for ever): it is tagged and held only when all of it is one
        # customer's, else left to the keeper, which holds the customer's part.
        # (An SMTP client whose port smtpd could not tell also shows port
        # 0, but not as localhost at a loopback address.)
        self.local = (hostname == "localhost" and isinstance(hostaddr, tuple)
                      and len(hostaddr) >= 2 and hostaddr[1] == 0
                      and hostaddr[0] in ("127.0.0.1", "::1"))
        return Milter.CONTINUE

    @Milter.nocallback
    def hello(self, hostname):
        return Milter.CONTINUE

    def envfrom(self, mailfrom, *params):
        self._reset()
        return Milter.CONTINUE

    def envrcpt(self, rcpt, *params):
        try:
            reply, klass = policy.decide_rcpt(rcpt, self.klass, self.shared.domains,
                                              self.shared.totals)
            if reply is None and klass:
                reply, self.route = policy.decide_route(rcpt, klass, self.route,
                                                        self.shared.domains)
            if reply is None:
                self.klass = klass
        except Exception:
            log.exception("event=error stage=rcpt")
            return self._refuse(policy.LOCAL_PROBLEM)
        if reply is not None:
            log.info("event=refused rcpt=%s code=%s reason=%r", rcpt, reply.code, reply.text)
            return self._refuse(reply)
        return Milter.CONTINUE

    @Milter.nocallback
    def data(self):
        return Milter.CONTINUE

    @Milter.noreply
    def header(self, name, value):
        self.size += len(name) + len(value) + 4
        for ours in OUR_HEADERS:
            if name.lower() == ours.lower():
                self.forged[ours] = self.forged.get(ours, 0) + 1
        return Milter.CONTINUE

    @Milter.nocallback
    def eoh(self):
        return Milter.CONTINUE

    @Milter.noreply
    def body(self, chunk):
        self.size += len(chunk)
        return Milter.CONTINUE

    def _unforge(self) -> None:
        """Remove every header of ours a sender wrote: the tag (this is
        the only place that removes it at intake: requeued mail, which
        never meets milters, keeps the tag we gave it) and the hold header
        of earlier versions (the intake header_checks remove that first)."""
        for name, count in self.forged.items():
            for index in range(count, 0, -1):
                self.chgheader(name, index, "")

    def _untagged(self) -> int:
        """Let the message through as it is, without headers of ours."""
        if self.forged:
            try:
                self._unforge()
            except Exception:
                log.exception("event=error stage=eom")
                return self._refuse(policy.LOCAL_PROBLEM)
        return Milter.ACCEPT

    def eom(self):
        klass = self.klass
        if not klass or self.untaken:
            return self._untagged()
        try:
            reply = policy.decide_eom(klass, self.size, self.shared.domains,
                                      lambda d: self.shared.totals(d, self.size))
            if reply is not None:
                log.info("event=refused domain=%s code=%s reason=quota", klass, reply.code)
                refused = self._refuse(reply)
                return self._untagged() if refused == Milter.CONTINUE else refused
            queue_id = self.getsymval("i")
            if not queue_id:
                log.error("event=error stage=eom reason='no {i} macro'")
                return self._refuse(policy.LOCAL_PROBLEM)
            size = self.size + len(policy.HEADER) + len(klass) + 4
            self.shared.ledger.record(queue_id, klass, size, route=self.route,
                                      counted=("milter_decisions", "held"))
            self._unforge()
            self.addheader(policy.HEADER, klass)
            self.quarantine(f"on-demand: held for {klass}")
        except Exception:
            log.exception("event=error stage=eom domain=%s", klass)
            return self._refuse(policy.LOCAL_PROBLEM)
        log.info("event=held queue_id=%s domain=%s size=%d", queue_id, klass, size)
        return Milter.ACCEPT

    def abort(self):
        self._reset()
        return Milter.CONTINUE

    def close(self):
        return Milter.CONTINUE


def _upkeep(ledger, stop: threading.Event, counts: Counts) -> None:
    """Every few seconds: hand the refusals counted meanwhile to the ledger,
    and notice a ledger file removed or replaced under us (the keeper
    rebuilds its rows from the queue; we record into the new file)."""
    while not stop.wait(COUNTS_INTERVAL):
        try:
            ledger.check_file()
            counts.flush_to(ledger)
        except Exception:
            log.exception("event=error stage=upkeep")


def _postfix_gid() -> int:
    try:
        return grp.getgrnam("postfix").gr_gid
    except KeyError:
        return -1


def _prepare_unix_socket(path: str) -> None:
    """Only root and the postfix group may reach the socket: its directory
    is root:postfix 0750 (no setgid bit: systemd's RestrictSUIDSGID forbids
    it), and the socket itself gets group postfix as soon as it exists."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    gid = _postfix_gid()
    os.chown(directory, 0 if os.geteuid() == 0 else -1, gid)
    os.chmod(directory, 0o750)
    if os.path.exists(path):
        os.unlink(path)


def _when_open(path: str | None, user) -> None:
    """runmilter opens the socket, then serves: in between, give a unix
    socket to Postfix (group postfix, 0660), then give up root for good
    (``user``: the account to become, or None)."""
    original = Milter.milter.opensocket

    def opensocket(rmsock):
        result = original(rmsock)
        if path is not None:
            os.chown(path, -1, _postfix_gid())
            os.chmod(path, 0o660)
        if user is not None:
            privsep.drop_privileges(user, "milter", groups=True)
            log.info("event=privileges user=%s uid=%d", user.pw_name, os.getuid())
        return result

    Milter.milter.opensocket = opensocket


def run(config: Config, ondemand: OnDemand | None = None) -> None:
    """Serve until SIGTERM/SIGINT (libmilter handles the signals)."""
    od = ondemand or OnDemand(config)
    od.layout  # read the queue layout now: fail early if Postfix is not there
    shared = OnDemandMilter.shared = Shared(config, od)
    listen = config.milter_listen
    user = None
    if config.milter_user and os.geteuid() == 0:
        # the milter reads every message: it does that as its own user, in
        # the state directory's group (to write the ledger) and postfix's
        user = privsep.account(config.milter_user, "milter")
        od.ledger.share(user.pw_gid)
    if listen.kind == "unix":
        _prepare_unix_socket(listen.path)
        os.umask(0o007)
    _when_open(listen.path if listen.kind == "unix" else None, user)
    Milter.factory = OnDemandMilter
    Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.QUARANTINE)
    stop = threading.Event()
    upkeep = threading.Thread(target=_upkeep, args=(od.ledger, stop, shared.counts),
                              name="upkeep", daemon=True)
    upkeep.start()
    log.info("event=start listen=%s domains=%d", listen.milter_spec, len(config.domains))
    try:
        Milter.runmilter("flushctl", listen.pymilter_spec, 240)
    finally:
        stop.set()
        try:
            shared.counts.flush_to(od.ledger)
        except Exception:
            log.exception("event=error stage=counts")
        log.info("event=stop")
