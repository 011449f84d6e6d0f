"""The Postfix side of ODMR in `flushctl apply`'s plan: an ODMR domain's
mail goes to its relay on loopback, never anywhere else, and switching
ODMR off takes the service away."""

from __future__ import annotations

import ipaddress

from flushctl import config
from flushctl.mta import settings
from flushctl.mta.routing import odmr_address

DATA = settings.load_data()
EXPANDED = {
    "queue_directory": "/var/spool/postfix",
    "mynetworks": "127.0.0.0/8",
    "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
}
ODMR = '[odmr]\nlisten = "0.0.0.0:366"\n'
HOME = '[domains."home.example"]\nodmr = true\nusers = ["cust1"]\n'
PLAIN = '[domains."customer.example"]\nrelay = "[mail.customer.example]:25"\n'


def plan(text, raw=None, previous_ours=(), previous_services=(), services=None):
    cfg = config.parse(text, "/etc/flushctl/t.toml")
    return settings.plan(cfg, DATA, dict(raw or {}), dict(EXPANDED), dict(services or {}),
                         set(previous_ours),
                         smtpd_chrooted=False, previous_services=frozenset(previous_services))


def test_an_odmr_domains_mail_goes_to_its_relay_on_loopback_only():
    p = plan(ODMR + HOME + PLAIN)
    address = odmr_address("home.example")
    assert ipaddress.ip_address(address).is_loopback and not address.startswith("127.0.")
    lines = p.maps["transport"].splitlines()
    assert f"home.example\todmr:[{address}]:367" in lines
    assert f".home.example\todmr:[{address}]:367" in lines
    assert "customer.example\tondemand:[mail.customer.example]:25" in lines
    # a deferred transport: only releases send
    assert p.params["defer_transports"].split(", ")[:2] == ["odmr", "ondemand"]
    entry = [e for e in p.services if e.startswith("odmr ")]
    assert entry and "soft_bounce=yes" in entry[0]
    assert "smtp_connection_cache_on_demand=no" in entry[0]
    assert "starttls" in entry[0] and "smtp_fallback_relay=" in entry[0]
    assert p.params["odmr_destination_concurrency_limit"] == "1"


def test_the_relay_address_is_the_same_everywhere():
    assert odmr_address("home.example") == odmr_address("home.example")
    assert odmr_address("home.example") != odmr_address("other.example")


def test_without_an_odmr_domain_nothing_of_it_is_written():
    for text in (PLAIN, ODMR + PLAIN):
        p = plan(text)
        assert "odmr" not in p.params["defer_transports"]
        assert not [e for e in p.services if e.startswith("odmr ")]


def test_switching_odmr_off_removes_the_service():
    on = plan(ODMR + HOME + PLAIN)
    raw = {"defer_transports": on.params["defer_transports"]}
    services = {settings.service_key(e): e for e in on.services}
    off = plan(PLAIN, raw=raw, previous_ours=on.ours, previous_services=on.our_services,
               services=services)
    assert off.params["defer_transports"] == "ondemand"
    assert off.remove_services == ["odmr/unix"]
