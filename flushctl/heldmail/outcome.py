"""A release's outcome: the one value every front end maps to its own words.

The library decides what happened to a trigger (released, nothing held,
unreachable, nowhere to deliver, paused, backing off, failed); the
finger reply, the ETRN policy reply, the CLI's exit code and the poller's
log line each map ``Outcome.kind`` in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from flushctl.heldmail.status import Status

RELEASED = "released"
NOTHING = "nothing held"
UNREACHABLE = "unreachable"
NOWHERE = "nowhere"     # this host is the best MX, or Postfix cannot route the domain
PAUSED = "paused"
FAILED = "failed"
REPORTED = "reported"   # a report query: nothing released


@dataclass(frozen=True)
class Outcome:
    kind: str
    released: int
    target: str
    detail: str
    before: Status | None  # what was held when the release began
    shared: bool = False    # answered from a release another trigger started

    def as_shared(self) -> "Outcome":
        return replace(self, shared=True)

    def as_json(self) -> dict:
        return {"kind": self.kind, "released": self.released, "target": self.target,
                "detail": self.detail, "shared": self.shared,
                "before": self.before.as_json() if self.before is not None else None}

    @classmethod
    def from_json(cls, data: dict) -> "Outcome":
        before = data.get("before")
        return cls(data["kind"], data["released"], data["target"], data["detail"],
                   Status(**before) if before is not None else None, data["shared"])
