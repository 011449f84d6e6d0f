"""flushctl.gateway.gate: who may trigger a release, and how often (clock injected)."""

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flushctl.config import Domain
from flushctl.gateway.gate import (ALLOWED, NOT_ALLOWED, RATE_LIMITED, Gate, TokenBucket, bucket_key,
                           client_allowed)


def nets(*texts):
    return tuple(ipaddress.ip_network(t) for t in texts)


OPEN = Domain("open.example")
CLOSED = Domain("closed.example", flush_from=nets("192.0.2.0/24", "2001:db8::/32",
                                                   "198.51.100.7/32"))
DOMAINS = {d.name: d for d in (OPEN, CLOSED)}


# -- client_allowed ------------------------------------------------------------

@pytest.mark.parametrize("client", [
    "192.0.2.1", "203.0.113.99", "2001:db8::1", "2a00:1450::1", "::ffff:203.0.113.5",
    "127.0.0.1", "::1",
])
def test_no_flush_from_allows_anyone(client):
    assert client_allowed(OPEN, client) is True


@pytest.mark.parametrize("client, allowed", [
    ("192.0.2.0", True),
    ("192.0.2.5", True),
    ("192.0.2.255", True),
    ("192.0.3.0", False),
    ("192.0.1.255", False),
    ("198.51.100.7", True),
    ("198.51.100.8", False),
    ("203.0.113.5", False),
    ("2001:db8::1", True),
    ("2001:db8:ffff:ffff::1", True),
    ("2001:db9::1", False),
    ("2a00:1450::1", False),
    ("::ffff:192.0.2.5", True),          # IPv4-mapped IPv6 is the IPv4 client
    ("::FFFF:192.0.2.5", True),
    ("::ffff:c000:205", True),           # the same address, hex form
    ("::ffff:198.51.100.7", True),
    ("::ffff:203.0.113.5", False),
    ("::ffff:198.51.100.8", False),
    ("::192.0.2.5", False),              # IPv4-compatible (deprecated) is not mapped
    ("64:ff9b::192.0.2.5", False),       # NAT64 is not the IPv4 client either
])
def test_flush_from_networks(client, allowed):
    assert client_allowed(CLOSED, client) is allowed


def test_ipv4_network_does_not_admit_ipv6_client_and_vice_versa():
    v4 = Domain("v4.example", flush_from=nets("0.0.0.0/0"))
    v6 = Domain("v6.example", flush_from=nets("::/0"))
    assert client_allowed(v4, "192.0.2.1") is True
    assert client_allowed(v4, "2001:db8::1") is False
    assert client_allowed(v4, "::ffff:192.0.2.1") is True
    assert client_allowed(v6, "2001:db8::1") is True
    assert client_allowed(v6, "192.0.2.1") is False
    assert client_allowed(v6, "::ffff:192.0.2.1") is False   # mapped: judged as IPv4


@pytest.mark.parametrize("client", ["192.0.2.5", "::ffff:192.0.2.5", "2001:db8::1", ""])
def test_unknown_domain_never_allowed(client):
    assert client_allowed(None, client) is False
    assert Gate(DOMAINS, peers=frozenset({"192.0.2.5"})).check(client, "nothere.example",
                                                              0.0) == NOT_ALLOWED


@pytest.mark.parametrize("client", [
    "", "unknown", "localhost", "192.0.2", "192.0.2.256", "192.0.2.5/24", " 192.0.2.5",
    "192.0.2.5\n", "[2001:db8::1]", "2001:db8::1::1", "192.0.2.5:25", "0x7f000001", "1",
])
def test_garbage_client_address(client):
    assert client_allowed(OPEN, client) is False
    assert client_allowed(CLOSED, client) is False


def test_peers_admit_outside_flush_from_and_are_not_rate_limited():
    gate = Gate(DOMAINS, per_minute=1, burst=1, peers=frozenset({"10.1.2.3", "fd00::5"}))
    assert client_allowed(CLOSED, "10.1.2.3") is False
    for _ in range(5):
        assert gate.check("10.1.2.3", CLOSED.name, 0.0) == ALLOWED
    assert gate.check("::ffff:10.1.2.3", CLOSED.name, 0.0) == ALLOWED
    assert gate.check("fd00::5", CLOSED.name, 0.0) == ALLOWED
    assert gate.check("fd00::6", CLOSED.name, 0.0) == NOT_ALLOWED
    assert gate.check("203.0.113.5", CLOSED.name, 0.0) == NOT_ALLOWED
    assert gate.is_peer("10.1.2.3") and not gate.is_peer("garbage")


# -- TokenBucket ---------------------------------------------------------------

def test_token_bucket_takes_and_refills():
    bucket = TokenBucket(capacity=2, per_second=0.5, tokens=2, stamp=100.0)
    assert bucket.take(100.0) is True
    assert bucket.take(100.0) is True
    assert bucket.take(100.0) is False
    assert bucket.take(101.0) is False      # half a token
    assert bucket.take(102.0) is True       # a whole one
    assert bucket.take(1000.0) is True      # refill is capped at capacity ...
    assert bucket.take(1000.0) is True
    assert bucket.take(1000.0) is False     # ... so only two


# -- Gate.check ----------------------------------------------------------------

def test_defaults():
    gate = Gate(DOMAINS)
    assert gate.per_minute == 60.0
    assert gate.burst == 30.0
    assert gate.max_clients == 10000


def test_a_dozen_a_minute_always_allowed():
    gate = Gate(DOMAINS)
    now = 1000.0
    for _ in range(60):                      # an hour of it
        for i in range(12):
            assert gate.check("192.0.2.5", "closed.example", now + i * 5) == ALLOWED
        now += 60
    # even all at once
    gate = Gate(DOMAINS)
    assert [gate.check("192.0.2.5", "open.example", 5.0) for _ in range(12)] == [ALLOWED] * 12


def test_burst_larger_than_burst_is_rate_limited():
    gate = Gate(DOMAINS, per_minute=60, burst=30)
    results = [gate.check("203.0.113.5", "open.example", 50.0) for _ in range(35)]
    assert results == [ALLOWED] * 30 + [RATE_LIMITED] * 5


def test_small_burst_setting():
    gate = Gate(DOMAINS, per_minute=6, burst=3)
    results = [gate.check("203.0.113.5", "open.example", 0.0) for _ in range(4)]
    assert results == [ALLOWED, ALLOWED, ALLOWED, RATE_LIMITED]


def test_tokens_refill_with_time():
    gate = Gate(DOMAINS, per_minute=60, burst=30)
    client = "203.0.113.5"
    for _ in range(30):
        assert gate.check(client, "open.example", 0.0) == ALLOWED
    assert gate.check(client, "open.example", 0.0) == RATE_LIMITED
    assert gate.check(client, "open.example", 0.5) == RATE_LIMITED   # half a token
    assert gate.check(client, "open.example", 1.0) == ALLOWED        # one per second
    assert gate.check(client, "open.example", 1.0) == RATE_LIMITED
    # ten seconds later: ten more, not eleven
    assert [gate.check(client, "open.example", 11.0) for _ in range(11)] \
        == [ALLOWED] * 10 + [RATE_LIMITED]
    # a long pause refills only up to the burst
    assert [gate.check(client, "open.example", 10_000.0) for _ in range(31)] \
        == [ALLOWED] * 30 + [RATE_LIMITED]


def test_flooding_client_does_not_limit_another():
    gate = Gate(DOMAINS, per_minute=60, burst=30)
    for _ in range(1000):
        gate.check("203.0.113.66", "open.example", 7.0)
    assert gate.check("203.0.113.66", "open.example", 7.0) == RATE_LIMITED
    assert gate.check("192.0.2.5", "open.example", 7.0) == ALLOWED
    assert gate.check("192.0.2.5", "closed.example", 7.0) == ALLOWED
    assert gate.check("2001:db8::1", "closed.example", 7.0) == ALLOWED


def test_not_allowed_for_unknown_domain():
    gate = Gate(DOMAINS)
    assert gate.check("192.0.2.5", "unknown.example", 0.0) == NOT_ALLOWED
    assert gate.check("192.0.2.5", "", 0.0) == NOT_ALLOWED


def test_not_allowed_outside_flush_from():
    gate = Gate(DOMAINS)
    assert gate.check("203.0.113.5", "closed.example", 0.0) == NOT_ALLOWED
    assert gate.check("192.0.2.5", "closed.example", 0.0) == ALLOWED
    assert gate.check("::ffff:192.0.2.5", "closed.example", 0.0) == ALLOWED
    assert gate.check("garbage", "open.example", 0.0) == NOT_ALLOWED


def test_refused_triggers_count_against_the_bucket():
    # probing for domains costs tokens like any trigger
    gate = Gate(DOMAINS, per_minute=60, burst=5)
    assert [gate.check("203.0.113.5", f"d{i}.example", 0.0) for i in range(5)] \
        == [NOT_ALLOWED] * 5
    assert gate.check("203.0.113.5", "open.example", 0.0) == RATE_LIMITED


def test_bucket_table_never_grows_beyond_max_clients():
    gate = Gate(DOMAINS, max_clients=50)
    for i in range(500):
        gate.check(f"10.0.{i // 256}.{i % 256}", "open.example", float(i))
        assert len(gate.buckets) <= 50
    assert len(gate.buckets) == 50
    # the most recent clients are the ones remembered
    assert set(gate.buckets) == {f"10.0.{i // 256}.{i % 256}" for i in range(450, 500)}


def test_evicted_client_starts_with_a_full_bucket():
    gate = Gate(DOMAINS, burst=2, max_clients=2)
    assert gate.check("192.0.2.1", "open.example", 0.0) == ALLOWED
    assert gate.check("192.0.2.1", "open.example", 0.0) == ALLOWED
    assert gate.check("192.0.2.1", "open.example", 0.0) == RATE_LIMITED
    gate.check("192.0.2.2", "open.example", 0.0)
    gate.check("192.0.2.3", "open.example", 0.0)       # evicts 192.0.2.1
    assert "192.0.2.1" not in gate.buckets
    assert gate.check("192.0.2.1", "open.example", 0.0) == ALLOWED


# -- properties ----------------------------------------------------------------

_clients = st.sampled_from(["192.0.2.1", "192.0.2.2", "2001:db8::1", "203.0.113.9",
                            "::ffff:192.0.2.1", "junk"])


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.tuples(_clients, st.floats(min_value=0, max_value=5)), max_size=200),
       st.integers(min_value=1, max_value=4))
def test_table_size_bounded(events, max_clients):
    gate = Gate(DOMAINS, max_clients=max_clients)
    now = 0.0
    for client, step in events:
        now += step
        new = bucket_key(client) not in gate.buckets
        verdict = gate.check(client, "open.example", now)
        # a domain open to any address: refused only what is no address, else
        # only limited; a client the table does not know (first seen, or
        # evicted) starts with a full bucket
        answer = NOT_ALLOWED if client == "junk" else ALLOWED
        assert verdict == answer if new else verdict in (answer, RATE_LIMITED)
        assert len(gate.buckets) <= max_clients


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=3, allow_nan=False), min_size=1, max_size=300),
       st.integers(min_value=1, max_value=40), st.floats(min_value=1, max_value=600))
def test_never_more_than_burst_plus_refill(steps, burst, per_minute):
    gate = Gate(DOMAINS, per_minute=per_minute, burst=burst)
    now = 0.0
    allowed = 0
    for step in steps:
        now += step
        if gate.check("192.0.2.1", "open.example", now) == ALLOWED:
            allowed += 1
    assert allowed <= burst + now * per_minute / 60.0 + 1e-6


@settings(max_examples=500, deadline=None)
@given(st.integers(min_value=1, max_value=30), st.floats(min_value=1, max_value=600))
def test_under_the_rate_is_never_limited(burst, per_minute):
    gate = Gate(DOMAINS, per_minute=per_minute, burst=burst)
    interval = 60.0 / per_minute      # one trigger per refilled token
    for i in range(100):
        assert gate.check("192.0.2.1", "open.example", i * interval * 1.001) == ALLOWED


def test_ipv6_clients_share_a_bucket_per_64():
    from flushctl.gateway.gate import RATE_LIMITED, Gate, bucket_key
    assert bucket_key("2001:db8:1:2::5") == bucket_key("2001:db8:1:2:ffff::9")
    assert bucket_key("2001:db8:1:3::5") != bucket_key("2001:db8:1:2::5")
    assert bucket_key("::ffff:192.0.2.5") == "192.0.2.5"
    gate = Gate({}, per_minute=1, burst=2)
    gate.check("2001:db8:1:2::1", "x.example", 0.0)
    gate.check("2001:db8:1:2::2", "x.example", 0.0)
    assert gate.check("2001:db8:1:2::3", "x.example", 0.0) == RATE_LIMITED
