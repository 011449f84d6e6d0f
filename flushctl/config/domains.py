"""One [domains."NAME"] table of the config: a customer domain and what is set for it."""

from __future__ import annotations

from typing import Any

from flushctl import names
from flushctl.config.customers import _notify_addresses, _url
from flushctl.config.fields import _Section, _duration, _networks, _relay, _users
from flushctl.config.model import ConfigError, Domain


def _domain(path: str, name: str, table: Any) -> Domain:
    """A [domains."NAME"] table.  Most of a provider's 100,000 name a relay
    or nothing: those skip the look for a dozen keys they lack (a third
    of the config's load), to the same Domain (tests compare the two)."""
    if isinstance(table, dict) and table.keys() <= {"relay"}:
        key = _domain_name(path, name)
        return plain_domain(key, _relay(_Section(path, f'domains."{name}"', table), "relay"))
    return _full_domain(path, name, table)


def plain_domain(name: str, relay) -> Domain:
    """Domain(name=name, relay=relay), its fields set at once: a frozen
    dataclass's __init__ sets each by a call (a tenth of the load).  The
    parser's short path and the compiled copy's columns both make them."""
    made = object.__new__(Domain)
    made.__dict__.update(_DEFAULTS, name=name, relay=relay, hosts={})
    return made


# every field of a Domain as its defaults make it (hosts: a dict of its own each)
_DEFAULTS = dict(Domain(name="defaults.invalid").__dict__)


def _domain_name(path: str, name: str) -> str:
    try:
        key = names.domain(name)
    except ValueError as exc:
        raise ConfigError(f'{path}: domains."{name}": {exc}') from None
    if key != name:
        raise ConfigError(f'{path}: domains."{name}": write the domain as "{key}"')
    return key


def _full_domain(path: str, name: str, table: Any) -> Domain:
    key = _domain_name(path, name)
    sec = _Section(path, f'domains."{name}"', table)
    sec.check_keys({"relay", "recipients", "quota_messages", "quota_bytes", "flush_from",
                    "hosts", "refused_return_after", "users", "odmr", "notify",
                    "notify_interval", "notify_stale_after", "notify_webhook",
                    "relay_editable"})
    recipients = sec.get("recipients", list)
    rcpt_set = None
    if recipients is not None:
        rcpt_set = set()
        for item in recipients:
            if not isinstance(item, str):
                sec.fail("recipients", f"entries must be strings, not {item!r}")
            try:
                local, dom = names.address(item)
            except ValueError as exc:
                sec.fail("recipients", str(exc))
            if dom != key:
                sec.fail("recipients", f"{item!r} is not an address in {key}")
            rcpt_set.add(local.lower())
        if not rcpt_set:
            sec.fail("recipients", "an empty list would refuse all mail; leave the key out to accept any recipient")
    networks = _networks(sec, "flush_from")
    hosts = {}
    table_hosts = sec.get("hosts", dict, {})
    for host, spec in table_hosts.items():
        try:
            name = names.domain(host)
        except ValueError as exc:
            sec.fail("hosts", str(exc))
        if not name.endswith("." + key):
            sec.fail("hosts", f"{host!r} is not a host under {key}")
        if not isinstance(spec, str):
            sec.fail("hosts", f"{host}: the route must be a string like \"[192.0.2.7]:25\"")
        hosts[name] = _relay(_Section(path, f'domains."{key}".hosts', {host: spec}), host)
    return Domain(
        name=key,
        hosts=hosts,
        refused_return_after=_duration(sec, "refused_return_after"),
        relay=_relay(sec, "relay"),
        recipients=frozenset(rcpt_set) if rcpt_set is not None else None,
        quota_messages=sec.positive("quota_messages", int),
        quota_bytes=sec.positive("quota_bytes", int),
        flush_from=tuple(networks),
        users=_users(sec),
        odmr=sec.get("odmr", bool, False),
        notify=_notify_addresses(sec),
        notify_interval=_duration(sec, "notify_interval"),
        notify_stale_after=_duration(sec, "notify_stale_after"),
        notify_webhook=_url(sec, "notify_webhook"),
        relay_editable=sec.get("relay_editable", bool, False),
    )
