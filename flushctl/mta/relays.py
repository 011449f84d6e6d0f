"""The relays customers chose in the portal, and the domains as they route now.

A domain with ``relay_editable = true`` may have its next hop changed by
its customer (the portal's "where your mail goes"; ``relay_change``
makes the change).  The choices are kept in ``relays.json`` beside the
maps that ``flushctl apply`` writes: root's file, readable by all like the
transport map that says the same.  Every process that routes or probes a
customer's mail (the milter, the poller, the release helper, apply) takes
its domains from here (``Overrides.domains``): the configured domain, with
the customer's relay in place of ``relay`` where there is one.  Only
``relay_editable`` domains take one: a domain the admin made uneditable
again goes back to its configured relay at the next apply.

The file: ``{"domains": {NAME: {"relay": NEXTHOP or null, "by": LOGIN,
"at": SECONDS}}}``; a null relay means "the configured one" (kept so that
the last change and who made it stay known).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import replace

from flushctl.config import Config, Domain, relay_text

log = logging.getLogger("flushctl.relays")

FILE = "relays.json"
MAX_FILE = 8 * 1024 * 1024   # bytes: far more than a million domains' choices
CHECK_EVERY = 1.0            # seconds a process trusts its last look at the file


class RelaysError(Exception):
    """The file cannot be read or says something that is not a relay."""


def path_of(config: Config) -> str:
    from flushctl.mta.settings import map_dir
    return os.path.join(map_dir(config), FILE)


def parse(text: str) -> dict[str, dict]:
    """The file's entries, each checked; ValueError says what is wrong."""
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("domains"), dict):
        raise ValueError('not {"domains": {...}}')
    entries = {}
    for name, entry in data["domains"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("at"), (int, float)) \
                or not isinstance(entry.get("by"), str):
            raise ValueError(f"{name!r:.80}: not an entry")
        if entry.get("relay") is not None:
            if not isinstance(entry["relay"], str):
                raise ValueError(f"{name!r:.80}: not a relay")
            relay_text(entry["relay"])
        entries[name] = {"relay": entry.get("relay"), "by": entry["by"],
                         "at": float(entry["at"])}
    return entries


def render(entries: dict[str, dict]) -> str:
    return json.dumps({"domains": {n: entries[n] for n in sorted(entries)}}, indent=1) + "\n"


def read(config: Config) -> dict[str, dict]:
    """The entries now (none without a file); ``RelaysError`` for a file
    that cannot be read or is not ours."""
    path = path_of(config)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_FILE + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise RelaysError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE:
        raise RelaysError(f"{path}: larger than {MAX_FILE} bytes")
    try:
        return parse(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RelaysError(f"{path}: not a relays file: {exc}") from None


def effective(domains: dict[str, Domain], entries: dict[str, dict]) -> dict[str, Domain]:
    """``domains`` with each editable one's chosen relay (pure)."""
    out = dict(domains)
    for name, entry in entries.items():
        dom = domains.get(name)
        if dom is not None and dom.relay_editable and entry.get("relay") is not None:
            out[name] = replace(dom, relay=relay_text(entry["relay"]))
    return out


# -- one process's view, the file looked at no more than once a second --------
_lock = threading.Lock()
_files: dict[str, tuple[float, tuple | None, dict]] = {}   # path -> (looked, stamp, entries)


def _stamp(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns)


def forget(config: Config) -> None:
    """The next look reads the file again (this process just changed it)."""
    with _lock:
        looked = _files.get(path_of(config))
        if looked is not None:   # kept: a file that turns out broken changes nothing
            _files[path_of(config)] = (float("-inf"), ("forgotten",), looked[2])


def _entries(config: Config) -> tuple[tuple | None, dict]:
    path = path_of(config)
    now = time.monotonic()
    with _lock:
        looked = _files.get(path)
        if looked is not None and now - looked[0] < CHECK_EVERY:
            return looked[1], looked[2]
        try:
            stamp = _stamp(path)
        except OSError as exc:   # unreadable directory: what we knew stands
            log.warning("event=error stage=relays path=%s reason=%r", path, str(exc))
            stamp = looked[1] if looked else None
        if looked is not None and stamp == looked[1]:
            _files[path] = (now, stamp, looked[2])
            return stamp, looked[2]
        try:
            entries = read(config) if stamp is not None else {}
        except RelaysError as exc:
            log.warning("event=error stage=relays reason=%r", str(exc))
            entries = looked[2] if looked else {}
        _files[path] = (now, stamp, entries)
        return stamp, entries


class Overrides:
    """The config's domains as they route now.  Costs nothing where no
    domain is editable."""

    def __init__(self, config: Config):
        self.config = config
        self.editable = any(d.relay_editable for d in config.domains.values())
        self._seen: tuple | None = None
        self._domains = config.domains

    def domains(self) -> dict[str, Domain]:
        if not self.editable:
            return self.config.domains
        stamp, entries = _entries(self.config)
        if stamp != self._seen:
            self._domains = effective(self.config.domains, entries)
            self._seen = stamp
        return self._domains

    def domain(self, dom: Domain) -> Domain:
        """``dom`` (a domain of the config) as it routes now."""
        return self.domains().get(dom.name, dom) if dom.relay_editable else dom

    def entry(self, name: str) -> dict | None:
        """Who chose the domain's relay, when, and what (None: no one ever did)."""
        return _entries(self.config)[1].get(name) if self.editable else None
