"""Which notices a domain is due, as plain functions over its figures and the
times its notices went out (no I/O).

- ``held``: mail is being held after the domain was empty, at most once per
  interval;
- ``digest``: every ``digest_every`` while mail is held, after a ``held``;
- ``quota``: the held mail is at 90 % of a quota or more, at most once per
  interval;
- ``refused``: the customer's server refused mail (5xx) since the last one,
  at most once per interval (a sender cannot make a storm of them);
- ``stale``: the oldest held message is older than ``stale_after``, once
  until the domain is seen empty again.

``sent`` maps each kind to when it last went out, and ``empty`` to when the
domain was last seen holding nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("held", "digest", "quota", "refused", "stale")
QUOTA_SHARE = 0.9
CLOCK_SLACK = 60.0   # seconds a recorded time may lie ahead of the clock


@dataclass(frozen=True)
class Figures:
    """What the domain holds now (from its status)."""
    messages: int
    bytes: int
    oldest: float | None
    refused: int
    refused_last: float | None      # when the newest refusal happened
    quota_messages: int | None = None
    quota_bytes: int | None = None

    def quota_share(self) -> float:
        shares = [0.0]
        if self.quota_messages:
            shares.append(self.messages / self.quota_messages)
        if self.quota_bytes:
            shares.append(self.bytes / self.quota_bytes)
        return max(shares)


@dataclass(frozen=True)
class Timing:
    interval: float
    stale_after: float
    digest_every: float


def due(f: Figures, sent: dict[str, float], now: float, t: Timing) -> list[str]:
    """The kinds of notice the domain is due now, in ``KINDS`` order."""
    if f.messages <= 0:
        return []
    # a time recorded while the clock was ahead counts as never (one notice
    # again, then its time is right), not as a future that silences all
    sent = {k: v for k, v in sent.items() if v <= now + CLOCK_SLACK}
    out = []
    held = sent.get("held")
    empty = sent.get("empty")
    if held is None or (empty is not None and empty > held and now - held >= t.interval):
        out.append("held")
    elif now - max(held, sent.get("digest", 0.0)) >= t.digest_every:
        out.append("digest")
    if f.quota_share() >= QUOTA_SHARE and now - sent.get("quota", float("-inf")) >= t.interval:
        out.append("quota")
    last_refused = sent.get("refused")
    if f.refused and f.refused_last is not None and (
            last_refused is None
            or f.refused_last > last_refused and now - last_refused >= t.interval):
        out.append("refused")
    stale = sent.get("stale")
    if f.oldest is not None and now - f.oldest >= t.stale_after \
            and (stale is None or (empty is not None and empty > stale)):
        out.append("stale")
    return out
