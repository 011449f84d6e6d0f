"""What the gateway says: the finger reply lines and the ETRN policy replies,
worded in one place from a release's ``Outcome``.
"""

from __future__ import annotations

import time

from flushctl.heldmail.outcome import FAILED, NOTHING, NOWHERE, PAUSED, RELEASED, \
    UNREACHABLE, Outcome
from flushctl.protocols import finger


def finger_reply(domain: str, outcome: Outcome, verbose: bool) -> list[str]:
    """The plain lines a customer reads after fingering its domain."""
    st = outcome.before
    lines = []
    if st is None or st.messages == 0:
        lines.append(f"{domain}: no mail held.")
    else:
        age = finger.age_text(time.time() - st.oldest_arrival) if st.oldest_arrival else "-"
        lines.append(f"{domain}: {st.messages} message(s), {st.bytes} bytes held; "
                     f"oldest {age}.")
    if outcome.kind == RELEASED:
        where = f" ({outcome.target})" if outcome.target else ""
        lines.append(f"Delivery started to your mail server{where}.")
    elif outcome.kind == UNREACHABLE:
        lines.append("Delivery not started: your mail server does not answer; "
                     "your mail stays held.")
    elif outcome.kind == NOWHERE:
        lines.append("Delivery not started: there is nowhere to deliver it from here "
                     "(check your domain's MX records); your mail stays held.")
    elif outcome.kind == PAUSED:
        lines.append("Delivery not started: releases for this domain are paused here.")
    elif outcome.kind == FAILED:
        lines.append("Delivery not started: temporary problem here; try again later.")
    if verbose and st is not None and st.last_flush:
        when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(st.last_flush))
        lines.append(f"Previous release: {when} ({st.last_flush_trigger}).")
    return lines


def etrn_action(domain: str, outcome: Outcome) -> str:
    if outcome.kind in (RELEASED, NOTHING):
        return "OK"
    if outcome.kind == UNREACHABLE:
        return f"458 4.4.1 <{domain}>: unable to queue messages: your mail server does not answer"
    if outcome.kind == NOWHERE:
        return (f"458 4.4.4 <{domain}>: unable to queue messages: nowhere to deliver from "
                "here (check your MX records)")
    if outcome.kind == PAUSED:
        return f"458 4.7.1 <{domain}>: releases for this domain are paused here"
    return "451 4.3.0 temporary problem here; try again later"


# ETRN replies that come before any release
ETRN_INVALID = "501 5.5.4 invalid domain name"
ETRN_BUSY = "450 4.7.1 too many requests; try again later"


def etrn_not_served(domain: str, peer: bool) -> str:
    """A domain this host does not serve: a peer is told for good (5xx), so
    that it stops trying; anyone else as a 4xx that reveals nothing."""
    if peer:
        return f"554 5.7.1 <{domain}>: not a domain of this host"
    return f"459 4.7.1 <{domain}>: not served here"


def finger_report(domain: str, outcome: Outcome) -> list[str]:
    """A report query's answer: what is held, nothing released."""
    st = outcome.before
    if st is None:   # the status could not be read
        return ["Temporary problem here; try again later."]
    return [finger.report_line(domain, st.messages, st.bytes, st.oldest_arrival, st.reachable)]
