"""Sending the notices that are due: mail through the local Postfix, and the
webhook's deliveries queued for the poller to make.

Runs with the keeper (in the release helper, or the one-process poller):
every ``[notify] check_every`` it reads all domains' totals in one query,
looks closer only at domains that have someone to tell and hold mail,
and asks ``rules.due``.  Mail goes out through Postfix's sendmail, from
the null sender (as a DSN: nothing bounces back to us), so it is queued,
retried and logged like any mail; config validation keeps every notice
address out of every customer domain, so no notice is ever held.  A
notice is recorded after it went out (a crash between the two may send
it twice, never lose it).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections import Counter

from flushctl.mta.commands import PostfixError
from flushctl.notify import messages
from flushctl.notify.rules import Figures, Timing, due

log = logging.getLogger("flushctl.notify")

TOP_SENDERS = 3
SENDERS_READ = 200   # the newest held messages read for the top senders


def sign(secret: bytes, body: bytes) -> str:
    """The webhook's signature header value: HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class Notifier:
    def __init__(self, heldmail):
        self.heldmail = heldmail
        self._checked = float("-inf")
        self._mail_failed = False

    def _told(self):
        return [d for d in self.heldmail.config.domains.values() if d.notify or d.notify_webhook]

    def tick(self, now: float | None = None) -> dict[str, list[str]]:
        """One look, if it is time: {domain: kinds sent}."""
        settings = self.heldmail.config.notify
        told = self._told()
        if not told or time.monotonic() - self._checked < settings.check_every:
            return {}
        self._checked = time.monotonic()
        now = time.time() if now is None else now
        od = self.heldmail
        states = od.ledger.states()
        done: dict[str, list[str]] = {}
        self._mail_failed = False
        for dom in told:
            if self._mail_failed:   # Postfix is not taking mail: the next look tries again
                break
            state = states.get(dom.name)
            sent = od.ledger.notices(dom.name)
            if state is None or state.messages <= 0:
                if sent.get("empty") is None or sent["empty"] <= max(
                        sent.get("held", 0.0), sent.get("stale", 0.0)):
                    od.ledger.notice_sent(dom.name, "empty", now)
                continue
            try:
                kinds = self._domain(dom, sent, now)
            except Exception:
                log.exception("event=error stage=notify domain=%s", dom.name)
                continue
            if kinds:
                done[dom.name] = kinds
        return done

    def _domain(self, dom, sent: dict[str, float], now: float) -> list[str]:
        od = self.heldmail
        settings = od.config.notify
        snap = od.snapshot(dom.name)
        count, size, oldest = snap.figures()
        refused = snap.refused()
        newest_refusal = max(refused, key=lambda i: i.refused_since or 0, default=None)
        f = Figures(count, size, oldest, len(refused),
                    newest_refusal.refused_since if newest_refusal else None,
                    dom.quota_messages, dom.quota_bytes)
        timing = Timing(dom.notify_interval or settings.interval,
                        dom.notify_stale_after or settings.stale_after, settings.digest_every)
        kinds = due(f, sent, now, timing)
        if not kinds:
            return []
        portal = od.config.portal
        link = f"{portal.url}/domains/{dom.name}" if portal and portal.url else None
        reply = newest_refusal.refused if newest_refusal else None
        senders = self._top_senders(snap) if dom.notify and {"held", "digest"} & set(kinds) \
            else []
        out = []
        for kind in kinds:
            if self._mail_failed:
                break
            if dom.notify and not self._mail(dom, kind, f, now, link, senders, reply, timing):
                continue   # tried again at the next look
            if dom.notify_webhook:
                try:
                    self._queue_webhook(dom, kind, f, now, link, reply)
                except Exception as exc:   # the mail went: it is not sent again
                    log.error("event=notify_failed domain=%s kind=%s channel=webhook "
                              "reason=%r", dom.name, kind, str(exc))
                    od.ledger.add_counts([("notifications",
                                           (dom.name, kind, "webhook", "failed"), 1)])
            od.ledger.notice_sent(dom.name, kind, now,
                                  (kind, "mail", "sent") if dom.notify else None)
            log.info("event=notify domain=%s kind=%s to=%s webhook=%s", dom.name, kind,
                     ",".join(dom.notify) or "-", "yes" if dom.notify_webhook else "no")
            out.append(kind)
        return out

    def _mail(self, dom, kind, f, now, link, senders, reply, timing) -> bool:
        od = self.heldmail
        settings = od.config.notify
        host = od.params()["myhostname"]
        from_address = settings.from_address or f"postmaster@{host}"
        text = messages.build(kind, dom.name, dom.notify, from_address, f, now, link, senders,
                              reply, timing.stale_after, host).decode()
        try:
            od.postfix.send_mail(settings.sender, dom.notify, text)
        except PostfixError as exc:
            log.error("event=notify_failed domain=%s kind=%s reason=%r", dom.name, kind, str(exc))
            od.ledger.add_counts([("notifications", (dom.name, kind, "mail", "failed"), 1)])
            self._mail_failed = True
            return False
        return True

    def _queue_webhook(self, dom, kind, f, now, link, reply) -> None:
        od = self.heldmail
        settings = od.config.notify
        with open(settings.webhook_secret_file, "rb") as fh:
            secret = fh.read().strip()
        if not secret:
            raise ValueError(f"{settings.webhook_secret_file} is empty")
        body = json.dumps(messages.webhook_payload(kind, dom.name, f, now, link, reply),
                          sort_keys=True).encode()
        od.ledger.queue_webhook(dom.name, kind, dom.notify_webhook, body, sign(secret, body),
                                now, settings.webhook_retry_for)

    def _top_senders(self, snap) -> list[tuple[str, int]]:
        """The commonest senders of the newest held mail (none if it cannot
        be read: the notice goes without them)."""
        from flushctl.mta.queuefiles import parse_postcat
        newest = sorted(snap.present, key=lambda i: -i.arrival)[:SENDERS_READ]
        try:
            read = parse_postcat(self.heldmail.postfix.read_messages(
                [i.queue_id for i in newest]))
        except (PostfixError, ValueError) as exc:
            log.warning("event=notify_senders_unread reason=%r", str(exc))
            return []
        return Counter(m.sender for m in read).most_common(TOP_SENDERS)
