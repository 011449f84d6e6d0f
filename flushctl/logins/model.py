"""The logins as typed, frozen objects: one ``Login`` per user, the read-only
``Logins`` of a store, and the one error of this package.

Only ``flushctl.logins.store`` builds them from the file; their secrets
never appear in a ``repr``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterator, Mapping


class LoginsError(Exception):
    """A problem with the logins store or what was asked of it, phrased for the admin."""


@dataclass(frozen=True)
class Login:
    name: str
    scrypt: str = field(repr=False)   # "scrypt$N$r$p$SALT$HASH": checks PLAIN and LOGIN
    cram: str = field(repr=False)     # the password, base64: the key of CRAM-MD5
    changed: int = 0                  # when the password was set (Unix time)


@dataclass(frozen=True)
class Logins:
    """Every login of the store, by name (an empty store: no one may log in)."""

    users: Mapping[str, Login] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "users", MappingProxyType(dict(self.users)))

    def get(self, name: str) -> Login | None:
        return self.users.get(name) if isinstance(name, str) else None

    def __contains__(self, name: object) -> bool:
        return name in self.users

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.users))

    def __len__(self) -> int:
        return len(self.users)
