"""Logins the release helper granted: tokens, one-time CRAM-MD5 challenges,
and failed logins counted per user.

The daemons that talk to customers (ODMR, the portal) never see the
credentials store: they hand a login's proof to the helper, which checks
it and answers with a token; every later request names the token, and the
helper looks again whether the login still exists with the same password.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections import deque

MAX_TOKENS = 1000          # logins alive at once (beyond: no new one until some end)
MAX_PER_USER = 20          # of one user (beyond: its own oldest ends)
MAX_FAILED_USERS = 100000  # users with recent failures remembered (beyond: all locked)
MAX_CHALLENGES = 1000      # CRAM-MD5 challenges handed out and not yet answered
CHALLENGE_LIFETIME = 300.0 # seconds a challenge may wait for its answer
FAILURE_MEMORY = 900.0     # seconds a failed login counts against its user


class Tokens:
    """Logins the helper granted: token -> (user, expiry); shared by one
    daemon's connections (it keeps a few)."""

    def __init__(self, lifetime: float, max_failures: int = 3):
        self.lifetime = lifetime
        self.max_failures = max_failures
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[str, str, float]] = {}
        self._challenges: dict[str, float] = {}
        self._failures: dict[str, deque] = {}
        self._host = socket.getfqdn()

    def challenge(self) -> str:
        """A CRAM-MD5 challenge (RFC 2195's form), good for one answer."""
        now = time.monotonic()
        with self._lock:
            for c, until in list(self._challenges.items()):
                if until < now:
                    del self._challenges[c]
            if len(self._challenges) >= MAX_CHALLENGES:
                del self._challenges[next(iter(self._challenges))]
            text = f"<{secrets.randbelow(10**18)}.{int(time.time())}@{self._host}>"
            self._challenges[text] = now + CHALLENGE_LIFETIME
            return text

    def take_challenge(self, text: str) -> bool:
        """Was ``text`` handed out, and not used yet?  It is used now."""
        with self._lock:
            until = self._challenges.pop(text, None)
        return until is not None and until >= time.monotonic()

    def locked_out(self, user: str) -> bool:
        with self._lock:
            if len(self._failures) >= MAX_FAILED_USERS and user not in self._failures:
                return True   # a flood of names: nobody new is let in until it ends
            q = self._failures.get(user)
            now = time.monotonic()
            while q and q[0] < now - FAILURE_MEMORY:
                q.popleft()
            if q is not None and not q:
                del self._failures[user]
            return bool(q) and len(q) >= self.max_failures

    def failed(self, user: str) -> None:
        """Count a failure; records still in memory are never dropped for room."""
        now = time.monotonic()
        with self._lock:
            if len(self._failures) >= MAX_FAILED_USERS:
                for name, q in list(self._failures.items()):
                    if not q or q[-1] < now - FAILURE_MEMORY:
                        del self._failures[name]
            if len(self._failures) < MAX_FAILED_USERS or user in self._failures:
                self._failures.setdefault(user, deque()).append(now)

    def grant(self, user: str, password_hash: str) -> str | None:
        """A token for ``user`` while its password is the one of ``password_hash``
        (salted anew by every change); None when ``MAX_TOKENS`` are alive.
        A user's logins beyond ``MAX_PER_USER`` end its own oldest, never
        another user's."""
        now = time.monotonic()
        with self._lock:
            for t, (_, _, until) in list(self._tokens.items()):
                if until < now:
                    del self._tokens[t]
            own = [t for t, entry in self._tokens.items() if entry[0] == user]
            if len(own) >= MAX_PER_USER:
                del self._tokens[min(own, key=lambda t: self._tokens[t][2])]
            elif len(self._tokens) >= MAX_TOKENS:
                return None
            token = secrets.token_hex(16)
            self._tokens[token] = (user, password_hash, now + self.lifetime)
            return token

    def user(self, token, logins) -> str:
        """The login of a live token, as long as the store still has it with
        the same password (`flushctl user del` or `passwd` ends it)."""
        with self._lock:
            entry = self._tokens.get(token) if isinstance(token, str) else None
        if entry is None or entry[2] < time.monotonic():
            raise PermissionError("no such login (or it expired)")
        login = logins.get(entry[0])
        if login is None or login.scrypt != entry[1]:
            self.drop(token)
            raise PermissionError("the login was removed or its password changed")
        return entry[0]

    def drop(self, token) -> None:
        with self._lock:
            self._tokens.pop(token, None)
