"""Where held mail goes, decided as Postfix decides it, against a real DNS
server that Postfix's own resolver uses (each test in a network namespace
of its own: see tests/netns.py).

Hosts of these tests: this host is mx.provider.test, 192.0.2.1 (and
127.0.0.1); customers' servers are smtp-sink on 192.0.2.x port 25.
Before issue 14: with this host as a domain's best MX the mail was
released and bounced as a loop; a poller resolver that disagreed with
Postfix's released mail Postfix could not route; mail for hosts under a
customer domain went to the domain's MX instead of the host.
"""

from __future__ import annotations

import json
import smtplib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from netns import Lan, in_netns  # noqa: E402
from stack import Sink, build_stack, wait_until  # noqa: E402

# Postfix resolves through DNS here (the other tests switch DNS off)
NETNS_MAIN = {
    "disable_dns_lookups": "no",
    "smtp_host_lookup": "dns",
    "inet_interfaces": "127.0.0.1, 192.0.2.1",
    "maximal_queue_lifetime": "4s",
    "bounce_queue_lifetime": "4s",
    "minimal_backoff_time": "1s",
    "maximal_backoff_time": "2s",
    "queue_run_delay": "1s",
}
US = {("mx.provider.test", "A"): ["192.0.2.1"]}


def losses(stack) -> list[str]:
    return [line for line in stack.pf.log().splitlines()
            if ("status=bounced" in line or "status=expired" in line
                or "returned to sender" in line) and "orig_to=<postmaster>" not in line]


def sinks(*addresses):
    return {a: Sink(25, host=a).start() for a in addresses}


def stop_all(started: dict) -> None:
    for sink in started.values():
        sink.cleanup()


# -- 1. this host as the customer's best MX ------------------------------------------

@in_netns
def test_this_host_as_best_mx_is_nowhere_to_deliver():
    records = {
        **US,
        ("cust.test", "MX"): [(10, "mx.provider.test"), (20, "mail.cust.test")],
        ("mail.cust.test", "A"): ["192.0.2.20"],
        # another name for this host's address is this host too
        ("other.test", "MX"): [(10, "alias.provider.test"), (20, "mail.other.test")],
        ("alias.provider.test", "A"): ["192.0.2.1"],
        ("mail.other.test", "A"): ["192.0.2.21"],
    }
    with Lan(["192.0.2.1", "192.0.2.20", "192.0.2.21"], records) as lan:
        customers = sinks("192.0.2.20", "192.0.2.21")
        stack = build_stack(extra_main=NETNS_MAIN,
                            domains=lambda _: '[domains."cust.test"]\n[domains."other.test"]\n')
        try:
            stack.send(["u@cust.test"])
            stack.send(["u@other.test"])
            wait_until(lambda: len(stack.queue()) == 2, what="2 held")
            for domain in ("cust.test", "other.test"):
                proc = stack.flushctl("flush", domain, check=False)
                assert proc.returncode == 3, proc.stdout + proc.stderr
                assert "nowhere to deliver" in proc.stderr, proc.stderr
                [row] = stack.status(domain)
                assert row["last_error"].startswith("nowhere to deliver"), row
            assert "nowhere" in stack.flushctl("status").stdout
            once = json.loads(stack.flushctl("poller", "--once", "--json").stdout)
            assert {e["action"] for e in once} == {"held"}, once
            check = stack.flushctl("check", check=False)
            assert check.returncode == 1
            assert "mx: cust.test: nowhere to deliver" in check.stdout, check.stdout
            assert "mx: other.test: nowhere to deliver" in check.stdout, check.stdout
            time.sleep(6)          # past the lifetime: still held, nothing bounced
            assert [m["queue_name"] for m in stack.queue()] == ["hold", "hold"]
            assert losses(stack) == []
            assert all(s.messages() == [] for s in customers.values())

            # the customer fixes its MX records: it is the best MX, we the backup
            lan.dns.restart({**records, ("cust.test", "MX"): [(10, "mail.cust.test"),
                                                             (20, "mx.provider.test")]})
            stack.flushctl("flush", "cust.test", "--wait", "--timeout", "30")
            assert len(customers["192.0.2.20"].messages()) == 1
            assert losses(stack) == []
        finally:
            stack.destroy()
            stop_all(customers)


# -- 10. the poller's resolver and Postfix's disagree ---------------------------------

@in_netns
def test_release_follows_postfix_resolver_when_the_poller_disagrees():
    # Postfix's resolver (resolv.conf) does not know cust.test; the poller's does
    with Lan(["192.0.2.1", "192.0.2.20"], dict(US)) as lan:
        lan.second_dns("127.0.0.54", {("cust.test", "MX"): [(10, "mail.cust.test")],
                                      ("mail.cust.test", "A"): ["192.0.2.20"]})
        customers = sinks("192.0.2.20")
        stack = build_stack(extra_main=NETNS_MAIN,
                            domains=lambda _: '[domains."cust.test"]\n',
                            poller_extra='nameservers = ["127.0.0.54"]')
        try:
            for i in range(2):
                stack.send([f"u{i}@cust.test"])
            wait_until(lambda: len(stack.queue()) == 2, what="2 held")
            proc = stack.flushctl("flush", "cust.test", check=False)
            assert proc.returncode == 3, proc.stdout + proc.stderr
            assert "Postfix cannot route cust.test" in proc.stderr, proc.stderr
            assert "Postfix cannot route" in stack.status("cust.test")[0]["last_error"]
            once = json.loads(stack.flushctl("poller", "--once", "--json").stdout)
            assert once[0]["action"] == "held", once
            check = stack.flushctl("check", check=False).stdout
            assert ("mx: cust.test: the poller's resolver (127.0.0.54:53) finds "
                    "mail.cust.test[192.0.2.20]:25; Postfix's (resolv.conf) finds") in check, check
            time.sleep(6)
            assert [m["queue_name"] for m in stack.queue()] == ["hold", "hold"]
            assert losses(stack) == [] and customers["192.0.2.20"].messages() == []

            # Postfix's resolver learns the domain: the next release goes
            lan.dns.restart({**US, ("cust.test", "MX"): [(10, "mail.cust.test")],
                             ("mail.cust.test", "A"): ["192.0.2.20"]})
            stack.flushctl("flush", "cust.test", "--wait", "--timeout", "30")
            assert len(customers["192.0.2.20"].messages()) == 2
            assert losses(stack) == []
        finally:
            stack.destroy()
            stop_all(customers)


# -- 12. mail for a host under a customer domain goes to that host --------------------

HOST_RECORDS = {
    **US,
    ("cust.test", "MX"): [(10, "mail.cust.test"), (20, "mx.provider.test")],
    ("mail.cust.test", "A"): ["192.0.2.20"],
    ("pc1.cust.test", "A"): ["192.0.2.31"],                 # an address, no MX
    ("pc2.cust.test", "MX"): [(10, "pc2.cust.test")],       # its own MX
    ("pc2.cust.test", "A"): ["192.0.2.32"],
}


@in_netns
def test_hosts_under_a_customer_domain_are_routed_by_their_own_dns():
    with Lan(["192.0.2.1", "192.0.2.20", "192.0.2.31", "192.0.2.32"], HOST_RECORDS):
        customers = sinks("192.0.2.20", "192.0.2.31")
        pc2 = Sink(25, host="192.0.2.32")          # pc2 is offline at first
        stack = build_stack(extra_main=NETNS_MAIN, domains=lambda _: '[domains."cust.test"]\n')
        try:
            for rcpt, n in (("x@cust.test", 4), ("bob@pc1.cust.test", 3),
                            ("alice@pc2.cust.test", 3)):
                for i in range(n):
                    stack.send([rcpt], subject=f"{rcpt} {i}")
            wait_until(lambda: len(stack.queue()) == 10, what="10 held")
            proc = stack.flushctl("flush", "cust.test", "--wait", "--timeout", "30", check=False)
            # each host's mail at its own server; pc2's, whose server is down, stays held
            assert len(customers["192.0.2.20"].messages()) == 4, proc.stdout + proc.stderr
            assert len(customers["192.0.2.31"].messages()) == 3
            assert "released 7" in proc.stdout, proc.stdout + proc.stderr
            assert "pc2.cust.test: not released" in proc.stdout, proc.stdout
            assert stack.status("cust.test")[0]["hosts"] == {"pc2.cust.test": 3}

            pc2.start()
            stack.flushctl("flush", "cust.test", "--wait", "--timeout", "30")
            assert len(pc2.messages()) == 3
            assert stack.queue() == [] and losses(stack) == []
        finally:
            stack.destroy()
            pc2.cleanup()
            stop_all(customers)


@in_netns
def test_hosts_with_routes_of_their_own_and_one_destination_per_message():
    addresses = ["192.0.2.1", "192.0.2.20", "192.0.2.31", "192.0.2.32", "192.0.2.40",
                 "192.0.2.41"]
    with Lan(addresses, HOST_RECORDS):
        customers = sinks("192.0.2.20", "192.0.2.31", "192.0.2.32", "192.0.2.40",
                          "192.0.2.41")
        stack = build_stack(extra_main=NETNS_MAIN, domains=lambda _: """
[domains."cust.test"]

[domains."relay.test"]
relay = "[192.0.2.40]:25"
hosts = {"pc1.relay.test" = "[192.0.2.41]:25"}
""")
        try:
            for rcpt, n in (("y@relay.test", 1), ("z@lab.relay.test", 1),
                            ("w@pc1.relay.test", 2)):
                for i in range(n):
                    stack.send([rcpt], subject=f"{rcpt} {i}")
            # one message, one destination: a second host's recipient waits its turn
            with smtplib.SMTP(stack.pf.address, stack.pf.smtpd_port) as smtp:
                refused = smtp.sendmail("s@sender.test", ["bob@pc1.cust.test",
                                                          "alice@pc2.cust.test"],
                                        "Subject: 2\n\nx\n")
            assert refused == {"alice@pc2.cust.test": (452, b"4.5.3 one destination host per "
                                                            b"message: send this recipient "
                                                            b"again in its own transaction")}
            wait_until(lambda: len(stack.queue()) == 5, what="5 held")
            assert stack.status("relay.test")[0]["hosts"] == {"relay.test": 2,
                                                              "pc1.relay.test": 2}
            assert stack.status("cust.test")[0]["hosts"] == {"pc1.cust.test": 1}
            stack.flushctl("flush", "relay.test", "--wait", "--timeout", "30")
            assert len(customers["192.0.2.40"].messages()) == 2    # the relay, lab too
            assert len(customers["192.0.2.41"].messages()) == 2    # its own route
            stack.flushctl("flush", "cust.test", "--wait", "--timeout", "30")
            assert len(customers["192.0.2.31"].messages()) == 1
            assert stack.queue() == [] and losses(stack) == []
        finally:
            stack.destroy()
            stop_all(customers)
