"""The release helper's side of the portal: logins, and what a login may see and do.

The portal reads what browsers send and runs unprivileged; it never sees
the credentials store nor the queue.  It hands a login's password to the
helper, which checks it (scrypt) and answers with a token; every later
request names the token, and the helper decides again, from its own
config, which domains that login may see: its own (``users`` of the
domain), or every one for ``[portal] admins``.  A domain the login may
not see and one that does not exist get the same answer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
import time

from flushctl.logins.tokens import Tokens
from flushctl.mta.relays import CHECK_EVERY
from flushctl.privsep.errors import Malformed

log = logging.getLogger("flushctl.helper")

ACTIONS = ("release", "pause", "resume", "return_refused", "relay")
NOT_YOURS = "no such domain"


def _text(request: dict, key: str, limit: int = 1000) -> str:
    value = request.get(key)
    if not isinstance(value, str) or len(value) > limit:
        raise Malformed(f"not a portal request: {key}")
    return value


# the status fields a customer sees (the OpenAPI description's Status)
STATUS_FIELDS = ("domain", "messages", "bytes", "oldest_arrival", "reachable", "last_probe",
                 "last_error", "last_flush", "last_flush_trigger", "last_flush_result",
                 "paused", "refused", "refused_reply")


def shown(status) -> dict:
    data = status.as_json()
    return {k: data[k] for k in STATUS_FIELDS}


def _client(request: dict) -> str:
    client = _text(request, "client", 100)
    if client != "unknown":
        try:
            ipaddress.ip_address(client)
        except ValueError:
            raise Malformed("not a portal request: client") from None
    return client


def visible(config, user: str) -> list[str]:
    """The domains ``user`` may see and steer, sorted."""
    if user in config.portal.admins:
        return sorted(config.domains)
    return sorted(d.name for d in config.domains_where("users") if user in d.users)


def quota(dom, status) -> dict:
    return {"messages": dom.quota_messages, "bytes": dom.quota_bytes,
            "messages_used": status.messages, "bytes_used": status.bytes}


def _with_now(history: list, status) -> list:
    """The hourly samples, the current hour showing at least what is held now."""
    if history:
        hour, value = history[-1]
        history[-1] = (hour, max(value or 0, status.messages))
    return history


def relay_view(heldmail, dom) -> dict:
    """Where the domain's mail goes, and whether its customer may change it."""
    configured = heldmail.config.domains[dom.name].relay
    entry = heldmail.overrides.entry(dom.name) if dom.relay_chosen else None
    return {"relay": dom.relay.nexthop if dom.relay else None,
            "relay_editable": dom.relay_editable,
            "relay_configured": configured.nexthop if configured else None,
            "relay_changed": entry["at"] if entry else None}


MAX_RELAY = 300               # characters of a next hop a customer may send
LOOKUP_LIMIT = 15.0           # seconds the lookups of a new relay may take, all together
ATTEMPTS = 20                 # tries per domain per ATTEMPT_WINDOW, refused ones too
ATTEMPT_WINDOW = 60.0
_changing = threading.Lock()  # one change at a time: its DNS lookups hold a helper channel
_attempts: dict[str, list[float]] = {}   # domain -> times of its recent tries


def _may_try(name: str, now: float) -> bool:
    """At most ATTEMPTS tries per domain a minute: refused tries count too
    (each looks names up, and a refusal says something of where they point)."""
    recent = [t for t in _attempts.get(name, []) if now - t < ATTEMPT_WINDOW]
    if len(recent) >= ATTEMPTS:
        _attempts[name] = recent
        return False
    _attempts[name] = recent + [now]
    if len(_attempts) > 10_000:   # forget the quiet ones
        for key in [k for k, v in _attempts.items() if not v or now - v[-1] >= ATTEMPT_WINDOW]:
            del _attempts[key]
    return True


def change_relay(heldmail, dom, text: str, user: str) -> dict:
    """Send the domain's mail to ``text`` (a next hop; "": the configured
    one), held mail included: {"relay", "warning"}, or {"refused": why}
    (with "forbidden" or "busy" when that is why)."""
    from flushctl.config import relay_text
    from flushctl.mta import relay_change
    if not dom.relay_editable:
        return {"refused": "where this domain's mail goes is set by your provider",
                "forbidden": True}
    if not _changing.acquire(blocking=False):
        return {"refused": "another change of where mail goes is under way; try again in a "
                           "moment", "busy": True}
    try:
        if not _may_try(dom.name, time.monotonic()):
            return {"refused": f"too many tries for {dom.name}; wait a minute", "busy": True}
        relay = None
        try:
            relay_change.check_rate(heldmail.config, dom.name, time.time())
            if text:
                relay = relay_text(text)
        except relay_change.RelayChangeError as exc:
            return {"refused": str(exc), "busy": exc.busy}
        except ValueError as exc:
            return {"refused": str(exc)}
        if relay is not None:
            try:
                why = asyncio.run(asyncio.wait_for(_target_refusal(heldmail, dom, relay),
                                                   LOOKUP_LIMIT))
            except asyncio.TimeoutError:
                why = f"{relay.host}: its lookups took too long"
            if why:
                return {"refused": why}
        try:
            routed, warning, changed = relay_change.change(heldmail.config, heldmail.postfix,
                                                           dom.name, relay)
        except relay_change.RelayChangeError as exc:
            return {"refused": str(exc), "busy": exc.busy}
        moved = 0
        if changed:
            time.sleep(CHECK_EVERY)   # every process (the milter) routes by the new file
            try:
                moved = heldmail.route_anew(dom.name)
                relay_change.settled(heldmail.config, dom.name)
            except Exception:   # made all the same: the helper's next start finishes it
                log.exception("event=error stage=relay_settle domain=%s", dom.name)
        log.info("event=relay domain=%s relay=%s user=%s via=portal changed=%s rerouted=%d",
                 dom.name, routed.relay.nexthop if routed.relay else "-", user,
                 "yes" if changed else "no", moved)
        return {"relay": routed.relay.nexthop if routed.relay else None, "warning": warning}
    finally:
        _changing.release()


async def _target_refusal(heldmail, dom, relay) -> str | None:
    """Why the customer may not point its mail at ``relay``, as this host
    resolves it now, with the poller's resolver and with Postfix's."""
    fence = heldmail.fence()
    for prober in (heldmail.prober, heldmail.postfix_prober()):
        if prober is None:
            continue
        found, _, problem = await prober.targets(relay, dom.name, strict=True)
        why = fence(relay, found, problem)
        if why:
            return why
    return None


def answer(heldmail, tokens: Tokens, request: dict) -> dict:
    """One request of the portal."""
    from flushctl.heldmail.listing import page
    from flushctl.logins import passwords, store
    config = heldmail.config
    op = request.get("op")
    if op == "login":
        user, client = _text(request, "user", 200), _client(request)
        password = _text(request, "password")
        # failures count per login and address: guesses from everywhere
        # cannot lock a customer (or the admin) out from where it logs in
        key = f"{user}\0{client}"
        if tokens.locked_out(key):
            log.warning("event=auth_refused user=%r client=%s reason=locked_out via=portal",
                        user[:64], client)
            return {"token": None, "locked": True}
        logins = store.load(config.logins_path)
        if not passwords.verify_plain(logins, user, password):
            tokens.failed(key)
            log.warning("event=auth_failed user=%r client=%s via=portal", user[:64], client)
            return {"token": None}
        token = tokens.grant(user, logins.get(user).scrypt)
        if token is None:
            log.warning("event=auth_refused user=%s client=%s reason=too_many_logins via=portal",
                        user, client)
            return {"token": None, "busy": True}
        log.info("event=login user=%s client=%s via=portal", user, client)
        return {"token": token, "user": user, "admin": user in config.portal.admins}
    user = tokens.user(request.get("token"), store.load(config.logins_path))
    if op == "logout":
        tokens.drop(request.get("token"))
        return {}
    mine = visible(config, user)
    if op == "whoami":
        return {"user": user, "admin": user in config.portal.admins, "domains": mine}
    if op == "overview":
        statuses = []
        for name in mine:
            status = heldmail.status(name)
            statuses.append({**shown(status), "quota": quota(config.domains[name], status)})
        return {"user": user, "admin": user in config.portal.admins, "domains": statuses}
    name = _text(request, "domain", 300)
    if name not in mine:
        raise PermissionError(NOT_YOURS)
    dom = heldmail.domain(name)   # as it routes now
    if op == "domain":
        number, size = request.get("page", 1), config.portal.page_size
        if not isinstance(number, int) or isinstance(number, bool):
            raise Malformed("not a portal request: page")
        status = heldmail.status(name)
        return {"status": shown(status), "quota": quota(dom, status),
                "odmr": dom.odmr, **relay_view(heldmail, dom),
                "held": page(heldmail, name, number, size),
                "history": _with_now(heldmail.ledger.history(name, time.time()), status)}
    if op == "release":
        outcome = heldmail.flush(name, trigger="portal", client=user)
        return {"outcome": outcome.as_json()}
    if op == "pause":
        heldmail.pause(name)
        log.info("event=pause domain=%s user=%s via=portal", name, user)
        return {}
    if op == "resume":
        heldmail.resume(name)
        log.info("event=resume domain=%s user=%s via=portal", name, user)
        return {}
    if op == "return_refused":
        count = heldmail.return_to_senders(name, refused_only=True)
        log.info("event=returned domain=%s messages=%d user=%s via=portal", name, count, user)
        return {"returned": count}
    if op == "relay":
        return change_relay(heldmail, dom, _text(request, "relay", MAX_RELAY).strip(), user)
    raise Malformed(f"not a portal request: {op!r:.40}")
