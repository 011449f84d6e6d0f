"""Prometheus metrics: each customer domain's held mail, and counters of
events that every one of our processes records in the ledger.

The poller serves them at ``[metrics] listen`` (default 127.0.0.1:9469;
``listen = ""`` turns the endpoint off), in Prometheus's text format:
prometheus-client writes the counters and quotas, the per-domain gauges
are written directly (``domain_lines``: fast at 10,000 domains).  Gauges
are read at scrape time from the same accounting as `flushctl status`
(``HeldMail.located_all``: the queue is looked at only for domains whose
totals show mail).
Counters live in the ledger's ``counters`` table: the milter, the
gateway, the poller and the CLI add to them, so they outlive any one
process.  Events that happen in a transaction anyway (a message held, a
release, a probe) are counted in it; the others (refusals, gateway
requests) are counted in memory (``Counts``) and added every few seconds.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from flushctl.bulk import collector_paused

log = logging.getLogger("flushctl.metrics")

# ledger counter name -> (metric name without _total, help, label names)
COUNTERS = {
    "releases": ("flushctl_releases", "Releases of a domain's held mail, by trigger "
                 "(finger, etrn, poller, admin, peer, odmr, portal).", ("domain", "trigger")),
    "probes": ("flushctl_probes", "Probes of a customer's mail server, by result.",
               ("domain", "result")),
    "milter_decisions": ("flushctl_milter_decisions", "The milter's decisions on messages "
                         "and recipients, by result.", ("result",)),
    "gateway_requests": ("flushctl_gateway_requests", "Finger and ETRN requests the gateway "
                         "answered, by protocol and result.", ("protocol", "result")),
    "forwards": ("flushctl_forwards", "Releases sent on to the cluster's peers as ETRN, "
                 "by peer and result.", ("peer", "result")),
    "odmr_sessions": ("flushctl_odmr_sessions", "ODMR sessions turned around (RFC 2645 "
                      "ATRN), by result (delivered, lost, timeout, refused_greeting, stopped, "
                      "failed).", ("result",)),
    "odmr_delivered": ("flushctl_odmr_delivered_messages", "Messages the customers' servers "
                       "accepted over ODMR sessions.", ()),
    "notifications": ("flushctl_notifications", "Notices about held mail, by kind (held, "
                      "digest, quota, refused, stale), channel (mail, webhook) and result "
                      "(sent, failed, expired).", ("domain", "kind", "channel", "result")),
}
GAUGES = ("flushctl_held_messages", "flushctl_held_bytes", "flushctl_oldest_held_age_seconds",
          "flushctl_refused_messages",
          "flushctl_domain_reachable", "flushctl_domain_paused", "flushctl_quota_messages",
          "flushctl_quota_bytes")
# every name a scrape can show: what dashboards and alert rules may use
METRIC_NAMES = GAUGES + tuple(metric + "_total" for metric, _, _ in COUNTERS.values())
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


def domain_lines(heldmail, now: float | None = None) -> str:
    """The per-domain gauges in the text exposition format, written directly:
    with 10,000 domains, going through prometheus-client's generic sample
    objects costs most of a second.  Domain names are canonical ASCII
    (letters, digits, dots, hyphens): nothing to escape."""
    now = time.time() if now is None else now
    held, size, age, reachable, paused, refused = [], [], [], [], [], []
    with collector_paused():
        located_all = list(heldmail.located_all())
    for name, located, state in located_all:
        label = f'{{domain="{name}"}} '
        if located is None:
            held.append(label + "0")
            size.append(label + "0")
            age.append(label + "0")
            refused.append(label + "0")
        else:
            messages, held_bytes, oldest = located.figures()
            held.append(label + str(messages))
            size.append(label + str(held_bytes))
            age.append(label + (f"{max(0.0, now - oldest):.3f}" if oldest else "0"))
            refused.append(label + str(len(located.refused())))
        if state is None:   # no row in the ledger: never probed nor paused
            continue
        if state.reachable is not None:
            reachable.append(label + ("1" if state.reachable else "0"))
        if state.paused:
            paused.append(label + "1")
    out = []
    for metric, text, lines in (
            ("flushctl_held_messages", "Messages held for the domain (as flushctl status).",
             held),
            ("flushctl_held_bytes", "Bytes held for the domain.", size),
            ("flushctl_oldest_held_age_seconds",
             "Age of the domain's oldest held message (0: none held).", age),
            ("flushctl_refused_messages", "Held messages the customer's server refused "
             "(5xx); the poller does not retry them.", refused),
            ("flushctl_domain_reachable", "1 if the domain's mail server answered the last "
             "probe, 0 if not (absent until probed).", reachable),
            ("flushctl_domain_paused", "1 while releases for the domain are paused "
             "(absent otherwise).", paused)):
        out.append(f"# HELP {metric} {text}\n# TYPE {metric} gauge\n")
        out.extend(f"{metric}{line}\n" for line in lines)
    return "".join(out)


class Collector:
    """The rest of a scrape, through prometheus-client: quotas and counters."""

    def __init__(self, heldmail):
        self.heldmail = heldmail

    def collect(self):
        od = self.heldmail
        quotas = GaugeMetricFamily("flushctl_quota_messages",
                                   "The domain's quota of held messages (configured ones only).",
                                   labels=["domain"])
        byte_quotas = GaugeMetricFamily("flushctl_quota_bytes",
                                        "The domain's quota of held bytes (configured ones only).",
                                        labels=["domain"])
        for dom in od.config.domains.values():
            if dom.quota_messages:
                quotas.add_metric([dom.name], dom.quota_messages)
            if dom.quota_bytes:
                byte_quotas.add_metric([dom.name], dom.quota_bytes)
        yield quotas
        yield byte_quotas
        families = {key: CounterMetricFamily(metric, text, labels=list(labels))
                    for key, (metric, text, labels) in COUNTERS.items()}
        for name, labels, value in od.ledger.counters():
            family = families.get(name)
            if family is not None and len(labels) == len(COUNTERS[name][2]):
                family.add_metric(list(labels), value)
        yield from families.values()


def exposition(heldmail, registry) -> bytes:
    """One scrape: the per-domain gauges, then the registry's families."""
    return domain_lines(heldmail).encode() + generate_latest(registry)


def scrape_of(heldmail):
    """A function that writes one scrape of the held-mail library's figures."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(heldmail))
    return lambda: exposition(heldmail, registry)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404)
            return
        try:
            body = self.server.scrape()
        except Exception:
            log.exception("event=error stage=scrape")
            self.send_error(500)
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):   # one line per scrape would drown the log
        pass


def listen(config) -> ThreadingHTTPServer | None:
    """The endpoint's socket, bound (before the poller gives up root: the
    port may be a privileged one) but not yet served; None when it is off
    or cannot listen (logged: the poller's own work goes on)."""
    where = config.metrics_listen
    if where is None:
        return None
    family = socket.AF_INET6 if ":" in where.host else socket.AF_INET
    server_class = type("Server", (ThreadingHTTPServer,),
                        {"address_family": family, "daemon_threads": True})
    try:
        return server_class((where.host, where.port), _Handler)
    except OSError as exc:
        log.error("event=error stage=metrics listen=%s reason=%r", where, str(exc))
        return None


def start(server: ThreadingHTTPServer | None, scrape, where) -> None:
    """Serve ``server`` in a thread; ``scrape()`` writes each answer."""
    if server is None:
        return
    server.scrape = scrape
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("event=metrics_start listen=%s", where)
