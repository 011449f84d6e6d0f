"""A release's outcome: the one value every front end maps to its own words.

``HeldMail.flush`` returns what happened to a trigger (released, nothing
held, unreachable, nowhere to deliver, paused, backing off; a front end
adds busy and failed); the finger reply and the ETRN policy reply
(``gateway.replies``), the CLI's words and exit code (``cli.held``) and
the poller's action (``poller.loop``) each map ``Outcome.kind`` in
exactly one place.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

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

    def as_shared(self) -> "Outcome":
        return replace(self, shared=True)

    def as_json(self) -> dict:
        data = asdict(self)
        data["before"] = self.before.as_json() if self.before is not None else None
        return data

    @classmethod
    def from_json(cls, data: dict) -> "Outcome":
        before = data.get("before")
        return cls(**{**data, "before": Status(**before) if before is not None else None,
                      "unreachable": tuple(tuple(u) for u in data.get("unreachable", ()))})
