"""What the milter decides, as plain functions over data (no sockets).

One message carries mail for one customer domain only, or for none: the
hold queue holds whole messages, so a recipient of a second customer
domain, or a non-customer recipient beside a customer one, is asked to
come back in its own transaction (452 4.5.3; every SMTP client retries
such recipients).  Unknown recipients of a domain with a recipient list
get 550 5.1.1 at RCPT time (no backscatter); a domain at its quota gets
452 4.2.2, never a bounce.
"""

from __future__ import annotations

from dataclasses import dataclass

from flushctl import names
from flushctl.config import Domain
from flushctl.mta.routing import route_of
from flushctl.heldmail.holdtag import TAG_HEADER

HEADER = TAG_HEADER
OTHER = ""  # transaction class of mail for no customer domain


@dataclass(frozen=True)
class Reply:
    code: str
    dsn: str
    text: str

    @property
    def temporary(self) -> bool:
        return self.code.startswith("4")


SECOND_DOMAIN = Reply("452", "4.5.3", "one customer domain per message: "
                      "send this recipient again in its own transaction")
SECOND_ROUTE = Reply("452", "4.5.3", "one destination host per message: "
                     "send this recipient again in its own transaction")
UNKNOWN_RECIPIENT = Reply("550", "5.1.1", "recipient address unknown here")
QUOTA = Reply("452", "4.2.2", "the domain's held mail is at its quota: try again later")
LOCAL_PROBLEM = Reply("451", "4.3.0", "temporary local problem: try again later")

_RESULTS = {SECOND_DOMAIN: "second_domain", SECOND_ROUTE: "second_route", UNKNOWN_RECIPIENT: "unknown_recipient",
            QUOTA: "quota", LOCAL_PROBLEM: "tempfail"}


def result_name(reply: Reply) -> str:
    """The label a refusal is counted under (flushctl_milter_decisions_total)."""
    return _RESULTS.get(reply, "refused")


def recipient_class(rcpt: str, domains: dict[str, Domain]) -> tuple[str, str | None, str | None]:
    """(class, local part, recipient domain): class is a customer domain or OTHER."""
    parts = names.split_recipient(rcpt)
    if parts is None:
        return OTHER, None, None
    local, dom = parts
    if len(local) >= 2 and local[0] == local[-1] == '"':   # "alice" is alice
        local = local[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    customer = names.customer_of(dom, domains)
    return (customer, local, dom) if customer else (OTHER, None, None)


def has_quota(dom: Domain) -> bool:
    """Does the domain have a quota at all? (Without one, no totals are read.)"""
    return dom.quota_messages is not None or dom.quota_bytes is not None


def over_quota(dom: Domain, messages: int, held_bytes: int, size: int = 0) -> bool:
    """Would one more message of ``size`` bytes go past the domain's quota?"""
    if dom.quota_messages is not None and messages + 1 > dom.quota_messages:
        return True
    if dom.quota_bytes is not None and held_bytes + max(size, 1) > dom.quota_bytes:
        return True
    return False


def decide_rcpt(rcpt: str, current: str | None, domains: dict[str, Domain],
                totals) -> tuple[Reply | None, str | None]:
    """Decide one RCPT TO.

    ``current``: the transaction's class so far (None before the first
    accepted recipient).  ``totals(domain)`` gives (messages, bytes) held
    for a domain.  Returns (refusal or None, the class afterwards).
    """
    klass, local, rcpt_domain = recipient_class(rcpt, domains)
    if current is not None and klass != current:
        return SECOND_DOMAIN, current
    if klass == OTHER:
        return None, klass
    dom = domains[klass]
    # A subdomain's recipients are never on the parent's list.
    if dom.recipients is not None and (rcpt_domain != dom.name
                                       or not dom.accepts_local_part(local)):
        return UNKNOWN_RECIPIENT, current
    if has_quota(dom) and over_quota(dom, *totals(klass)):
        return QUOTA, current
    return None, klass


def decide_eom(klass: str | None, size: int, domains: dict[str, Domain],
               totals) -> Reply | None:
    """Last check before the message is held: does it still fit the quota?"""
    if not klass:
        return None
    dom = domains[klass]
    if has_quota(dom) and over_quota(dom, *totals(klass), size=size):
        return QUOTA
    return None


def decide_route(rcpt: str, klass: str, current: str | None,
                 domains: dict[str, Domain]) -> tuple[Reply | None, str | None]:
    """One destination per message: a customer's hosts with routes of
    their own (``hosts``, or routed by their own DNS) are released apart,
    and the hold queue holds whole messages.  Returns (refusal or None,
    the transaction's route afterwards)."""
    _, rcpt_domain = names.split_recipient(rcpt)
    route = route_of(domains[klass], rcpt_domain)
    if current is not None and route != current:
        return SECOND_ROUTE, current
    return None, route
