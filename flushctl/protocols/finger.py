"""RFC 1288 finger queries, as plain functions (no sockets).

A query line is ``[/W] [name] [@host...]``.  For us the name is a
customer domain; an empty query gets one service line (never a list of
customers); a query with ``@`` asks us to forward, which RFC 1288 lets a
server refuse, and we do.  ``?domain`` asks what is held without
releasing it: one report line (``report_line``), the form the cluster's
peers read each other with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from flushctl import names

MAX_LINE = 512  # bytes, CRLF included; RFC 1288 queries are short

EMPTY = "empty"
DOMAIN = "domain"
FORWARD = "forward"
INVALID = "invalid"
REPORT = "report"

REPORT_PREFIX = "?"


@dataclass(frozen=True)
class Query:
    kind: str
    domain: str = ""
    verbose: bool = False


def parse(line: bytes) -> Query:
    """Parse one query line (without or with its CRLF)."""
    if len(line) > MAX_LINE:
        return Query(INVALID)
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return Query(INVALID)
    text = text.rstrip("\r\n")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        return Query(INVALID)
    words = text.split()
    verbose = False
    if words and words[0].upper() == "/W":
        verbose = True
        words = words[1:]
    if not words:
        return Query(EMPTY, verbose=verbose)
    if len(words) > 1:
        return Query(INVALID)
    word = words[0]
    if "@" in word:
        return Query(FORWARD)
    kind = DOMAIN
    if word.startswith(REPORT_PREFIX):
        kind, word = REPORT, word[len(REPORT_PREFIX):]
    try:
        return Query(kind, names.wire_domain(word), verbose)
    except ValueError:
        return Query(INVALID)


def age_text(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {seconds % 60}s" if minutes else f"{seconds}s"


SERVICE_LINE = "SMTP-on-demand: finger your-domain@this-host to receive your held mail."
FORWARD_LINE = "Finger forwarding service denied."
INVALID_LINE = "Invalid query: send your domain name."
NOT_SERVED = "{domain}: not served here."
BUSY_LINE = "Too many requests: try again later."


_REPORT = re.compile(r"(\S+): held=(\d+) bytes=(\d+) oldest=(\d+|-) reachable=(yes|no|-)")


def report_line(domain: str, messages: int, size: int, oldest: float | None,
                reachable: bool | None) -> str:
    """What ``?domain`` answers: stable key=value fields, for people and peers."""
    seen = "-" if reachable is None else ("yes" if reachable else "no")
    when = "-" if oldest is None else str(int(oldest))
    return f"{domain}: held={messages} bytes={size} oldest={when} reachable={seen}"


def parse_report(line: str) -> dict | None:
    """``report_line`` read back; None if the line is not a report."""
    match = _REPORT.fullmatch(line.strip())
    if not match:
        return None
    domain, messages, size, oldest, seen = match.groups()
    return {"domain": domain, "messages": int(messages), "bytes": int(size),
            "oldest_arrival": None if oldest == "-" else float(oldest),
            "reachable": None if seen == "-" else seen == "yes"}


def lines_to_bytes(lines: list[str]) -> bytes:
    return "".join(line + "\r\n" for line in lines).encode("utf-8", "replace")
