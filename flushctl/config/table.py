"""The compiled config's domains, each built the first time it is asked for.

A provider's 100,000 domains are nearly all a name and a relay, kept in
the compiled copy as two columns (``compiled``).  A command that needs one
domain (`flushctl status DOMAIN`) or only their names (`flushctl status`)
should not build 100,000 Domain objects first: that was a quarter of a
second of every command at that size, and their freeing at its end.

``DomainTable`` is the read-only mapping of name to Domain that
``Config.domains`` is when the config came from its compiled copy.  It
checks the columns whole when it is made (anything unexpected: the copy
is not used, as before), and builds a domain when it is first asked for;
the same object every time after, whichever thread asks.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from itertools import compress, repeat

from flushctl.bulk import collector_paused
from flushctl.config.domains import _DEFAULTS, plain_domain
from flushctl.config.model import Domain, Relay

# the fields a domain of the columns may have other than by default
_COLUMNS = frozenset({"name", "relay", "hosts"})


class DomainTable(Mapping):
    """name -> Domain, from ``names`` and ``relays`` (per name: (host,
    port, mx_lookup), None for no relay, or False: the domain is in
    ``whole``, built already)."""

    __slots__ = ("_index", "_relays", "_whole", "_built", "_relay_objects", "_every")

    def __init__(self, names: tuple, relays: tuple, whole: dict[str, Domain]):
        _check(names, relays, whole)
        self._index = dict(zip(names, range(len(names))))
        if len(self._index) != len(names):
            raise ValueError("domains: a name twice")
        self._relays = relays
        self._whole = whole
        self._built: dict[str, Domain] = dict(whole)
        self._relay_objects: dict[tuple, Relay] = {}   # frozen: one per relay, shared
        self._every: dict[str, Domain] | None = None   # all of them, once asked for

    def __getitem__(self, name: str) -> Domain:
        dom = self._built.get(name)
        if dom is None:
            made = self._make(name, self._relays[self._index[name]])
            dom = self._built.setdefault(name, made)   # another thread's, if it was first
        return dom

    def __contains__(self, name) -> bool:
        return name in self._index

    def __iter__(self):
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __repr__(self) -> str:
        return f"<DomainTable of {len(self)} domains>"

    # A pass over every domain (the poller's cycle, the keeper's pass, a
    # scrape) builds them all once, then goes over a dict as fast as before.
    def keys(self):
        return self._index.keys()

    def values(self):
        return self.every().values()

    def items(self):
        return self.every().items()

    def every(self) -> dict[str, Domain]:
        """All the domains, in the table's order, as a dict (built once;
        the same objects as ``table[name]`` gives)."""
        every = self._every
        if every is None:
            with collector_paused():   # 100,000 objects that live on
                every = self._build_all()
            self._every = every
        return every

    def _build_all(self) -> dict[str, Domain]:
        """``_make`` for every domain not built yet, and ``plain_domain``
        inline: a call of each per domain cost 0.1 s more of a load and
        a full pass (0.49 s against 0.39 s at 100,000 domains)."""
        built, relay_objects, every = self._built, self._relay_objects, {}
        new, domain_cls, defaults = object.__new__, Domain, _DEFAULTS
        for name, relay in zip(self._index, self._relays):
            dom = built.get(name)
            if dom is None:
                dom = new(domain_cls)
                attrs = dom.__dict__
                attrs.update(defaults)
                attrs["name"] = name
                attrs["hosts"] = {}
                if relay is not None:
                    attrs["relay"] = relay_objects.get(relay) or self._relay(relay)
                dom = built.setdefault(name, dom)
            every[name] = dom
        return every

    def where(self, field: str) -> list[Domain]:
        """The domains whose ``field`` is set (true), in the table's order,
        without building the rest: a domain of the columns has every field
        but its name and relay at its default."""
        if field not in _DEFAULTS:
            raise AttributeError(f"a domain has no field {field!r}")
        if field in _COLUMNS or _DEFAULTS[field]:
            return [dom for dom in self.values() if getattr(dom, field)]
        index = self._index
        return [self._whole[name] for name in sorted(self._whole, key=index.__getitem__)
                if getattr(self._whole[name], field)]

    def _make(self, name: str, relay) -> Domain:
        if relay is not None:
            relay = self._relay_objects.get(relay) or self._relay(relay)
        return plain_domain(name, relay)

    def _relay(self, relay: tuple) -> Relay:
        """The one Relay of ``relay`` (host, port, mx_lookup): frozen, shared."""
        made = object.__new__(Relay)
        host, port, mx_lookup = relay
        made.__dict__.update(host=host, port=port, mx_lookup=mx_lookup)
        return self._relay_objects.setdefault(relay, made)


def _check(names, relays, whole) -> None:
    """The columns as ``compiled`` writes them, checked whole (at C speed
    where it can: a check per domain in Python would cost what building
    them does)."""
    if type(names) is not tuple or type(relays) is not tuple or type(whole) is not dict \
            or len(names) != len(relays):
        raise ValueError("domains: not the columns")
    if set(map(type, names)) - {str}:
        raise ValueError("domains: a name that is not a string")
    if set(map(type, relays)) - {tuple, type(None), bool} or True in relays or () in relays:
        raise ValueError("domains: not a relay")
    # (h, 25, 1) equals (h, 25, True): each relay's parts are checked by type
    given = list(filter(None, relays))   # the tuples: None, False and () are not
    if given:
        if set(map(len, given)) != {3}:
            raise ValueError("domains: not a relay")
        hosts, ports, lookups = zip(*given)
        if set(map(type, hosts)) != {str} or set(map(type, ports)) != {int} \
                or set(map(type, lookups)) != {bool}:
            raise ValueError("domains: not a relay")
    in_whole = list(compress(names, map(operator.is_, relays, repeat(False))))
    if len(in_whole) != len(whole) or not whole.keys() >= set(in_whole):
        raise ValueError("domains: the whole tables are not the ones named")
    for name, dom in whole.items():
        if type(dom) is not Domain or dom.name != name:
            raise ValueError(f"domains: {name}: not that domain")
