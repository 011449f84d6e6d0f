"""The poller releases held mail by itself once the customer's server answers."""

import json
import sys
import time
from pathlib import Path

import pytest

from conftest import SHORT_LIFETIMES, Sink, bounce_lines, free_port, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dnsserver import DNSServer  # noqa: E402

def held(stack, domain):
    return [m for m in stack.queue() if m["queue_name"] == "hold"
            and m["recipients"][0]["address"].endswith("@" + domain)]


def test_customer_back_online_gets_its_mail_within_an_interval(make_stack):
    down_port = free_port()

    def domains(sink_port):
        return f"""
[domains."customer.test"]
relay = "[127.0.0.1]:{sink_port}"

[domains."down.test"]
relay = "[127.0.0.1]:{down_port}"

[domains."idle.test"]
relay = "[127.0.0.1]:{down_port}"
"""
    stack = make_stack(extra_main=SHORT_LIFETIMES, domains=domains,
                       poller_extra="interval = 2")
    for i in range(2):
        stack.send([f"u{i}@customer.test"])
    stack.send(["x@down.test"])
    wait_until(lambda: len(stack.queue()) == 3, what="3 held")
    stack.start_poller()

    time.sleep(7)  # several intervals and lifetimes with both customers down
    assert len(held(stack, "customer.test")) == 2
    assert len(held(stack, "down.test")) == 1
    rows = {r["domain"]: r for r in stack.status()}
    assert rows["customer.test"]["reachable"] is False
    assert "refused" in rows["customer.test"]["last_error"]
    assert rows["idle.test"]["reachable"] is None  # holds nothing: never probed
    assert bounce_lines(stack) == []

    stack.sink.start()
    came_up = time.monotonic()
    wait_until(lambda: len(stack.sink.messages()) == 2, timeout=15, what="2 deliveries")
    assert time.monotonic() - came_up < 2 + 4  # one interval, plus delivery
    [row] = stack.status("customer.test")
    assert row["reachable"] is True
    assert row["last_flush_trigger"] == "poller"
    wait_until(lambda: stack.status("customer.test")[0]["messages"] == 0, timeout=10,
               what="nothing held")
    # the customer still offline keeps its mail, untouched
    time.sleep(3)
    assert len(held(stack, "down.test")) == 1
    assert bounce_lines(stack) == []
    assert stack.poller.poll() is None


@pytest.fixture
def dns_server():
    server = DNSServer().start()
    yield server
    server.stop()


def test_mx_records_lead_the_probe_and_ours_are_skipped(make_stack, dns_server):
    port = free_port()
    ours = Sink(port, host="127.0.0.2").start()  # our own MX would answer: never probe it
    try:
        dns_server.records.update({
            # the customer's server is the best MX, we are its backup
            ("mxcust.test", "MX"): [(10, "mail.mxcust.test"), (20, "mx.ours.test")],
            ("mx.ours.test", "A"): ["127.0.0.2"],
            ("mail.mxcust.test", "A"): ["127.0.0.3"],
            ("nullmx.test", "MX"): [(0, ".")],
        })

        def domains(_):
            return f"""
[domains."mxcust.test"]
relay = "mxcust.test:{port}"

[domains."nullmx.test"]

[domains."gone.test"]
"""
        stack = make_stack(domains=domains, poller_extra=(
            f'own_hosts = ["mx.ours.test"]\n'
            f'nameservers = ["{dns_server.host}:{dns_server.port}"]'))
        for domain in ("mxcust.test", "nullmx.test", "gone.test"):
            stack.send([f"someone@{domain}"])
        wait_until(lambda: len(stack.queue()) == 3, what="3 held")

        first = {e["domain"]: e for e in json.loads(
            stack.flushctl("poller", "--once", "--json").stdout)}
        assert first["mxcust.test"]["outcome"] == "refused"
        assert first["mxcust.test"]["target"] == f"mail.mxcust.test[127.0.0.3]:{port}"
        assert first["nullmx.test"]["outcome"] == "no address"
        assert "null MX" in first["nullmx.test"]["detail"]
        assert first["gone.test"]["outcome"] == "no address"
        assert "no such domain" in first["gone.test"]["detail"]
        assert {e["action"] for e in first.values()} == {"held"}
        assert len([m for m in stack.queue() if m["queue_name"] == "hold"]) == 3

        customer = Sink(port, host="127.0.0.3").start()
        try:
            second = {e["domain"]: e for e in json.loads(
                stack.flushctl("poller", "--once", "--json").stdout)}
        finally:
            customer.cleanup()
        assert second["mxcust.test"]["outcome"] == "reachable"
        assert second["mxcust.test"]["action"] == "released"
        assert second["mxcust.test"]["released"] == 1
        [row] = stack.status("mxcust.test")
        assert row["reachable"] is True and row["last_flush_trigger"] == "poller"
        rows = {r["domain"]: r for r in stack.status()}
        assert "null MX" in rows["nullmx.test"]["last_error"]
    finally:
        ours.cleanup()
