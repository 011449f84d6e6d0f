"""The config as parsed before: a compiled copy beside the file, as postmap's ``.db``.

Parsing and validating a provider's 100,000 domains takes most of a
second, at every start of every command.  ``parse`` is a pure function of
the file's text, so its result can be kept: ``FILE.compiled`` holds the
``Config`` of the text whose SHA-256 it names, made by the code whose
sources it names.  A different text or a different flushctl makes it
stale, and the file is parsed again.

Trust: the compiled copy is believed exactly as far as the file itself.
It is read only when it is a regular file (not a link) owned by the
file's owner and writable by nobody else, and written only by that owner,
with the file's group and read bits.  What it holds is decoded by a schema
of the config's own classes (no pickle: nothing in it can name code).
Anything unexpected in it is a miss, never an error: the file is parsed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import ipaddress
import marshal
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

from flushctl.bulk import collector_paused
from flushctl.config import model
from flushctl.config.domains import _DEFAULTS as _DOMAIN_DEFAULTS
from flushctl.config.table import DomainTable

SUFFIX = ".compiled"
_MAGIC = "flushctl-config-1"
_NET = "!net"   # an IP network, by its text
_DOMAINS = "!domains"   # Config.domains, by columns (below)
# every class a Config is made of, by name: nothing else can come out
_CLASSES = {cls.__name__: cls for cls in (
    model.Listen, model.HostPort, model.Relay, model.Domain, model.GatewaySettings,
    model.Submission, model.Peer, model.Cluster, model.OdmrSettings, model.NotifySettings,
    model.PortalSettings, model.Config)}
_SCALARS = (str, int, float, bool, type(None))


def path_of(config_path: str) -> str:
    return config_path + SUFFIX


@functools.cache
def code_key() -> str:
    """Which parser made it: the sources of this package and of the name
    rules, and what else judges the text (Python and its standard library:
    tomllib, ipaddress; rtoml)."""
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256("\0".join(_judges()).encode())
    for source in sorted(here.glob("*.py")) + [here.parent / "names.py"]:
        digest.update(b"\0" + source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()


def _judges() -> tuple[str, ...]:
    return (sys.version, str(marshal.version), importlib.metadata.version("rtoml"))


def read(config_path: str, config_stat: os.stat_result, digest: str) -> model.Config | None:
    """The compiled Config of the text with ``digest``, or None."""
    try:   # O_NONBLOCK: a FIFO in its place must not hang the load
        fd = os.open(path_of(config_path),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode)
                # written by the file's owner, and by root or by this user: a
                # root process never takes values that only parse() would
                # have judged from a copy someone else wrote
                and st.st_uid == config_stat.st_uid and st.st_uid in (0, os.geteuid())
                # readable as the file is now, by nobody more (a chmod or
                # chgrp of the file since makes the owner write it again)
                and st.st_gid == config_stat.st_gid
                and stat.S_IMODE(st.st_mode) == _mode(config_stat)):
            return None
        with os.fdopen(fd, "rb", closefd=False) as fh:
            blob = fh.read()
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        with collector_paused():   # a few hundred thousand objects, none of them garbage
            magic, key, kept_digest, payload = marshal.loads(blob)
            if (magic, key, kept_digest) != (_MAGIC, code_key(), digest):
                return None
            config = _decode(payload)
    except Exception:   # a truncated, foreign or older copy: parse the file instead
        return None
    if not isinstance(config, model.Config):
        return None
    config.__dict__["path"] = config_path
    return config


def write(config_path: str, config_stat: os.stat_result, config: model.Config) -> None:
    """Keep ``config`` beside the file, if this process is its owner and
    may write there; quietly nothing otherwise (a read-only /etc, a
    daemon's own user)."""
    if os.geteuid() != config_stat.st_uid:
        return
    try:
        blob = marshal.dumps((_MAGIC, code_key(), config.digest, _encode(config)))
    except (TypeError, ValueError, OSError, importlib.metadata.PackageNotFoundError):
        return   # a shape this schema does not know, or sources being replaced: no copy
    target = path_of(config_path)
    directory, name = os.path.split(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory or ".")
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchown(fh.fileno(), -1, config_stat.st_gid)
            os.fchmod(fh.fileno(), _mode(config_stat))
            fh.write(blob)
        os.replace(tmp, target)
    except BaseException as exc:   # an interrupt too: no temporary file left behind
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if not isinstance(exc, OSError):
            raise


def _mode(config_stat: os.stat_result) -> int:
    """The copy's mode: the file's read bits, written by the owner alone."""
    return stat.S_IMODE(config_stat.st_mode) & 0o444 | 0o200


def _encode(value: Any) -> Any:
    """Plain data marshal keeps: a dataclass as [class, {field: value}] with
    only the fields that differ from its defaults."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, tuple):
        return tuple(_encode(v) for v in value)
    if isinstance(value, frozenset):
        return frozenset(_encode(v) for v in value)
    if isinstance(value, dict):
        return {_key(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return [_NET, str(value)]
    cls = type(value)
    if _CLASSES.get(cls.__name__) is not cls:
        raise TypeError(f"not part of a Config: {cls.__name__}")
    _, defaults, factories, _ = _PLANS[cls.__name__]
    fields = {}
    for name, field_value in value.__dict__.items():
        if cls is model.Config and name == "domains":
            fields[name] = _encode_domains(field_value)
        elif name in factories:
            if field_value != factories[name]():
                fields[name] = _encode(field_value)
        elif not (name in defaults and _same(field_value, defaults[name])):
            fields[name] = _encode(field_value)
    return [cls.__name__, fields]


def _key(key: Any) -> str:
    if type(key) is not str:
        raise TypeError("a dict key that is not a string")
    return key


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _decode(value: Any) -> Any:
    kind = type(value)
    if kind is list:
        head, body = value
        if head == _NET:
            return ipaddress.ip_network(body)
        if head == _DOMAINS:
            return _decode_domains(*body)
        cls, defaults, factories, own = _PLANS[head]
        made = object.__new__(cls)
        attrs = made.__dict__
        attrs.update(defaults)
        for name, factory in factories.items():
            attrs[name] = factory()
        for name, field_value in body.items():
            attrs[name] = field_value if type(field_value) in _SCALAR_TYPES \
                else _decode(field_value)
        if not body.keys() <= own or len(attrs) != len(own):   # none foreign, none missing
            raise ValueError(f"{head}: not its fields")
        return made
    if kind is tuple:
        return tuple(v if type(v) in _SCALAR_TYPES else _decode(v) for v in value)
    if kind is dict:
        return {k: v if type(v) in _SCALAR_TYPES else _decode(v) for k, v in value.items()}
    if kind is frozenset or kind in _SCALAR_TYPES:
        return value
    raise ValueError(f"not a part of a Config: {kind.__name__}")


_SCALAR_TYPES = frozenset(_SCALARS)


# A provider's 100,000 domains are nearly all a name and a relay, or a name
# alone: those go as two columns (names; (host, port, mx_lookup), None, or
# False for "the whole domain is in the third part"), which marshal reads
# and Python frees in a fraction of the time a table per domain takes.
def _encode_domains(domains: dict) -> list:
    names, relays, whole = [], [], {}
    for name, dom in domains.items():
        names.append(_key(name))
        short = dom.__dict__.keys() == _DOMAIN_DEFAULTS.keys() and all(
            _same(dom.__dict__[k], v) for k, v in _DOMAIN_DEFAULTS.items()
            if k not in ("name", "relay"))
        if short and dom.name == name:
            relay = dom.relay
            relays.append(None if relay is None else (relay.host, relay.port, relay.mx_lookup))
        else:
            relays.append(False)
            whole[name] = _encode(dom)
    return [_DOMAINS, (tuple(names), tuple(relays), whole)]


def _decode_domains(names: tuple, relays: tuple, whole: dict) -> DomainTable:
    """The columns as a ``DomainTable``: checked whole now, each domain
    built when it is first asked for."""
    if type(whole) is not dict:
        raise ValueError("domains: not the columns")
    return DomainTable(names, relays, {name: _decode(table) for name, table in whole.items()})


def _plan(cls: type) -> tuple[type, dict, dict, frozenset]:
    """How ``cls`` is made again: the class, its field defaults, the
    factories of the fields made fresh each time, and its field names."""
    defaults, factories = {}, {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            factories[f.name] = f.default_factory
    return cls, defaults, factories, frozenset(f.name for f in dataclasses.fields(cls))


_PLANS = {name: _plan(cls) for name, cls in _CLASSES.items()}
