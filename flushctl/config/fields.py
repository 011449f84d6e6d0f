"""Field parsers of the config file: typed access to one table, and the shared value kinds.

The value kinds: host and port, listen addresses, user names, login names,
durations, relays.  Every error is a ``ConfigError`` naming the file and
the key.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from typing import Any

from flushctl import names
from flushctl.config.model import POLICY_LISTEN, ConfigError, HostPort, Listen, Relay


class _Section:
    """Typed access to one table of the file, every error naming its key."""

    def __init__(self, path: str, prefix: str, table: Any):
        self.path = path
        self.prefix = prefix
        if not isinstance(table, dict):
            self.fail("", "must be a table")
        self.table = table

    def fail(self, key: str, text: str):
        where = f"{self.prefix}.{key}" if key and self.prefix else (key or self.prefix)
        raise ConfigError(f"{self.path}: {where}: {text}")

    def check_keys(self, allowed: set[str]) -> None:
        for key in self.table:
            if key not in allowed:
                self.fail(key, "unknown key (allowed: " + ", ".join(sorted(allowed)) + ")")

    def get(self, key: str, kind, default=None, required: bool = False):
        if key not in self.table:
            if required:
                self.fail(key, "missing")
            return default
        value = self.table[key]
        if kind is bool and not isinstance(value, bool):
            self.fail(key, f"must be true or false, not {value!r}")
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            self.fail(key, f"must be an integer, not {value!r}")
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            self.fail(key, f"must be a number, not {value!r}")
        if kind is str and not isinstance(value, str):
            self.fail(key, f"must be a string, not {value!r}")
        if kind is list and not isinstance(value, list):
            self.fail(key, f"must be a list, not {value!r}")
        if kind is dict and not isinstance(value, dict):
            self.fail(key, f"must be a table, not {value!r}")
        return value

    def absolute_path(self, key: str, default: str, required: bool = False) -> str:
        value = self.get(key, str, default, required)
        if not value.startswith("/"):
            self.fail(key, f"must be an absolute path, not {value!r}")
        if any(c in value for c in "\n\0,= \t"):
            self.fail(key, f"must not contain spaces, commas or '=': {value!r}")
        return os.path.normpath(value)

    def positive(self, key: str, kind, default=None, required=False):
        value = self.get(key, kind, default, required)
        if value is not None and value <= 0:
            self.fail(key, f"must be greater than zero, not {value!r}")
        return value

    def not_negative(self, key: str, kind, default=None):
        value = self.get(key, kind, default)
        if value is not None and value < 0:
            self.fail(key, f"must not be negative, not {value!r}")
        return value


_LOGIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")


def login_name(value: str) -> str:
    """``value`` if it is a customer's login name (``[domains.X] users``,
    ``flushctl user``), else a ValueError saying what one looks like.
    Case counts: ``Cust1`` and ``cust1`` are two logins."""
    if not isinstance(value, str) or not _LOGIN_NAME.fullmatch(value):
        raise ValueError(f"not a login name: {value!r} (1 to 64 letters, digits and "
                         "._@+-, the first a letter or digit)")
    return value


# "[HOST]:PORT" or "[HOST]", "HOST:PORT" or "HOST", or an IPv6 address bare
_HOST_PORT = re.compile(r"\[(?P<inside>[A-Za-z0-9._:-]+)\](?::(?P<port1>\d{1,5}))?"
                        r"|(?P<plain>[A-Za-z0-9._-]+)(?::(?P<port2>\d{1,5}))?"
                        r"|(?P<bare6>[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*)")


def split_host_port(section: _Section, key: str, text: str, shape: str,
                    default_port: int | None = None) -> tuple[str, int, bool]:
    """The one parser of a host and a port in this config: ``[HOST]:PORT``,
    ``HOST:PORT``, and with a ``default_port`` also ``[HOST]``, ``HOST`` and
    a bare IPv6 address (with a port, IPv6 goes in brackets).  (host, port,
    bracketed); what the host may be is the caller's rule.  ``shape`` says
    in the error what was expected."""
    match = _HOST_PORT.fullmatch(text.strip())
    if not match:
        section.fail(key, f"must be {shape}, not {text!r}")
    if match.group("bare6") is not None:
        host, digits, bracketed = match.group("bare6"), None, False
        if default_port is None or not _is_ip(host):
            section.fail(key, f"must be {shape}, not {text!r}")
    elif match.group("inside") is not None:
        host, digits, bracketed = match.group("inside"), match.group("port1"), True
    else:
        host, digits, bracketed = match.group("plain"), match.group("port2"), False
    if digits is None and default_port is None:
        section.fail(key, f"must be {shape}, not {text!r}")
    port = default_port if digits is None else int(digits)
    if not 0 < port < 65536:
        section.fail(key, f"port out of range: {port}")
    return host, port, bracketed


def _is_ip(text: str) -> bool:
    """An IP address as ``ipaddress`` takes it; ``inet_pton`` answers the
    same (a tenth of the time, for a config of 100,000 relays) but for
    IPv6 scope ids, which only ``ipaddress`` reads."""
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)
        return True
    except (OSError, ValueError):
        if "%" not in text:
            return False
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _host_port(section: _Section, key: str, default: str) -> HostPort:
    """A listening address: an IP address (or localhost) and a port."""
    value = section.get(key, str, default)
    host, port, _ = split_host_port(section, key, value, "HOST:PORT")
    if not _is_ip(host) and host != "localhost":
        section.fail(key, f"host must be an IP address, not {host!r}")
    return HostPort(host, port)


def _host_ports(section: _Section, key: str, default: tuple[HostPort, ...],
                default_port: int | None) -> tuple[HostPort, ...]:
    """Listening addresses: a list of ``HOST:PORT`` (or one), each host an IP
    address (or localhost); with a ``default_port`` a bare host gets it."""
    if key not in section.table:
        return default
    value = section.table[key]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        section.fail(key, f'must be a list like ["0.0.0.0:366"], not {value!r}')
    shape = '"HOST:PORT" or "[IPv6]:PORT"' + (" (or a bare HOST)" if default_port else "")
    found: list[HostPort] = []
    for item in items:
        if not isinstance(item, str):
            section.fail(key, f"entries must be strings, not {item!r}")
        host, port, _ = split_host_port(section, key, item, shape, default_port)
        if not _is_ip(host) and host != "localhost":
            section.fail(key, f"host must be an IP address, not {host!r}")
        if HostPort(host, port) in found:
            section.fail(key, f"{item} is listed twice")
        found.append(HostPort(host, port))
    return tuple(found)


def _user(section: "_Section", default: str, why_not_root: str) -> str:
    user = section.get("user", str, default)
    if user and not re.fullmatch(r"[a-z_][a-z0-9_.-]{0,31}", user):
        section.fail("user", f"not a user name: {user!r}")
    if user == "root":
        section.fail("user", why_not_root)
    return user


def _listen(section: _Section, key: str, default: str) -> Listen:
    value = section.get(key, str, default)
    if value.startswith("unix:"):
        path = value[5:]
        if not path.startswith("/") or any(c in path for c in " \t\n\0,"):
            section.fail(key, f"unix socket must be an absolute path without spaces: {value!r}")
        return Listen("unix", path=os.path.normpath(path))
    if value.startswith("inet:"):
        hp = _host_port(_Section(section.path, section.prefix, {key: value[5:]}), key, "")
        return Listen("inet", host=hp.host, port=hp.port)
    section.fail(key, f'must be "unix:/PATH" or "inet:HOST:PORT", not {value!r}')


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _duration(section: _Section, key: str) -> float | None:
    """Seconds, or a number with a unit (s, m, h, d, w) as Postfix writes times."""
    if key not in section.table:
        return None
    value = section.table[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?[smhdw]?", value.strip()):
        text = value.strip()
        unit = text[-1] if text[-1] in _UNITS else "s"
        seconds = float(text.rstrip("smhdw")) * _UNITS[unit]
    else:
        section.fail(key, f'must be seconds or a time like "5d", not {value!r}')
    if seconds <= 0:
        section.fail(key, f"must be greater than zero, not {value!r}")
    return seconds


def _policy_listen(section: _Section) -> Listen:
    """``unix:/PATH`` (the default: a socket in Postfix's private/ directory,
    which only Postfix reaches), or ``HOST:PORT`` / ``inet:HOST:PORT`` on
    loopback (any local user can reach that one: see the README)."""
    value = section.get("policy_listen", str, POLICY_LISTEN)
    if value.startswith("unix:"):
        return _listen(section, "policy_listen", POLICY_LISTEN)
    text = value[5:] if value.startswith("inet:") else value
    hp = _host_port(_Section(section.path, section.prefix, {"policy_listen": text}),
                    "policy_listen", "")
    return Listen("inet", host=hp.host, port=hp.port)


def _relay(section: _Section, key: str) -> Relay | None:
    value = section.get(key, str)
    if value is None:
        return None
    host, port, bracketed = split_host_port(section, key, value,
                                            '"[host]:port" or "host:port"', 25)
    is_ip = _is_ip(host)
    if not is_ip:
        try:
            host = names.domain(host)
        except ValueError as exc:
            section.fail(key, str(exc))
    if is_ip and not bracketed:
        section.fail(key, f"an IP address must be written in brackets: [{host}]:{port}")
    return Relay(host=host, port=port, mx_lookup=not bracketed)


def _networks(sec: _Section, key: str) -> list:
    """A list of IP networks (host bits allowed: "192.0.2.7/24")."""
    networks = []
    for item in sec.get(key, list, []):
        try:
            networks.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            sec.fail(key, f"not an IP network: {item!r}")
    return networks


def relay_text(text: str) -> Relay:
    """A next hop as ``relay`` takes it, written by someone other than the
    admin (the portal); ValueError says what is wrong with it."""
    try:
        relay = _relay(_Section("", "", {"relay": text}), "relay")
    except ConfigError as exc:
        raise ValueError(str(exc).removeprefix(": relay: ")) from None
    assert relay is not None
    return relay


def _users(sec: _Section, key: str = "users") -> tuple[str, ...]:
    users: list[str] = []
    for item in sec.get(key, list, []):
        try:
            name = login_name(item)
        except ValueError as exc:
            sec.fail(key, str(exc))
        if name not in users:
            users.append(name)
    return tuple(users)
