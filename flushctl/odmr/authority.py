"""The release helper's side of the ODMR daemon: logins, and what a login may ask.

The ODMR daemon reads what strangers send and runs unprivileged; it
never sees the credentials store.  It hands each login's proof (the
CRAM-MD5 challenge and digest, or the PLAIN/LOGIN password) to the
helper, which checks it against the store and answers with a token.
Every later request names its token, and the helper decides again, from
its own config, which domains that login may have: a daemon taken over
cannot release another customer's mail, nor ask without a login.  The
CRAM-MD5 challenges are the helper's too, each good for one login: a
daemon cannot replay an exchange it saw.  Failed logins count per user
here as well, so a daemon cannot try passwords faster than its clients.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections import deque

from flushctl.privsep.errors import Malformed

log = logging.getLogger("flushctl.helper")

MAX_TOKENS = 1000          # logins alive at once
MAX_FAILED_USERS = 100000  # users with recent failures remembered (beyond: all locked)
MAX_CHALLENGES = 1000      # CRAM-MD5 challenges handed out and not yet answered
CHALLENGE_LIFETIME = 300.0 # seconds a challenge may wait for its answer
FAILURE_MEMORY = 900.0     # seconds a failed login counts against its user
SESSION_RESULTS = ("delivered", "nothing_delivered", "lost", "timeout", "refused_greeting",
                   "stopped", "failed")


class Tokens:
    """Logins the helper granted: token -> (user, expiry); shared by the
    ODMR daemon's connections (it keeps a few)."""

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

    def grant(self, user: str, password_hash: str) -> str:
        """A token for ``user`` while its password is the one of ``password_hash``
        (salted anew by every change)."""
        now = time.monotonic()
        with self._lock:
            for t, (_, _, until) in list(self._tokens.items()):
                if until < now:
                    del self._tokens[t]
            if len(self._tokens) >= MAX_TOKENS:
                oldest = min(self._tokens, key=lambda t: self._tokens[t][2])
                del self._tokens[oldest]
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


def _text(request: dict, key: str, limit: int = 1000) -> str:
    value = request.get(key)
    if not isinstance(value, str) or len(value) > limit:
        raise Malformed(f"not an ODMR request: {key}")
    return value


def answer(heldmail, tokens: Tokens, request: dict) -> dict:
    """One request of the ODMR daemon."""
    from flushctl.heldmail import rules
    from flushctl.logins import passwords, store
    config = heldmail.config
    op = request.get("op")
    if op == "challenge":
        return {"challenge": tokens.challenge()}
    if op == "login":
        mechanism, user = _text(request, "mechanism"), _text(request, "user", 200)
        client = _text(request, "client", 100)
        logins = store.load(config.logins_path)
        if tokens.locked_out(user):
            log.warning("event=auth_refused user=%r client=%s reason=locked_out", user[:64],
                        client)
            return {"token": None}
        if mechanism == "CRAM-MD5":
            challenge = _text(request, "challenge")
            ok = tokens.take_challenge(challenge) and passwords.verify_cram_md5(
                logins, user, challenge.encode(), _text(request, "response", 100))
        elif mechanism in ("PLAIN", "LOGIN"):
            ok = passwords.verify_plain(logins, user, _text(request, "password"))
        else:
            raise Malformed(f"no such mechanism: {mechanism!r:.40}")
        if not ok:
            tokens.failed(user)
            log.warning("event=auth_failed user=%r client=%s mechanism=%s", user[:64], client,
                        mechanism)
            return {"token": None}
        return {"token": tokens.grant(user, logins.get(user).scrypt)}
    user = tokens.user(request.get("token"), store.load(config.logins_path))
    mine = {d.name for d in config.domains.values() if d.odmr and user in d.users}
    if op == "held":
        domains = request.get("domains")
        if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
            raise Malformed("not an ODMR request: domains")
        if any(d not in mine for d in domains):
            raise PermissionError("not this login's domains")
        held = {}
        for d in domains:
            snap = heldmail.hold_back(d, heldmail.snapshot(d))
            held[d] = len(rules.releasable(snap, "odmr"))
        return {"held": held}
    if op == "end":
        tokens.drop(request.get("token"))
        result = _text(request, "result", 40)
        if result not in SESSION_RESULTS:
            raise Malformed(f"not an ODMR session's result: {result!r:.40}")
        delivered = request.get("delivered")
        if not isinstance(delivered, int) or isinstance(delivered, bool) or delivered < 0:
            raise Malformed("not an ODMR request: delivered")
        heldmail.ledger.add_counts([("odmr_sessions", (result,), 1)]
                                   + ([("odmr_delivered", (), delivered)] if delivered else []))
        return {}
    name = _text(request, "domain", 300)
    if name not in mine:
        raise PermissionError("not this login's domain")
    if op == "release":
        return heldmail.flush(name, trigger="odmr", client=user).as_json()
    if op == "wait":
        present, verdict = heldmail.wait_step(name)
        return {"present": present, "verdict": verdict}
    raise Malformed(f"not an ODMR request: {op!r:.40}")
