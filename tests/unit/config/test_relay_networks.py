"""[relay] networks: customer networks that may send outbound mail through us."""

import pytest

from flushctl import config

from flushctl.mta import settings
from flushctl.config import ConfigError

EXPANDED = {"queue_directory": "/var/spool/postfix", "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination"}


def plan(text, raw=None, previous=frozenset()):
    cfg = config.parse(text, "t.toml")
    return settings.plan(cfg, settings.load_data(), raw or {}, EXPANDED, {}, set(previous),
                         False)


def test_networks_join_mynetworks_with_loopback_kept():
    p = plan('[relay]\nnetworks = ["192.0.2.0/24", "2001:db8::/32"]\n')
    assert p.params["mynetworks"] == "192.0.2.0/24, [2001:db8::]/32, 127.0.0.0/8, [::1]/128"
    assert "192.0.2.0/24" in p.ours


def test_admin_mynetworks_kept_and_second_plan_changes_nothing():
    raw = {"mynetworks": "127.0.0.0/8, 10.9.0.0/16"}
    first = plan('[relay]\nnetworks = ["192.0.2.0/24"]\n', raw)
    assert first.params["mynetworks"] == "192.0.2.0/24, 127.0.0.0/8, 10.9.0.0/16"
    second = plan('[relay]\nnetworks = ["192.0.2.0/24"]\n',
                  {**raw, **first.params}, set(first.ours))
    assert "mynetworks" not in second.params


def test_removed_network_leaves_mynetworks():
    p = plan("", {"mynetworks": "192.0.2.0/24, 127.0.0.0/8"}, {"192.0.2.0/24"})
    assert p.params["mynetworks"] == "127.0.0.0/8"


def test_no_networks_leaves_an_admin_mynetworks_alone():
    p = plan("", {"mynetworks": "127.0.0.0/8, 10.9.0.0/16"})
    assert "mynetworks" not in p.params


@pytest.mark.parametrize("value, words", [
    ('["0.0.0.0/0"]', "open relay"),
    ('["::/0"]', "open relay"),
    # halves of everyone, and anything wider than a /8 (IPv4) or a /32 (IPv6)
    ('["0.0.0.0/1", "128.0.0.0/1"]', "0.0.0.0/1 is wider than a /8"),
    ('["::/1", "8000::/1"]', "::/1 is wider than a /32"),
    ('["10.0.0.0/7"]', "10.0.0.0/7 is wider than a /8"),
    ('["2a00::/31"]', "2a00::/31 is wider than a /32"),
    ('["::ffff:0.0.0.0/97"]', "is wider than a /8"),
    # each narrow enough, together more than a /8
    ('["11.0.0.0/8", "12.0.0.0/9"]', "together cover more than a /8"),
    ('["2a00::/32", "2a01::/33"]', "together cover more than a /32"),
    ('["not-a-net"]', "not an IP network"),
    ('"192.0.2.0/24"', "must be a list"),
])
def test_bad_networks_are_named(value, words):
    """Each refusal names the network (or the networks) that make it one."""
    with pytest.raises(ConfigError) as info:
        config.parse(f"[relay]\nnetworks = {value}\n", "t.toml")
    assert str(info.value).startswith("t.toml: relay.networks: ")
    assert words in str(info.value)



@pytest.mark.parametrize("value", [
    '["10.0.0.0/8"]', '["2001:db8::/32"]', '["10.0.0.0/9", "10.128.0.0/9"]',
    '["192.0.2.0/24", "198.51.100.0/24", "2001:db8::/48"]',
    # the private ranges together are nobody on the Internet
    '["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"]',
])
def test_customer_networks_up_to_a_slash_8_are_fine(value):
    assert config.parse(f"[relay]\nnetworks = {value}\n", "t.toml").relay_networks
