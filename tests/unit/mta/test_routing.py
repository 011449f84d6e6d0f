"""flushctl.mta.routing: where Postfix sends a customer's mail, and its MX rule."""

import pytest

from flushctl import config

from flushctl.mta import routing

CONFIG = """
[domains."relayed.example"]
relay = "[mail.relayed.example]:25"
hosts = {"pc1.relayed.example" = "[192.0.2.7]:25", "lab.relayed.example" = "lab.relayed.example"}

[domains."direct.example"]
"""
CFG = config.parse(CONFIG)
RELAYED = CFG.domains["relayed.example"]
DIRECT = CFG.domains["direct.example"]


@pytest.mark.parametrize("dom, rcpt_domain, route", [
    (RELAYED, "relayed.example", "relayed.example"),
    (RELAYED, "other.relayed.example", "relayed.example"),     # through the relay
    (RELAYED, "pc1.relayed.example", "pc1.relayed.example"),   # a route of its own
    (RELAYED, "x.pc1.relayed.example", "pc1.relayed.example"), # its subdomains too
    (RELAYED, "lab.relayed.example", "lab.relayed.example"),
    (DIRECT, "direct.example", "direct.example"),
    (DIRECT, "pc1.direct.example", "pc1.direct.example"),      # its own DNS
    (DIRECT, "PC2.Direct.Example.", "pc2.direct.example"),
])
def test_route_of(dom, rcpt_domain, route):
    assert routing.route_of(dom, rcpt_domain) == route


def test_relay_of_each_route():
    assert routing.relay_of(RELAYED, "relayed.example") == RELAYED.relay
    assert routing.relay_of(RELAYED, "pc1.relayed.example").nexthop == "[192.0.2.7]:25"
    assert routing.relay_of(RELAYED, "lab.relayed.example").mx_lookup
    assert routing.relay_of(DIRECT, "direct.example") is None
    assert routing.relay_of(DIRECT, "pc1.direct.example") is None


def test_transport_entries_nearest_wins_in_postfix_lookup_order():
    assert routing.transport_entries(DIRECT, "ondemand") == [
        ("direct.example", "ondemand:"), (".direct.example", "ondemand:")]
    keys = [k for k, _ in routing.transport_entries(RELAYED, "ondemand")]
    assert keys == ["relayed.example", ".relayed.example", "lab.relayed.example",
                    ".lab.relayed.example", "pc1.relayed.example", ".pc1.relayed.example"]


# -- own addresses ------------------------------------------------------------------

INTERFACES = ["127.0.0.1", "::1", "192.0.2.1", "fe80::1%eth0", "127.0.0.5"]


def no_dns(name):
    return {"mx.provider.example": ["198.51.100.9"]}.get(name, [])


@pytest.mark.parametrize("inet, proxy, expected", [
    ("all", "", {"127.0.0.1", "::1", "192.0.2.1", "fe80::1", "127.0.0.5"}),
    ("loopback-only", "", {"127.0.0.1", "::1", "127.0.0.5"}),
    ("192.0.2.1, [::1]", "", {"192.0.2.1", "::1"}),
    ("mx.provider.example", "203.0.113.4", {"198.51.100.9", "203.0.113.4"}),
    ("loopback-only", "mx.provider.example", {"127.0.0.1", "::1", "127.0.0.5",
                                              "198.51.100.9"}),
])
def test_own_addresses(inet, proxy, expected):
    assert routing.own_addresses(inet, proxy, INTERFACES, no_dns) == frozenset(expected)


# -- Postfix's MX rule ----------------------------------------------------------------

OWN_NAMES = frozenset({"mx.provider.example"})
OWN_ADDRS = frozenset({"192.0.2.1"})
ADDRS = {
    "mx.provider.example": ["192.0.2.1"],
    "mail.customer.example": ["198.51.100.20"],
    "backup.customer.example": ["198.51.100.21"],
    "alias-of-us.example": ["192.0.2.1"],       # another name for this host
    "noaddr.customer.example": [],
}


def targets(records, names=OWN_NAMES, addrs=OWN_ADDRS):
    choice = routing.mx_targets("customer.example", records, ADDRS, names, addrs)
    return [h for h, _ in choice.targets], choice


@pytest.mark.parametrize("name, records, expected, ours_best", [
    ("customer best, us backup", [(10, "mail.customer.example"), (20, "mx.provider.example")],
     ["mail.customer.example"], False),
    ("us best: nowhere (Postfix: loops back to myself)",
     [(10, "mx.provider.example"), (20, "mail.customer.example")], [], True),
    ("equal preference with us: dropped too",
     [(10, "mx.provider.example"), (10, "mail.customer.example")], [], True),
    ("worse than us: dropped", [(5, "backup.customer.example"), (10, "mx.provider.example"),
                                (20, "mail.customer.example")], ["backup.customer.example"],
     False),
    ("another name for our address is us", [(10, "alias-of-us.example"),
                                            (20, "mail.customer.example")], [], True),
    ("best MX without an address is skipped", [(5, "noaddr.customer.example"),
                                               (10, "mail.customer.example")],
     ["mail.customer.example"], False),
    ("trailing dots and case", [(10, "Mail.Customer.Example."), (20, "MX.provider.example.")],
     ["mail.customer.example"], False),
])
def test_mx_targets(name, records, expected, ours_best):
    hosts, choice = targets(records)
    assert hosts == expected, name
    assert choice.ours_best == ours_best, name
    if not expected:
        assert choice.problem


def test_mx_targets_our_name_without_an_address_is_skipped_as_postfix_does():
    addrs = {**ADDRS, "mx.provider.example": []}
    choice = routing.mx_targets("customer.example", [(10, "mx.provider.example"),
                                                     (20, "mail.customer.example")],
                                addrs, OWN_NAMES, OWN_ADDRS)
    assert [h for h, _ in choice.targets] == ["mail.customer.example"]


def test_mx_targets_only_unaddressed_hosts_above_us():
    hosts, choice = targets([(5, "noaddr.customer.example"), (10, "mx.provider.example")])
    assert hosts == [] and not choice.ours_best
    assert "more preferred than ours" in choice.problem


def test_mx_targets_null_mx():
    hosts, choice = targets([(0, ".")])
    assert hosts == [] and "null MX" in choice.problem


def test_mx_targets_name_rule_without_address_rule():
    # on a port other than 25 Postfix compares no addresses; our names still count
    hosts, _ = targets([(10, "alias-of-us.example"), (20, "mail.customer.example")],
                       addrs=frozenset())
    assert hosts == ["alias-of-us.example", "mail.customer.example"]


@pytest.mark.parametrize("protocols, types", [
    ("all", ("A", "AAAA")), ("ipv4", ("A",)), ("ipv6", ("AAAA",)),
    ("ipv4, ipv6", ("A", "AAAA")), ("", ("A", "AAAA")),
])
def test_record_types_follow_inet_protocols(protocols, types):
    from flushctl.poller.prober import record_types
    assert record_types(protocols) == types
