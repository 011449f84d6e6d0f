"""Postfix's policy delegation protocol (SMTPD_POLICY_README), pure.

A request is ``name=value`` lines ended by an empty line; the answer is
``action=...`` and an empty line.  Only ``protocol_state=ETRN`` concerns
us; anything else is answered DUNNO.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_REQUEST = 32 * 1024  # bytes; a real request is well under 2 KB
MAX_ATTRIBUTES = 200
_NAME = re.compile(r"(?=[A-Za-z0-9_]*[A-Za-z0-9])[A-Za-z0-9_]{1,64}")


class ProtocolError(ValueError):
    """The peer does not speak the protocol; the connection is closed."""


@dataclass(frozen=True)
class Request:
    attrs: dict[str, str]

    @property
    def state(self) -> str:
        return self.attrs.get("protocol_state", "").upper()

    @property
    def client_address(self) -> str:
        return self.attrs.get("client_address", "")

    @property
    def etrn_domain(self) -> str:
        return self.attrs.get("etrn_domain", "")

    @property
    def sasl_username(self) -> str:
        """The client's SMTP AUTH login ("" without one), as smtpd saw it."""
        return self.attrs.get("sasl_username", "")

    @property
    def helo_name(self) -> str:
        return self.attrs.get("helo_name", "")


def parse(block: bytes) -> Request:
    """Parse one request (the lines before the empty line)."""
    if len(block) > MAX_REQUEST:
        raise ProtocolError("request too long")
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("request is not UTF-8") from None
    attrs: dict[str, str] = {}
    for line in text.split("\n"):
        line = line.rstrip("\r")
        if not line:
            continue
        name, sep, value = line.partition("=")
        if not sep or not _NAME.fullmatch(name):
            raise ProtocolError(f"not an attribute line: {line[:60]!r}")
        if len(attrs) >= MAX_ATTRIBUTES:
            raise ProtocolError("too many attributes")
        attrs[name] = value
    if "request" in attrs and attrs["request"] != "smtpd_access_policy":
        raise ProtocolError(f"unknown request type: {attrs['request'][:40]!r}")
    return Request(attrs)


def answer(action: str) -> bytes:
    """Encode an action; newlines in it would break the protocol."""
    clean = " ".join(action.split())
    return f"action={clean}\n\n".encode("utf-8", "replace")


DUNNO = "DUNNO"
