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
import signal
import sqlite3
import threading
import time

import Milter

from flushctl.privsep import accounts
from flushctl.config import Config
from flushctl.mta.relays import Overrides
from flushctl.metrics import Counts
from flushctl.heldmail.library import HeldMail
from flushctl.heldmail.holdtag import OUR_HEADERS

from flushctl_milter import rules

log = logging.getLogger("flushctl.milter")

QUOTA_RECHECK = 10.0  # seconds between exact recounts of a domain near its quota
COUNTS_INTERVAL = 5.0  # seconds between handing the refusals counted to the ledger


class Shared:
    """What every connection of one milter process shares."""

    def __init__(self, config: Config, heldmail: HeldMail):
        self.config = config
        self.overrides = Overrides(config)   # the relays customers chose
        self.heldmail = heldmail
        self.ledger = heldmail.ledger
        self.counts = Counts()   # refusals; "held" is counted with the ledger record
        self._recount_lock = threading.Lock()
        self._recounted: dict[str, float] = {}
        self.queue_unreadable = False

    @property
    def domains(self):
        """The configured domains as they route now (a customer's relay
        decides the route of its mail)."""
        return self.overrides.domains()

    def totals(self, domain: str, size: int = 0) -> tuple[int, int]:
        """Held (messages, bytes) for a domain, exact whenever it matters.

        The ledger's running totals can still include mail delivered since
        the last prune; when they say a message of ``size`` would not fit
        the quota, recount from the queue (at most every QUOTA_RECHECK
        seconds per domain).
        """
        state = self.ledger.state(domain)
        totals = (state.messages, state.bytes)
        if rules.over_quota(self.domains[domain], *totals, size=size):
            with self._recount_lock:
                due = time.monotonic() - self._recounted.get(domain, -1e9) > QUOTA_RECHECK
                if due:
                    self._recounted[domain] = time.monotonic()
            if due:
                if not self.queue_unreadable:
                    try:
                        self.heldmail.locate(domain)  # prunes what is gone
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


RCPT_MACROS = ("{client_addr}", "{client_name}", "{client_port}")   # who sent it


class OnDemandMilter(Milter.Base):
    shared: Shared  # set by run()

    def __init__(self):
        self.local = False
        self.client = None   # (name, port, address) from connect, when it is called
        self._reset()

    def _reset(self):
        self.klass: str | None = None
        self.route: str | None = None
        self.size = 0
        self.forged: dict[str, int] = {}   # headers of ours a sender wrote, by name
        self.untaken = False   # local mail we would have refused: left to the keeper

    def _refuse(self, reply: rules.Reply) -> int:
        if self.local and reply is not rules.LOCAL_PROBLEM:
            # no client to tell: the keeper takes the customer's part in later
            self.untaken = True
            log.info("event=left_to_keeper reason=%r", reply.text)
            return Milter.CONTINUE
        self.shared.counts.add("milter_decisions", rules.result_name(reply))
        self.setreply(reply.code, reply.dsn, reply.text)
        return Milter.TEMPFAIL if reply.temporary else Milter.REJECT

    # Postfix is asked for the fewest steps that do the job (a round trip
    # each costs every message): no connect, HELO, MAIL, DATA or
    # end-of-headers events; headers and body without replies; RCPT and
    # the end of the message with one.  What connect told comes as macros
    # with each RCPT; the message's state is reset at its end and on abort.
    def negotiate(self, opts):
        """pymilter's negotiation, but with our macro request: its own
        passes bytes where its C part takes text (pymilter 1.0.5), and a
        failed negotiation would take every step."""
        try:
            self._actions = opts[0]
            mask = self.protocol_mask()
            if self._actions & Milter.SETSYMLIST:
                self._ctx.setsymlist(Milter.M_ENVRCPT, " ".join(RCPT_MACROS))
            else:   # no macros to ask for: connect says who sent it
                mask |= Milter.P_NOCONNECT
            opts[1] = self._protocol = opts[1] & ~mask
            opts[2] = opts[3] = 0
        except Exception:
            log.exception("event=error stage=negotiate")
            return Milter.ALL_OPTS
        return Milter.CONTINUE

    @Milter.nocallback
    def connect(self, hostname, family, hostaddr):
        # called only where Postfix could not be asked to skip it (an
        # older MTA): what the macros would say
        self.client = (hostname, hostaddr[1] if isinstance(hostaddr, tuple)
                       and len(hostaddr) >= 2 else None,
                       hostaddr[0] if isinstance(hostaddr, tuple) and hostaddr else None)
        return Milter.CONTINUE

    @Milter.nocallback
    def hello(self, hostname):
        return Milter.CONTINUE

    @Milter.nocallback
    def envfrom(self, mailfrom, *params):
        return Milter.CONTINUE

    def _local(self) -> bool:
        """Mail that comes through pickup (sendmail) has no SMTP client:
        Postfix presents it as localhost, port 0.  Nothing can be refused to
        it (a refused recipient would leave the whole message in maildrop,
        retried for ever): it is tagged and held only when all of it is one
        customer's, else left to the keeper, which holds the customer's part.
        (An SMTP client whose port smtpd could not tell also shows port 0,
        but not as localhost at a loopback address.)"""
        name = self.getsymval("{client_name}")
        if name is not None:
            port, addr = self.getsymval("{client_port}"), self.getsymval("{client_addr}")
        elif self.client is not None:
            name, port, addr = self.client
            port = None if port is None else str(port)
        else:
            return False
        return name == "localhost" and port == "0" and addr in ("127.0.0.1", "::1")

    def envrcpt(self, rcpt, *params):
        self.local = self._local()
        try:
            reply, klass = rules.decide_rcpt(rcpt, self.klass, self.shared.domains,
                                              self.shared.totals)
            if reply is None and klass:
                reply, self.route = rules.decide_route(rcpt, klass, self.route,
                                                        self.shared.domains)
            if reply is None:
                self.klass = klass
        except Exception:
            log.exception("event=error stage=rcpt")
            return self._refuse(rules.LOCAL_PROBLEM)
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
                return self._refuse(rules.LOCAL_PROBLEM)
        return Milter.ACCEPT

    def eom(self):
        try:
            return self._eom()
        finally:
            self._reset()   # the next message of the connection starts afresh

    def _eom(self):
        klass = self.klass
        if not klass or self.untaken:
            return self._untagged()
        try:
            reply = rules.decide_eom(klass, self.size, self.shared.domains,
                                      lambda d: self.shared.totals(d, self.size))
            if reply is not None:
                log.info("event=refused domain=%s code=%s reason=quota", klass, reply.code)
                refused = self._refuse(reply)
                return self._untagged() if refused == Milter.CONTINUE else refused
            queue_id = self.getsymval("i")
            if not queue_id:
                log.error("event=error stage=eom reason='no {i} macro'")
                return self._refuse(rules.LOCAL_PROBLEM)
            size = self.size + len(rules.HEADER) + len(klass) + 4
            self.shared.ledger.record(queue_id, klass, size, route=self.route,
                                      counted=("milter_decisions", "held"))
            self._unforge()
            self.addheader(rules.HEADER, klass)
            self.quarantine(f"on-demand: held for {klass}")
        except Exception:
            log.exception("event=error stage=eom domain=%s", klass)
            return self._refuse(rules.LOCAL_PROBLEM)
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


def _check_socket_directory(path: str) -> None:
    """The milter's socket goes into a directory of its own that `flushctl
    apply` (root) made: owner the milter's user, group postfix, setgid, no
    access for others; so only Postfix reaches the socket.  Anything else
    is said now, with the fix."""
    directory = os.path.dirname(path)
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise MilterSetupError(f"milter: {directory}: {exc.strerror}; run `flushctl apply` "
                               "as root first (it makes the socket's directory)") from None
    if st.st_uid != os.geteuid() or st.st_gid != _postfix_gid() or st.st_mode & 0o7777 != 0o2750:
        raise MilterSetupError(
            f"milter: {directory} must be the milter's own (owner {accounts.current_user()}, "
            "group postfix, mode 2750): run `flushctl apply` as root")
    try:
        os.unlink(path)   # a socket left by an earlier milter
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise MilterSetupError(f"milter: cannot replace {path}: {exc.strerror}") from None


class MilterSetupError(Exception):
    """The milter cannot start as it is: said once, with what to do."""


def _when_open(path: str | None) -> None:
    """runmilter opens the socket, then serves: in between, give a unix
    socket to Postfix (0660; its directory's setgid bit made it postfix's)."""
    original = Milter.milter.opensocket

    def opensocket(rmsock):
        result = original(rmsock)
        if path is not None:
            os.chmod(path, 0o660)
        return result

    Milter.milter.opensocket = opensocket


def run(config: Config, heldmail: HeldMail | None = None) -> None:
    """Serve until SIGTERM/SIGINT (libmilter handles the signals).  The
    milter never reads a message as root: its unit starts it as [milter]
    user, and started as root it becomes that user before anything else."""
    # libmilter waits for these with sigwait in a thread of its own and stops
    # smfi_main; every thread started before it must block them too, or the
    # kernel hands SIGTERM to one that dies of it (no event=stop, no last counts)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    if config.milter_user and os.geteuid() == 0:
        accounts.drop_privileges(accounts.account(config.milter_user, "milter"), "milter",
                                 groups=True)
    log.info("event=privileges user=%s uid=%d", accounts.current_user(), os.geteuid())
    od = heldmail or HeldMail(config)
    od.layout  # read the queue layout now: fail early if Postfix is not there
    try:
        od.ledger   # opened now: a ledger it may not write is said at start
    except (OSError, sqlite3.Error) as exc:
        raise MilterSetupError(f"milter: cannot open the ledger in {config.state_directory} "
                               f"as {accounts.current_user()}: {exc}; run `flushctl apply` as "
                               "root (it lets the milter's group write it)") from None
    shared = OnDemandMilter.shared = Shared(config, od)
    listen = config.milter_listen
    if listen.kind == "unix":
        _check_socket_directory(listen.path)
        os.umask(0o007)
    _when_open(listen.path if listen.kind == "unix" else None)
    Milter.factory = OnDemandMilter
    Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.QUARANTINE | Milter.SETSYMLIST)
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
