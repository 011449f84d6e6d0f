"""The notices' words: plain, short, useful, with the portal's link (no I/O)."""

from __future__ import annotations

import re
import time
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from flushctl.notify.rules import Figures


def _age(seconds: float) -> str:
    for unit, secs in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if seconds >= secs:
            n = int(seconds // secs)
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return "moments"


def _size(n: int) -> str:
    return f"{n} bytes" if n < 1024 else f"{n / 1024:.0f} KB" if n < 1024 ** 2 \
        else f"{n / 1024 ** 2:.1f} MB"


def plain_sender(sender: str) -> bool:
    """A sender shown in a notice: the null one or a plain address (no
    words, links or control characters a stranger could put there)."""
    return sender == "" or (len(sender) <= 100 and re.fullmatch(
        r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+", sender) is not None)


def subject(kind: str, domain: str, f: Figures, now: float, stale_after: float) -> str:
    if kind == "held":
        return f"Mail for {domain} is being held ({f.messages} message(s))"
    if kind == "digest":
        return f"Held mail for {domain}: {f.messages} message(s), " \
               f"oldest {_age(now - (f.oldest or now))}"
    if kind == "quota":
        return f"{domain}: held mail at {f.quota_share():.0%} of its quota"
    if kind == "refused":
        return f"{domain}: your server refused {f.refused} message(s)"
    return f"{domain}: mail held for more than {_age(stale_after)}"


def body(kind: str, domain: str, f: Figures, now: float, link: str | None,
         top_senders: list[tuple[str, int]], refused_reply: str | None,
         stale_after: float, host: str = "this host") -> str:
    lines = []
    if kind == "held":
        lines.append(f"Your mail server for {domain} does not take mail right now, so this "
                     "service holds the mail for it. Nothing is lost or returned.")
    elif kind == "digest":
        lines.append(f"Mail for {domain} is still held here.")
    elif kind == "quota":
        lines.append(f"The mail held for {domain} is close to its limit; beyond it, senders "
                     "are asked to try again later.")
    elif kind == "refused":
        lines.append(f"Your mail server for {domain} refused mail this service delivered. "
                     "It is kept here, not returned; it is tried again when you ask for "
                     "your mail.")
        if refused_reply:
            lines.append(f"Your server said: {refused_reply}")
    else:
        lines.append(f"Mail for {domain} has been held for more than {_age(stale_after)}.")
    lines.append("")
    lines.append(f"Held now: {f.messages} message(s), {_size(f.bytes)}"
                 + (f", the oldest {_age(now - f.oldest)} old" if f.oldest else "") + ".")
    if f.quota_messages or f.quota_bytes:
        lines.append(f"Quota used: {f.quota_share():.0%}.")
    if f.refused:
        lines.append(f"Refused by your server: {f.refused} message(s).")
    shown = [(s or "<>", n) for s, n in top_senders if plain_sender(s)]
    if shown:
        lines.append("Most of it from: " + ", ".join(f"{s} ({n})" for s, n in shown))
    lines.append("")
    lines.append("To get it: bring your server back online (it is delivered within minutes), "
                 f"or ask for it with ETRN {domain}, finger {domain}@{host}"
                 + (", or in the portal:" if link else "."))
    if link:
        lines.append(link)
    return "\n".join(lines) + "\n"


def build(kind: str, domain: str, to: tuple[str, ...], from_address: str, f: Figures,
          now: float, link: str | None, top_senders, refused_reply, stale_after,
          host: str = "this host") -> bytes:
    msg = EmailMessage()
    msg["From"] = from_address
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject(kind, domain, f, now, stale_after)
    msg["Date"] = formatdate(now, usegmt=True)
    msg["Message-ID"] = make_msgid("flushctl-notice", domain=host)
    msg["Auto-Submitted"] = "auto-generated"    # RFC 3834: no auto-replies to it
    msg["X-Flushctl-Notice"] = f"{kind}; domain={domain}"
    msg.set_content(body(kind, domain, f, now, link, top_senders, refused_reply, stale_after,
                         host))
    return bytes(msg)


def webhook_payload(kind: str, domain: str, f: Figures, now: float, link: str | None,
                    refused_reply: str | None) -> dict:
    return {"kind": kind, "domain": domain, "time": now,
            "time_text": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "messages": f.messages, "bytes": f.bytes, "oldest_arrival": f.oldest,
            "refused": f.refused, "refused_reply": refused_reply,
            "quota_share": round(f.quota_share(), 3), "portal": link}
