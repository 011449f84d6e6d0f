"""The keeper: queue housekeeping, run by the release helper (and `flushctl sweep`).

Every few seconds it
- takes in mail for customers that the milter never saw (a local
  ``sendmail``, alias or bcc expansion, Postfix's own bounces and delay
  notices) and held mail of ours the ledger lacks: ``HeldMail.take_in``;
- puts mail that failed after a release back on hold, marked refused on a
  5xx, backing the domain off after tempfails: ``HeldMail.sweep_all``;
- checks every ledger row against its listing of the hold queue, for the
  all-domains views: ``HeldMail.verify_ledger``;
- returns refused mail to its senders once a domain's
  ``refused_return_after`` has passed;
- samples each domain's held count once an hour (the portal's chart) and
  sends the customers' notices that are due (``notify.notifier``).
None of this is intake: it does not depend on the milter, which only takes
mail in (as smtpd and cleanup do in Postfix).

How often: often enough that mail lying in the deferred queue is held
well before Postfix tries it again (minimal_backoff_time) or could
expire (the lifetimes): a quarter of the shortest, between 0.5 and 5 s.
"""

from __future__ import annotations

import logging
import threading
import time

from flushctl.heldmail.library import HeldMail

log = logging.getLogger("flushctl.keeper")

MIN_INTERVAL = 0.5
MAX_INTERVAL = 5.0
RETURN_EVERY = 60.0   # seconds between looks for refused mail due to go back, at most


def interval_for(minimal_backoff: float, lifetimes: list[float]) -> float:
    """Seconds between two passes (pure)."""
    return max(MIN_INTERVAL, min(MAX_INTERVAL, min([minimal_backoff, *lifetimes]) / 4))


class Keeper:
    def __init__(self, heldmail: HeldMail, notify: bool = True):
        from flushctl.notify.notifier import Notifier
        self.heldmail = heldmail
        self._returned_at = float("-inf")
        # `flushctl sweep` sends no notices: the helper's keeper does (two
        # looks at once would send the same notice twice)
        self.notifier = Notifier(heldmail) if notify else None

    def interval(self) -> float:
        od = self.heldmail
        return interval_for(od.seconds("minimal_backoff_time"),
                            [od.seconds("maximal_queue_lifetime"),
                             od.seconds("bounce_queue_lifetime")])

    def tick(self) -> dict:
        """One pass; what it did, for the log and `flushctl sweep`."""
        od = self.heldmail
        steps = [("rebuilt", od.rebuild_if_needed, {}), ("nudged", od.nudge_incoming, 0),
                 ("taken_in", od.take_in, {}), ("swept", od.sweep_all, {}),
                 ("verified", od.verify_ledger, 0),
                 ("returned", self.return_refused, {}), ("recounted", od.recount_asked, []),
                 ("sampled", lambda: od.ledger.sample_history(time.time()), False),
                 ("notified", self.notifier.tick if self.notifier else dict, {})]
        # each step on its own: one that fails (a message postcat cannot
        # show, a full disk) must not keep the others, re-holding above
        # all, from running
        done: dict = {"errors": []}
        for name, step, empty in steps:
            try:
                done[name] = step()
            except Exception as exc:
                log.exception("event=error stage=keeper step=%s", name)
                done["errors"].append(f"{name}: {exc}")
                done[name] = empty
        for domain, count in done["rebuilt"].items():
            log.info("event=rebuilt domain=%s messages=%d", domain, count)
        return done

    def return_refused(self) -> dict[str, int]:
        """Refused mail past its domain's ``refused_return_after`` goes back
        to its senders (Postfix's DSN quotes the customer server's reply)."""
        od = self.heldmail
        now = time.time()
        returned: dict[str, int] = {}
        afters = [d.refused_return_after for d in od.config.domains.values()
                  if d.refused_return_after is not None]
        if not afters:
            return returned
        # often enough to return it within a quarter of its domain's time, never
        # more often than each pass, at most once a minute otherwise
        every = max(1.0, min(RETURN_EVERY, min(afters) / 4))
        if time.monotonic() - self._returned_at < every:
            return returned
        self._returned_at = time.monotonic()
        for dom in od.config.domains.values():
            if dom.refused_return_after is None:
                continue
            if not od.ledger.refused_before(dom.name, now - dom.refused_return_after):
                continue
            count = od.return_to_senders(dom.name, refused_only=True,
                                         older_than=now - dom.refused_return_after)
            if count:
                returned[dom.name] = count
                log.info("event=returned domain=%s messages=%d reason=refused_return_after",
                         dom.name, count)
        return returned

    def run(self, stop: threading.Event) -> None:
        """Pass after pass until ``stop`` is set; a failing pass is logged
        and the next one tries again (Postfix's settings unreadable at the
        start: the shortest interval, until they can be read)."""
        try:
            interval = self.interval()
        except Exception:
            log.exception("event=error stage=keeper_interval")
            interval = MIN_INTERVAL
        log.info("event=start interval=%.1f", interval)
        while not stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("event=error stage=keeper")
            stop.wait(interval)


def start_thread(config):
    """The keeper, in a thread of its own, on its own HeldMail (its own
    ledger connection and caches); returns a function that stops it, and
    that HeldMail, whose ``current_check`` the process's scrape and its
    admins' requests read (``verify``)."""
    stop = threading.Event()
    heldmail = HeldMail(config)
    heldmail.check_source = heldmail.current_check
    thread = threading.Thread(target=Keeper(heldmail).run, args=(stop,),
                              name="keeper", daemon=True)
    thread.start()

    def end():
        stop.set()
        thread.join(10)
    return end, heldmail
