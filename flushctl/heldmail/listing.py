"""The list of a domain's held messages, a page at a time (the portal's list).

Exact against the queue: the page is cut from one snapshot of the
domain's entries (each one ``stat``ed, the gone ones pruned), newest
first, and only the page's messages are read (``postcat``).  Each shows
its arrival, sender, subject, size and the recipients of this domain
only: a message for two customers shows each of them only its own.
"""

from __future__ import annotations

import email.header
from dataclasses import dataclass

from flushctl import names
from flushctl.mta.queuefiles import parse_postcat

MAX_SUBJECT = 200


@dataclass(frozen=True)
class HeldMessage:
    queue_id: str
    arrival: float
    size: int
    queue: str
    sender: str
    subject: str
    recipients: tuple[str, ...]
    refused: str | None

    def as_json(self) -> dict:
        return {"queue_id": self.queue_id, "arrival": self.arrival, "size": self.size,
                "queue": self.queue, "sender": self.sender, "subject": self.subject,
                "recipients": list(self.recipients), "refused": self.refused}


def decode_subject(raw: str) -> str:
    """A Subject header as a person reads it (RFC 2047 words decoded),
    on one line, cut at ``MAX_SUBJECT`` characters."""
    try:
        text = str(email.header.make_header(email.header.decode_header(raw)))
    except (ValueError, LookupError, UnicodeError):
        text = raw
    text = " ".join(text.split())
    return text if len(text) <= MAX_SUBJECT else text[:MAX_SUBJECT - 1] + "…"


def own_recipients(recipients, domain: str, customers) -> tuple[str, ...]:
    """The recipients that belong to ``domain`` (its hosts too), once each."""
    out: list[str] = []
    for rcpt in recipients:
        split = names.split_recipient(rcpt)
        if split and names.customer_of(split[1], customers) == domain and rcpt not in out:
            out.append(rcpt)
    return tuple(out)


def page(heldmail, domain: str, number: int, size: int) -> dict:
    """Page ``number`` (from 1) of ``size`` of the domain's held messages:
    {"total", "page", "pages", "messages": [HeldMessage JSON]}."""
    snap = heldmail.snapshot(domain)
    present = sorted(snap.present, key=lambda i: (-i.arrival, i.queue_id))
    pages = max(1, -(-len(present) // size))
    number = min(max(1, number), pages)
    chosen = present[(number - 1) * size:number * size]
    read = {m.queue_id: m for m in parse_postcat(
        heldmail.postfix.read_messages([i.queue_id for i in chosen]))} if chosen else {}
    customers = heldmail.config.domains
    messages = []
    for item in chosen:
        m = read.get(item.queue_id)
        if m is None:   # delivered or deleted between the snapshot and the read
            continue
        subject = m.header("Subject")
        messages.append(HeldMessage(
            queue_id=item.queue_id, arrival=item.arrival, size=item.size, queue=item.queue,
            sender=m.sender, subject=decode_subject(subject[0]) if subject else "",
            recipients=own_recipients(m.recipients, domain, customers),
            refused=item.refused).as_json())
    return {"total": len(present), "page": number, "pages": pages, "messages": messages}
