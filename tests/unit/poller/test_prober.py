"""The prober (flushctl.poller.prober): where a domain's mail would go, and
whether a server there answers.

DNS is real but private: the prober's own seam, ``nameservers``, points
dnspython at tests/dnsserver.py on a loopback port (never live DNS).
Knocks are real too: listeners on 127.0.0.x.  Postfix's MX rule itself
(``routing.mx_targets``) is tested in test_routing.py; here, what the
prober feeds it and makes of its answer.
"""

from __future__ import annotations

import asyncio
import re
import socket
import sys
import time
from pathlib import Path

import pytest

from flushctl import config
from flushctl.poller import prober as probing
from flushctl.poller.prober import (BAD_GREETING, NO_ADDRESS, NOWHERE, REACHABLE, REFUSED,
                                    TIMEOUT, UNROUTABLE, ProbeResult, Prober)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from dnsserver import DNSServer  # noqa: E402
from greeters import GREETING, greeters  # noqa: E402



@pytest.fixture
def dns():
    server = DNSServer().start()
    yield server
    server.stop()


def make_prober(dns_server, own_hosts=(), own_addresses=(), record_types=("A", "AAAA"),
                timeout=2.0) -> Prober:
    return Prober(timeout, own_hosts, (config.HostPort(dns_server.host, dns_server.port),),
                  frozenset(own_addresses), record_types)


def domain(relay: str | None = None, hosts: dict[str, str] | None = None,
           name: str = "cust.test") -> config.Domain:
    text = f'[domains."{name}"]\n'
    if relay is not None:
        text += f'relay = "{relay}"\n'
    if hosts:
        text += "hosts = {" + ", ".join(f'"{h}" = "{r}"' for h, r in hosts.items()) + "}\n"
    return config.parse(text, "t.toml").domains[name]


def targets(prober: Prober, dom: config.Domain, route: str | None = None):
    return asyncio.run(prober.route_targets(dom, route))


def probe(prober: Prober, dom: config.Domain, route: str | None = None) -> ProbeResult:
    return asyncio.run(prober.probe(dom, route))


@pytest.fixture
def listen():
    yield from greeters()


@pytest.fixture
def refusing():
    """Bind a port where nothing listens (connections to it are refused):
    ``refusing()`` a new one on 127.0.0.1, ``refusing(host, port)`` that one."""
    socks = []

    def bind(host="127.0.0.1", port=0) -> int:
        sock = socket.socket()
        sock.bind((host, port))
        socks.append(sock)
        return sock.getsockname()[1]
    yield bind
    for sock in socks:
        sock.close()


# -- relay or MX: where it knocks ------------------------------------------------------

def test_a_bracketed_relay_is_that_host_without_an_mx_lookup(dns):
    dns.records.update({("mail.cust.test", "MX"): [(10, "elsewhere.test")],
                        ("elsewhere.test", "A"): ["127.0.0.9"],
                        ("mail.cust.test", "A"): ["127.0.0.7"]})
    found = targets(make_prober(dns), domain("[mail.cust.test]:2525"))
    assert found == ([("mail.cust.test", 2525, ["127.0.0.7"])], "", "")
    assert ("mail.cust.test", "MX") not in dns.queries


def test_a_relay_written_as_an_address_asks_no_dns(dns):
    found = targets(make_prober(dns), domain("[192.0.2.7]:25"))
    assert found == ([("192.0.2.7", 25, ["192.0.2.7"])], "", "")
    assert dns.queries == []


def test_a_relay_without_brackets_goes_through_its_mx_records_on_its_port(dns):
    dns.records.update({("relay.cust.test", "MX"): [(20, "mx2.cust.test"), (10, "mx1.cust.test")],
                        ("relay.cust.test", "A"): ["127.0.0.9"],
                        ("mx1.cust.test", "A"): ["127.0.0.1"],
                        ("mx2.cust.test", "A"): ["127.0.0.2"]})
    found = targets(make_prober(dns), domain("relay.cust.test:2525"))
    assert found == ([("mx1.cust.test", 2525, ["127.0.0.1"]),
                      ("mx2.cust.test", 2525, ["127.0.0.2"])], "", "")


def test_without_a_relay_the_domains_own_mx_records_best_first_on_port_25(dns):
    dns.records.update({("cust.test", "MX"): [(30, "c.cust.test"), (10, "A.Cust.Test"),
                                              (20, "b.cust.test")],
                        ("a.cust.test", "A"): ["127.0.0.1"],
                        ("b.cust.test", "A"): ["127.0.0.2"],
                        ("c.cust.test", "A"): ["127.0.0.3"]})
    found, outcome, problem = targets(make_prober(dns), domain())
    assert [(h, p) for h, p, _ in found] == [("a.cust.test", 25), ("b.cust.test", 25),
                                             ("c.cust.test", 25)]
    assert (outcome, problem) == ("", "")


def test_a_name_without_mx_records_is_its_own_mail_server(dns):
    dns.records.update({("cust.test", "A"): ["127.0.0.5"]})
    assert targets(make_prober(dns), domain()) == ([("cust.test", 25, ["127.0.0.5"])], "", "")


def test_a_host_under_a_domain_without_relay_is_routed_by_its_own_mx(dns):
    dns.records.update({("cust.test", "MX"): [(10, "mx.cust.test")],
                        ("mx.cust.test", "A"): ["127.0.0.1"],
                        ("pc1.cust.test", "MX"): [(10, "mx.pc1.cust.test")],
                        ("mx.pc1.cust.test", "A"): ["127.0.0.2"]})
    found, _, _ = targets(make_prober(dns), domain(), "pc1.cust.test")
    assert found == [("mx.pc1.cust.test", 25, ["127.0.0.2"])]


def test_a_host_with_a_next_hop_of_its_own_and_the_rest_through_the_relay(dns):
    dns.records.update({("mail.cust.test", "A"): ["127.0.0.7"]})
    dom = domain("[mail.cust.test]:25", hosts={"pc1.cust.test": "[192.0.2.9]:2525"})
    assert targets(make_prober(dns), dom, "pc1.cust.test") == \
        ([("192.0.2.9", 2525, ["192.0.2.9"])], "", "")
    assert targets(make_prober(dns), dom) == ([("mail.cust.test", 25, ["127.0.0.7"])], "", "")


@pytest.mark.parametrize("record_types, addresses, asked", [
    pytest.param(("A", "AAAA"), ["127.0.0.5", "::1"], {"A", "AAAA"}, id="inet_protocols=all"),
    pytest.param(("A",), ["127.0.0.5"], {"A"}, id="ipv4"),
    pytest.param(("AAAA",), ["::1"], {"AAAA"}, id="ipv6"),
])
def test_a_hosts_addresses_are_the_record_types_postfix_uses(dns, record_types, addresses,
                                                             asked):
    dns.records.update({("mail.cust.test", "A"): ["127.0.0.5"],
                        ("mail.cust.test", "AAAA"): ["::1"]})
    found = targets(make_prober(dns, record_types=record_types), domain("[mail.cust.test]:25"))
    assert found == ([("mail.cust.test", 25, addresses)], "", "")
    assert {t for n, t in dns.queries if n == "mail.cust.test"} == asked


# -- ourselves, as Postfix leaves us out ------------------------------------------------

MX_WITH_US = [(10, "mail.cust.test"), (20, "mx.ours.test"), (30, "backup.cust.test")]
ADDRESSES = {("mail.cust.test", "A"): ["127.0.0.3"], ("mx.ours.test", "A"): ["127.0.0.2"],
             ("backup.cust.test", "A"): ["127.0.0.4"], ("alias.test", "A"): ["127.0.0.2"]}


@pytest.mark.parametrize("records, own_hosts, own_addresses, expected", [
    pytest.param(MX_WITH_US, ["MX.Ours.Test."], [], ["mail.cust.test"],
                 id="our name: it and every worse MX left out"),
    pytest.param([(10, "mail.cust.test"), (20, "alias.test"), (30, "backup.cust.test")], [],
                 ["127.0.0.2"], ["mail.cust.test"], id="another name for our address"),
    pytest.param(MX_WITH_US, [], [], ["mail.cust.test", "mx.ours.test", "backup.cust.test"],
                 id="not knowing ourselves, every MX"),
    pytest.param([(10, "mail.cust.test"), (20, "backup.cust.test"), (30, "mx.ours.test")],
                 ["mx.ours.test"], [], ["mail.cust.test", "backup.cust.test"],
                 id="we are the last resort"),
])
def test_our_mx_and_every_mx_no_better_are_left_out(dns, records, own_hosts, own_addresses,
                                                   expected):
    dns.records.update(ADDRESSES)
    dns.records[("cust.test", "MX")] = records
    found, _, _ = targets(make_prober(dns, own_hosts, own_addresses), domain())
    assert [h for h, _, _ in found] == expected


@pytest.mark.parametrize("records", [
    pytest.param([(10, "mx.ours.test"), (20, "backup.cust.test")], id="our MX is the best"),
    pytest.param([(10, "mail.cust.test"), (10, "mx.ours.test"), (20, "backup.cust.test")],
                 id="another MX as good as ours"),
])
def test_when_we_are_the_best_mx_there_is_nowhere_to_deliver(dns, records):
    dns.records.update(ADDRESSES)
    dns.records[("cust.test", "MX")] = records
    found, outcome, problem = targets(make_prober(dns, ["mx.ours.test"]), domain())
    assert (found, outcome) == ([], NOWHERE)
    assert problem == ("cust.test: this host is its best MX (Postfix would say: "
                       "mail for cust.test loops back to myself)")


@pytest.mark.parametrize("relay, own_hosts, own_addresses, ours", [
    pytest.param("relay.cust.test:25", [], ["127.0.0.2"], True, id="our address, port 25"),
    pytest.param("relay.cust.test:2525", [], ["127.0.0.2"], False,
                 id="our address, another port: not ours"),
    pytest.param("relay.cust.test:2525", ["alias.test"], [], True, id="our name, any port"),
])
def test_our_addresses_count_only_on_port_25_our_names_on_any(dns, relay, own_hosts,
                                                             own_addresses, ours):
    """smtp(8) compares addresses for itself on the SMTP port only; a next
    hop on another port of one of our addresses is another service."""
    dns.records.update(ADDRESSES)
    dns.records[("relay.cust.test", "MX")] = [(10, "alias.test")]
    found, outcome, _ = targets(make_prober(dns, own_hosts, own_addresses), domain(relay))
    if ours:
        assert (found, outcome) == ([], NOWHERE)
    else:
        assert found == [("alias.test", 2525, ["127.0.0.2"])]


@pytest.mark.parametrize("relay, own_hosts, own_addresses, ours", [
    pytest.param("[mx.ours.test]:2525", ["mx.ours.test"], [], True, id="our name"),
    pytest.param("[127.0.0.2]:25", [], ["127.0.0.2"], True, id="our address, port 25"),
    pytest.param("[alias.test]:25", [], ["127.0.0.2"], True, id="a name of our address"),
    pytest.param("[127.0.0.2]:2525", [], ["127.0.0.2"], False, id="our address, port 2525"),
])
def test_a_next_hop_that_is_this_host_is_nowhere_to_deliver(dns, relay, own_hosts,
                                                            own_addresses, ours):
    dns.records.update(ADDRESSES)
    found, outcome, problem = targets(make_prober(dns, own_hosts, own_addresses), domain(relay))
    if ours:
        host = relay[1:].split("]")[0]
        assert (found, outcome, problem) == ([], NOWHERE, f"{host}: the next hop is this host")
    else:
        assert found == [("127.0.0.2", 2525, ["127.0.0.2"])] and outcome == ""


def test_a_name_without_mx_records_that_is_this_host_is_nowhere_to_deliver(dns):
    dns.records.update({("cust.test", "A"): ["127.0.0.2"]})
    found, outcome, problem = targets(make_prober(dns, own_addresses=["127.0.0.2"]), domain())
    assert (found, outcome) == ([], NOWHERE)
    assert problem == ("cust.test: has no MX records and is this host "
                       "(Postfix would say: loops back to myself)")


# -- nothing to knock on --------------------------------------------------------------

@pytest.mark.parametrize("records, problem", [
    pytest.param({("cust.test", "MX"): [(0, ".")]},
                 "cust.test: null MX (the domain accepts no mail)", id="null MX"),
    pytest.param({}, "cust.test: no such domain", id="NXDOMAIN"),
    pytest.param({("cust.test", "TXT"): ['"v=spf1 -all"']}, "cust.test: no address records",
                 id="neither MX nor address"),
    pytest.param({("cust.test", "MX"): [(10, "gone.cust.test"), (20, "v6.cust.test")],
                  ("v6.cust.test", "AAAA"): ["::1"]},
                 "cust.test: no MX host has an address", id="MX hosts without an address"),
    pytest.param({("cust.test", "MX"): [(10, "gone.cust.test"), (20, "mx.ours.test")],
                  ("mx.ours.test", "A"): ["127.0.0.2"]},
                 "cust.test: no MX host more preferred than ours has an address",
                 id="only MX hosts above ours, without an address"),
])
def test_no_server_to_knock_on_is_no_address_and_says_why(dns, records, problem):
    """(v6.cust.test has only an AAAA record, and this prober, like Postfix
    under inet_protocols = ipv4, looks up A records only.)"""
    dns.records.update(records)
    prober = make_prober(dns, own_hosts=["mx.ours.test"], record_types=("A",))
    assert targets(prober, domain()) == ([], NO_ADDRESS, problem)


def test_an_mx_host_without_an_address_is_passed_over(dns):
    dns.records.update({("cust.test", "MX"): [(10, "gone.cust.test"), (20, "v6.cust.test"),
                                              (30, "backup.cust.test")],
                        ("v6.cust.test", "AAAA"): ["::1"],
                        ("backup.cust.test", "A"): ["127.0.0.4"]})
    found, _, _ = targets(make_prober(dns, record_types=("A",)), domain())
    assert found == [("backup.cust.test", 25, ["127.0.0.4"])]


def test_a_dns_failure_is_no_address_naming_the_failure(dns):
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)   # takes queries, never answers
    silent.bind(("127.0.0.1", 0))
    try:
        prober = Prober(0.5, nameservers=(config.HostPort(*silent.getsockname()),))
        started = time.monotonic()
        found, outcome, problem = targets(prober, domain())
    finally:
        silent.close()
    assert (found, outcome) == ([], NO_ADDRESS)
    assert re.fullmatch(r"cust\.test: DNS lookup failed \(\w*Timeout\)", problem), problem
    assert time.monotonic() - started < 3


# -- knocking -----------------------------------------------------------------------

@pytest.mark.parametrize("greeting, outcome, detail", [
    pytest.param(GREETING, REACHABLE, "220 mx.customer.test ESMTP", id="220"),
    pytest.param(b"220 " + b"x" * 200 + b"\r\n", REACHABLE, "220 " + "x" * 76,
                 id="a long greeting, cut"),
    pytest.param(b"554 5.7.1 not now\r\n", BAD_GREETING, "554 5.7.1 not now", id="554"),
    pytest.param(b"", BAD_GREETING, "connection closed", id="hangs up"),
    pytest.param(None, TIMEOUT, "no greeting within 0.5s", id="says nothing"),
])
def test_what_a_server_says_is_the_outcome(dns, listen, greeting, outcome, detail):
    server = listen(greeting=greeting)
    result = probe(make_prober(dns, timeout=0.5), domain(f"[127.0.0.1]:{server.port}"))
    assert (result.outcome, result.target, result.detail) == \
        (outcome, f"127.0.0.1:{server.port}", detail)
    assert result.reachable is (outcome == REACHABLE)
    if outcome == REACHABLE:
        time.sleep(0.2)
        assert server.received == b"QUIT\r\n"   # and nothing else: no mail, no EHLO


def test_a_port_that_refuses_is_refused(dns, refusing):
    port = refusing()
    result = probe(make_prober(dns), domain(f"[127.0.0.1]:{port}"))
    assert (result.outcome, result.target, result.detail) == \
        (REFUSED, f"127.0.0.1:{port}", "connection refused")


def test_the_first_server_to_greet_in_preference_order_wins(dns, listen, refusing):
    port = refusing()
    second = listen(host="127.0.0.2", port=port)
    third = listen(host="127.0.0.3", port=port)
    dns.records.update({("relay.cust.test", "MX"): [(30, "mx3.cust.test"), (10, "mx1.cust.test"),
                                                    (20, "mx2.cust.test")],
                        ("mx1.cust.test", "A"): ["127.0.0.1"],
                        ("mx2.cust.test", "A"): ["127.0.0.2"],
                        ("mx3.cust.test", "A"): ["127.0.0.3"]})
    before = time.time()
    result = probe(make_prober(dns), domain(f"relay.cust.test:{port}"))
    assert result == ProbeResult(REACHABLE, f"mx2.cust.test[127.0.0.2]:{port}",
                                 "220 mx.customer.test ESMTP", result.when)
    assert before <= result.when <= time.time()
    assert second.connections == 1
    assert third.connections == 0     # no knock after the first answer


def test_every_address_of_a_host_is_tried(dns, listen, refusing):
    port = refusing()
    listen(host="127.0.0.2", port=port)
    dns.records.update({("mail.cust.test", "A"): ["127.0.0.1", "127.0.0.2"]})
    result = probe(make_prober(dns), domain(f"[mail.cust.test]:{port}"))
    assert (result.outcome, result.target) == \
        (REACHABLE, f"mail.cust.test[127.0.0.2]:{port}")


def test_when_no_server_answers_the_last_knock_is_told(dns, refusing):
    port = refusing("127.0.0.2", refusing())
    dns.records.update({("relay.cust.test", "MX"): [(10, "mx1.cust.test"), (20, "mx2.cust.test")],
                        ("mx1.cust.test", "A"): ["127.0.0.1"],
                        ("mx2.cust.test", "A"): ["127.0.0.2"]})
    result = probe(make_prober(dns), domain(f"relay.cust.test:{port}"))
    assert (result.outcome, result.target, result.detail) == \
        (REFUSED, f"mx2.cust.test[127.0.0.2]:{port}", "connection refused")


def test_nowhere_to_deliver_knocks_on_nobody(dns, listen):
    ours = listen(host="127.0.0.2")
    dns.records.update({("relay.cust.test", "MX"): [(10, "mx.ours.test")],
                        ("mx.ours.test", "A"): ["127.0.0.2"]})
    result = probe(make_prober(dns, ["mx.ours.test"]), domain(f"relay.cust.test:{ours.port}"))
    assert (result.outcome, result.target) == (NOWHERE, "")
    assert "loops back to myself" in result.detail
    assert ours.connections == 0


def test_no_address_knocks_on_nobody_and_says_why(dns):
    result = probe(make_prober(dns), domain())
    assert (result.outcome, result.target, result.detail) == \
        (NO_ADDRESS, "", "cust.test: no such domain")


# -- can Postfix route it too? ----------------------------------------------------------

def test_a_route_postfix_cannot_resolve_is_unroutable_and_the_others_stay(dns):
    """``routable``: a reachable route that the prober resolving as Postfix
    does cannot send anywhere is UNROUTABLE; what did not answer is left
    as it was, and not looked up again."""
    postfix_dns = DNSServer().start()   # knows none of the customer's names
    try:
        postfix_view = make_prober(postfix_dns)
        dom = domain("[mail.cust.test]:2525", hosts={"pc1.cust.test": "[pc1.cust.test]:2525"})
        up = ProbeResult(REACHABLE, "mail.cust.test[127.0.0.7]:2525", "220 hi", 1.0)
        down = ProbeResult(REFUSED, "pc1.cust.test[127.0.0.8]:2525", "connection refused", 1.0)
        checked = asyncio.run(probing.routable(postfix_view, dom,
                                               {"cust.test": up, "pc1.cust.test": down}))
        asked = list(postfix_dns.queries)
    finally:
        postfix_dns.stop()
    assert checked["pc1.cust.test"] is down
    assert checked["cust.test"].outcome == UNROUTABLE and not checked["cust.test"].reachable
    assert checked["cust.test"].detail == (
        "Postfix cannot route cust.test: mail.cust.test: no such domain (the poller's "
        "nameservers can: see `flushctl check`)")
    assert {name for name, _ in asked} == {"mail.cust.test"}


def test_a_route_postfix_resolves_too_stays_reachable(dns):
    dns.records.update({("mail.cust.test", "A"): ["127.0.0.7"]})
    dom = domain("[mail.cust.test]:2525")
    up = ProbeResult(REACHABLE, "mail.cust.test[127.0.0.7]:2525", "220 hi", 1.0)
    assert asyncio.run(probing.routable(make_prober(dns), dom, {"cust.test": up})) == \
        {"cust.test": up}


def test_without_a_second_view_nothing_is_looked_up_again(dns):
    up = ProbeResult(REACHABLE, "x", "220 hi", 1.0)
    results = {"cust.test": up}
    assert asyncio.run(probing.routable(None, domain("[mail.cust.test]:25"), results)) is results


def test_postfixs_view_keeps_our_idea_of_ourselves(dns):
    ours = make_prober(dns, ["mx.ours.test"], ["127.0.0.2"], ("A",), timeout=3.0)
    view = ours.same_view()
    assert (view.own_hosts, view.own_addresses, view.record_types, view.timeout) == \
        (frozenset({"mx.ours.test"}), frozenset({"127.0.0.2"}), ("A",), 3.0)
    assert view is not ours and view.resolver is not ours.resolver


# -- a relay its customer chose: fenced at every probe --------------------------------

def chosen(relay: str) -> config.Domain:
    """A domain whose relay its customer chose in the portal."""
    from dataclasses import replace
    return replace(domain(relay), relay_editable=True, relay_chosen=True)


def fenced(dns, **kwargs) -> Prober:
    import ipaddress
    from flushctl.mta.relays import target_refusal
    prober = make_prober(dns, **kwargs)
    allow = (ipaddress.ip_network("127.0.0.0/24"),)
    prober.fence = lambda relay, found, problem: target_refusal(relay, found, problem, allow)
    return prober


def test_a_chosen_relay_that_now_resolves_to_a_refused_address_is_nowhere(dns, listen):
    """The name passed when it was chosen; it points elsewhere now (a
    private address, this host): no knock, no release."""
    port = listen().port
    dns.records.update({("mail.cust.test", "A"): ["127.0.0.1"]})
    prober = fenced(dns)
    assert probe(prober, chosen(f"[mail.cust.test]:{port}")).reachable
    for address in ("10.0.0.1", "::1", "64:ff9b::a00:1"):
        kind = "AAAA" if ":" in address else "A"
        dns.records.clear()
        dns.records[("mail.cust.test", kind)] = [address]
        prober = fenced(dns)   # a fresh cache
        found, outcome, problem = targets(prober, chosen(f"[mail.cust.test]:{port}"))
        assert (found, outcome) == ([], NOWHERE), address
        assert "not an address on the internet (the relay chosen in the portal)" in problem
        # the admin's relay of the same name is the admin's business
        assert targets(prober, domain(f"[mail.cust.test]:{port}"))[0] != []


def test_a_chosen_relay_whose_lookups_do_not_all_answer_is_not_used(dns):
    """An A answer beside a failed AAAA lookup: the AAAA could be anything
    next time; for an MX relay, one MX host's failed lookup likewise."""
    dns.records.update({("mail.cust.test", "A"): ["127.0.0.5"],
                        ("mail.cust.test", "AAAA"): "SERVFAIL"})
    found, outcome, problem = targets(fenced(dns), chosen("[mail.cust.test]:2525"))
    assert (found, outcome) == ([], NO_ADDRESS) and "DNS lookup failed" in problem
    assert targets(fenced(dns), domain("[mail.cust.test]:2525"))[0] != []   # the admin's
    dns.records.clear()
    dns.records.update({("relay.cust.test", "MX"): [(10, "a.cust.test"), (20, "b.cust.test")],
                        ("a.cust.test", "A"): ["127.0.0.5"], ("b.cust.test", "A"): "SERVFAIL"})
    found, outcome, problem = targets(fenced(dns, record_types=("A",)),
                                      chosen("relay.cust.test:2525"))
    assert (found, outcome) == ([], NO_ADDRESS) and "b.cust.test" in problem
    # an MX host that does not exist is passed over, as Postfix does
    dns.records[("b.cust.test", "A")] = ["127.0.0.6"]
    dns.records[("relay.cust.test", "MX")] = [(10, "a.cust.test"), (20, "gone.cust.test")]
    found, _, _ = targets(fenced(dns, record_types=("A",)), chosen("relay.cust.test:2525"))
    assert found == [("a.cust.test", 2525, ["127.0.0.5"])]
    # no AAAA record at all is no failure
    dns.records.clear()
    dns.records.update({("mail.cust.test", "A"): ["127.0.0.5"]})
    assert targets(fenced(dns), chosen("[mail.cust.test]:2525"))[0] == \
        [("mail.cust.test", 2525, ["127.0.0.5"])]


def test_postfixs_view_keeps_the_fence(dns):
    prober = fenced(dns)
    assert prober.same_view().fence is prober.fence


# -- words --------------------------------------------------------------------------

@pytest.mark.parametrize("result, text", [
    (ProbeResult(REACHABLE, "mx[192.0.2.1]:25", "220 hi"), "reachable (mx[192.0.2.1]:25): 220 hi"),
    (ProbeResult(NO_ADDRESS, "", "cust.test: no such domain"),
     "no address: cust.test: no such domain"),
    (ProbeResult(REFUSED, "192.0.2.1:25"), "refused (192.0.2.1:25)"),
])
def test_a_probe_result_in_words(result, text):
    assert result.text() == text


@pytest.mark.parametrize("found, text", [
    ([], "nothing"),
    ([("mx.cust.test", 25, ["192.0.2.2", "192.0.2.1"])], "mx.cust.test[192.0.2.1,192.0.2.2]:25"),
    ([("a", 25, ["192.0.2.1"]), ("b", 2525, ["::1"])], "a[192.0.2.1]:25, b[::1]:2525"),
])
def test_targets_in_words(found, text):
    assert probing.describe(found) == text
