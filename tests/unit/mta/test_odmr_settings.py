"""The Postfix side of ODMR in `flushctl apply`'s plan: only ODMR domains
ask the ODMR daemon's socketmap, and switching ODMR off takes it all away."""

from __future__ import annotations

import pytest

from flushctl import config
from flushctl.mta import settings
from flushctl.mta.settings import SettingsError

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


def test_only_odmr_domains_reach_the_socketmap():
    p = plan(ODMR + HOME + PLAIN)
    first, second = [t.strip() for t in p.params["transport_maps"].split(", hash:")][:2]
    assert first == ("pipemap:{hash:/etc/postfix/flushctl/odmr_domains, "
                     "socketmap:unix:flushctl-odmr/map:odmr}")
    assert second.endswith("flushctl/transport")
    assert p.maps["odmr_domains"].splitlines()[1:] == [
        "home.example\thome.example", ".home.example\thome.example"]
    # the ordinary domain is in the hash transport table, never in the pipe's
    assert "customer.example" not in p.maps["odmr_domains"]
    assert "customer.example" in p.maps["transport"]
    entry = [e for e in p.services if e.startswith("odmr ")]
    assert entry and "soft_bounce=yes" in entry[0]
    assert "smtp_connection_cache_on_demand=no" in entry[0]
    assert "starttls" in entry[0]
    assert p.params["odmr_destination_concurrency_limit"] == "1"


@pytest.mark.parametrize("text", [PLAIN, ODMR + PLAIN])
def test_without_an_odmr_domain_nothing_of_it_is_written(text):
    p = plan(text)
    assert "pipemap" not in p.params["transport_maps"]
    assert not [e for e in p.services if e.startswith("odmr ")]


def test_switching_odmr_off_removes_the_map_and_the_service():
    on = plan(ODMR + HOME + PLAIN)
    raw = {"transport_maps": on.params["transport_maps"]}
    services = {settings.service_key(e): e for e in on.services}
    off = plan(PLAIN, raw=raw, previous_ours=on.ours, previous_services=on.our_services,
               services=services)
    assert "pipemap" not in off.params["transport_maps"]
    assert off.remove_services == ["odmr/unix"]


def test_the_map_socket_must_be_under_the_queue_directory():
    with pytest.raises(SettingsError, match="map_socket"):
        plan(ODMR + 'map_socket = "/run/odmr/map"\n' + HOME)
