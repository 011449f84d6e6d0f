"""A release's outcome: the one value every front end maps to its own words.

``HeldMail.flush`` returns what happened to a trigger (released, nothing
held, unreachable, nowhere to deliver, paused, backing off; a front end
adds busy and failed); the finger reply and the ETRN policy reply
(``gateway.replies``), the CLI's words and exit code (``cli.held``) and
the poller's action (``poller.loop``) each map ``Outcome.kind`` in
exactly one place.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from flushctl.heldmail.status import Status

RELEASED = "released"
NOTHING = "nothing held"
UNREACHABLE = "unreachable"
NOWHERE = "nowhere"     # this host is the best MX, or Postfix cannot route the domain
PAUSED = "paused"
BACKING_OFF = "backing off"   # the poller waits: the last release tempfailed
BUSY = "delivering"     # the poller's: an earlier release is still at work
FAILED = "failed"       # an error here: nothing was decided
REPORTED = "reported"   # a report query: nothing released

MAX_ROUTES = 20   # destinations listed in an outcome sent to another process
MAX_TEXT = 200    # characters of each one's reason


@dataclass(frozen=True)
class Outcome:
    kind: str
    released: int = 0       # messages released
    target: str = ""        # where they went (the first destination that answered)
    detail: str = ""        # why not, in words
    before: Status | None = None   # what was held when the release began (the gateway's)
    shared: bool = False    # answered from a release another trigger started
    forwarded: int = 0      # cluster peers this trigger is sent on to
    on_the_way: int = 0     # nothing to release, but so many an earlier release sends
    unreachable: tuple[tuple[str, str], ...] = ()   # (destination, why) that did not answer
    since: float | None = None   # shared: when the release that answers began,
    by: str | None = None        # and its trigger
    unreachable_more: int = 0    # destinations left out of ``unreachable`` on the wire

    def as_shared(self) -> "Outcome":
        return replace(self, shared=True)

    def as_json(self) -> dict:
        """The outcome as one message between processes: bounded, whatever the
        number of a domain's destinations (the wire's lines are at most 64 KiB)."""
        data = asdict(self)
        data["detail"] = self.detail[:MAX_TEXT * 10]
        data["unreachable"] = [[route, text[:MAX_TEXT]]
                               for route, text in self.unreachable[:MAX_ROUTES]]
        data["unreachable_more"] = self.unreachable_more + \
            max(0, len(self.unreachable) - MAX_ROUTES)
        if self.before is not None:
            before = self.before.as_json()
            before["hosts"] = dict(sorted(before["hosts"].items())[:MAX_ROUTES])
            data["before"] = before
        return data

    @classmethod
    def from_json(cls, data: dict) -> "Outcome":
        """The outcome ``as_json`` made; ValueError for anything else."""
        try:
            known = {f.name for f in fields(cls)}
            before = data.get("before")
            return cls(**{**{k: v for k, v in data.items() if k in known},
                          "before": Status(**before) if before is not None else None,
                          "unreachable": tuple((str(r), str(w))
                                               for r, w in data.get("unreachable", ()))})
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a release outcome: {exc}") from None
