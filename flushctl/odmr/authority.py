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

from flushctl.logins.tokens import Tokens
from flushctl.privsep.errors import Malformed

log = logging.getLogger("flushctl.helper")

SESSION_RESULTS = ("delivered", "nothing_delivered", "lost", "timeout", "refused_greeting",
                   "stopped", "failed")


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
    mine = {d.name for d in config.domains_where("odmr") if user in d.users}
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
