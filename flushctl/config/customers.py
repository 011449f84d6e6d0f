"""The sections that face customers: [portal], [notify] and a domain's notify keys."""

from __future__ import annotations

import ipaddress
import re

from flushctl import names
from flushctl.config.fields import (_Section, _duration, _host_port, _is_ip, _networks,
                                    _user, _users)
from flushctl.config.model import ConfigError, Domain, NotifySettings, PortalSettings


def _portal(path: str, data: dict) -> PortalSettings | None:
    if "portal" not in data:
        return None
    sec = _Section(path, "portal", data["portal"])
    sec.check_keys({"listen", "user", "admins", "url", "secure_cookie", "session_lifetime",
                    "login_failures", "page_size", "trusted_proxies", "relay_allow"})
    default = PortalSettings()
    url = _url(sec, "url") or ""
    proxies = []
    for item in sec.get("trusted_proxies", list, list(default.trusted_proxies)):
        if not isinstance(item, str) or not _is_ip(item):
            sec.fail("trusted_proxies", f"not an IP address: {item!r}")
        proxies.append(str(ipaddress.ip_address(item)))
    return PortalSettings(
        listen=_host_port(sec, "listen", f"{default.listen.host}:{default.listen.port}"),
        user=_user(sec, default.user, "the portal reads what browsers send: name an "
                   "unprivileged user"),
        admins=_users(sec, "admins"),
        url=url.rstrip("/"),
        secure_cookie=sec.get("secure_cookie", bool, default.secure_cookie),
        session_lifetime=_duration(sec, "session_lifetime") or default.session_lifetime,
        login_failures=sec.positive("login_failures", int, default.login_failures),
        page_size=min(sec.positive("page_size", int, default.page_size), 1000),
        trusted_proxies=tuple(proxies),
        relay_allow=tuple(_networks(sec, "relay_allow")),
    )

def _url(sec: _Section, key: str) -> str | None:
    url = sec.get(key, str)
    if url is not None and not re.fullmatch(r"https?://[A-Za-z0-9.:\[\]_-]+(/[!-~]*)?", url):
        sec.fail(key, f"not an http(s) address: {url!r}")
    return url


def _notify_addresses(sec: _Section) -> tuple[str, ...]:
    out: list[str] = []
    for item in sec.get("notify", list, []):
        if not isinstance(item, str):
            sec.fail("notify", f"entries must be addresses, not {item!r}")
        address = _plain_address(sec, "notify", item)
        if address not in out:
            out.append(address)
    return tuple(out)


def _plain_address(sec: _Section, key: str, value: str) -> str:
    """An address as it goes on a command line and in a header: a plain
    local part (no quotes, no spaces), a canonical domain."""
    try:
        local, dom = names.address(value)
    except ValueError as exc:
        sec.fail(key, str(exc))
    # no quotes, and none of the routing Postfix still honours inside a local
    # part (user%host, host!user: allow_percent_hack, swap_bangpath)
    if not re.fullmatch(r"[A-Za-z0-9#$&'*+/=?^_`{|}~.-]{1,64}", local) or local[0] in "-.":
        sec.fail(key, f"{value!r}: write the local part plainly (no quotes, no % or !)")
    return f"{local}@{dom}"


def _check_notify(path: str, domains: dict[str, Domain],
                  notify: NotifySettings | None = None) -> None:
    """No notice may go to held mail: it would wait for the very customer it
    tells (a loop when that customer's own notices are what it waits for);
    nor come from it (its bounces would be held)."""
    where = [(f'domains."{name}".notify', a) for name, d in domains.items() for a in d.notify]
    if notify is not None:
        where += [(f"notify: {key}", a) for key, a in (("sender", notify.sender),
                                                        ("from", notify.from_address)) if a]
    for key, address in where:
        held = names.customer_of(address.rpartition("@")[2], domains)
        if held is not None:
            raise ConfigError(
                f"{path}: {key}: {address} is mail for {held}, which is held while that "
                "customer is offline: name an address outside every customer domain")


def _notify(path: str, data: dict) -> NotifySettings:
    default = NotifySettings()
    if "notify" not in data:
        return default
    sec = _Section(path, "notify", data["notify"])
    sec.check_keys({"sender", "from", "interval", "stale_after", "digest_every", "check_every",
                    "webhook_secret_file", "webhook_timeout", "webhook_retry_for"})
    addresses = {}
    for key in ("sender", "from"):
        value = sec.get(key, str, "")
        addresses[key] = _plain_address(sec, key, value) if value else ""
    return NotifySettings(
        sender=addresses["sender"],
        from_address=addresses["from"],
        interval=_duration(sec, "interval") or default.interval,
        stale_after=_duration(sec, "stale_after") or default.stale_after,
        digest_every=_duration(sec, "digest_every") or default.digest_every,
        check_every=_duration(sec, "check_every") or default.check_every,
        webhook_secret_file=sec.absolute_path("webhook_secret_file", "")
        if "webhook_secret_file" in sec.table else None,
        webhook_timeout=_duration(sec, "webhook_timeout") or default.webhook_timeout,
        webhook_retry_for=_duration(sec, "webhook_retry_for") or default.webhook_retry_for,
    )
