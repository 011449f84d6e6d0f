"""Prometheus metrics: each customer domain's held mail, and counters of
events that every one of our processes records in the ledger.

The poller serves them at ``[metrics] listen`` (default 127.0.0.1:9469;
``listen = ""`` turns the endpoint off).  Gauges are read at scrape time
from the same accounting as `flushctl status` (``OnDemand.status_all``:
the queue is looked at only for domains whose totals show mail).
Counters live in the ledger's ``counters`` table: the milter, the
gateway, the poller and the CLI add to them, so they outlive any one
process.  Events that happen in a transaction anyway (a message held, a
release, a probe) are counted in it; the others (refusals, gateway
requests) are counted in memory (``Counts``) and added every few seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("flushctl.metrics")

# ledger counter name -> (metric name without _total, help, label names)
COUNTERS = {
    "releases": ("flushctl_releases", "Releases of a domain's held mail, by trigger "
                 "(finger, etrn, poller, admin, peer).", ("domain", "trigger")),
    "probes": ("flushctl_probes", "Probes of a customer's mail server, by result.",
               ("domain", "result")),
    "milter_decisions": ("flushctl_milter_decisions", "The milter's decisions on messages "
                         "and recipients, by result.", ("result",)),
    "gateway_requests": ("flushctl_gateway_requests", "Finger and ETRN requests the gateway "
                         "answered, by protocol and result.", ("protocol", "result")),
    "forwards": ("flushctl_forwards", "Releases sent on to the cluster's peers as ETRN, "
                 "by peer and result.", ("peer", "result")),
}
FLUSH_INTERVAL = 2.0   # seconds between hand-overs of in-memory counts


class Counts:
    """Events counted in memory by one process, to be added to the ledger."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: Counter = Counter()

    def add(self, name: str, *labels: str, n: int = 1) -> None:
        with self._lock:
            self._items[(name, tuple(labels))] += n

    def drain(self) -> list[tuple[str, tuple, int]]:
        with self._lock:
            items, self._items = self._items, Counter()
        return [(name, labels, n) for (name, labels), n in items.items()]

    def restore(self, items) -> None:
        """Put back what could not be written; it goes with the next hand-over."""
        with self._lock:
            for name, labels, n in items:
                self._items[(name, tuple(labels))] += n

    def flush_to(self, ledger) -> None:
        items = self.drain()
        try:
            ledger.add_counts(items)
        except Exception:
            self.restore(items)
            raise


class Collector:
    """What a scrape reads: the held mail per domain, then the counters."""

    def __init__(self, ondemand):
        self.ondemand = ondemand

    def collect(self):
        now = time.time()
        od = self.ondemand
        held = GaugeMetricFamily("flushctl_held_messages",
                                 "Messages held for the domain (as flushctl status).",
                                 labels=["domain"])
        size = GaugeMetricFamily("flushctl_held_bytes", "Bytes held for the domain.",
                                 labels=["domain"])
        age = GaugeMetricFamily("flushctl_oldest_held_age_seconds",
                                "Age of the domain's oldest held message (0: none held).",
                                labels=["domain"])
        reachable = GaugeMetricFamily("flushctl_domain_reachable",
                                      "1 if the domain's mail server answered the last "
                                      "probe, 0 if not (absent until probed).",
                                      labels=["domain"])
        paused = GaugeMetricFamily("flushctl_domain_paused", "1 while releases are paused.",
                                   labels=["domain"])
        for st in od.status_all():
            held.add_metric([st.domain], st.messages)
            size.add_metric([st.domain], st.bytes)
            age.add_metric([st.domain], max(0.0, now - st.oldest_arrival)
                           if st.oldest_arrival else 0.0)
            if st.reachable is not None:
                reachable.add_metric([st.domain], 1 if st.reachable else 0)
            paused.add_metric([st.domain], 1 if st.paused else 0)
        yield from (held, size, age, reachable, paused)
        quotas = GaugeMetricFamily("flushctl_quota_messages",
                                   "The domain's quota of held messages (configured ones only).",
                                   labels=["domain"])
        for dom in od.config.domains.values():
            if dom.quota_messages:
                quotas.add_metric([dom.name], dom.quota_messages)
        yield quotas
        families = {key: CounterMetricFamily(metric, text, labels=list(labels))
                    for key, (metric, text, labels) in COUNTERS.items()}
        for name, labels, value in od.ledger.counters():
            family = families.get(name)
            if family is not None and len(labels) == len(COUNTERS[name][2]):
                family.add_metric(list(labels), value)
        yield from families.values()


def serve(ondemand) -> object | None:
    """Start the endpoint in a thread, if configured; None when it is off or
    cannot listen (logged: the poller's own work goes on)."""
    listen = ondemand.config.metrics_listen
    if listen is None:
        return None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(ondemand))
    try:
        server, _thread = start_http_server(listen.port, listen.host, registry)
    except OSError as exc:
        log.error("event=error stage=metrics listen=%s reason=%r", listen, str(exc))
        return None
    log.info("event=metrics_start listen=%s", listen)
    return server
