"""The planning part of `flushctl apply`: what the plan manages, what it
keeps from the previous run, and the pure helpers around it (what the
instance's master.cf says about chroots, applied.json, which maps
changed, the removed domains' mail, the report).

test_settings.py and test_relay_networks.py cover the plan's rendering,
its lists, milters, submission and mynetworks one by one; this file covers
what they do not: parameters owned outright, only changes planned, a plan
that follows the previous one, and apply's own helpers.  Nothing here runs
Postfix: `postfix check`, postmap and the swap are the integration tests'.
"""

from __future__ import annotations

import json
import os

import pytest

from flushctl import config
from flushctl.mta import apply as applying
from flushctl.mta import removed_domains
from flushctl.mta import settings
from flushctl.mta.settings import SettingsError

DATA = settings.load_data()
MAP_DIR = "/etc/postfix/flushctl"
EXPANDED = {
    "queue_directory": "/var/spool/postfix",
    "mynetworks": "127.0.0.0/8",
    "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
}
CUSTOMER = '[domains."customer.example"]\nrelay = "[mail.customer.example]:25"\n'
LISTED = '[domains."listed.example"]\nrecipients = ["alice@listed.example"]\n'
SUBMISSION = """
[submission]
listen = "2587"
tls_cert_file = "{cert}"
tls_key_file = "/etc/ssl/private/mx.key"
"""


def make_config(*parts: str, path="/etc/flushctl/t.toml") -> config.Config:
    return config.parse("".join(parts), path)


def plan(cfg, raw=None, expanded=None, services=None, previous_ours=(), previous_services=(),
         chrooted=False, requeue_uid=None) -> settings.Plan:
    return settings.plan(cfg, DATA, dict(raw or {}), dict(expanded or EXPANDED),
                         dict(services or {}), set(previous_ours), smtpd_chrooted=chrooted,
                         previous_services=frozenset(previous_services),
                         requeue_uid=requeue_uid)


def applied(raw: dict, p: settings.Plan) -> dict:
    """main.cf as it reads once ``p`` is applied over ``raw``."""
    return {**raw, **p.params}


def services_after(services: dict, p: settings.Plan) -> dict:
    """master.cf's entries once ``p`` is applied over ``services``."""
    out = {k: v for k, v in services.items() if k not in p.remove_services}
    out.update({settings.service_key(e): e for e in p.services})
    return out


# -- what the plan manages ---------------------------------------------------------------

def test_only_parameters_that_differ_are_planned():
    cfg = make_config(CUSTOMER)
    fresh = plan(cfg)
    raw = {"enable_long_queue_ids": "yes", "defer_transports": "ondemand"}
    p = plan(cfg, raw=raw)
    assert "enable_long_queue_ids" not in p.params and "defer_transports" not in p.params
    assert set(p.params) == set(fresh.params) - set(raw)


@pytest.mark.parametrize("name, admin", [
    ("milter_default_action", "accept"),            # accept: mail would pass untagged
    ("smtpd_etrn_restrictions", "permit_mynetworks"),   # the gateway would be bypassed
    ("enable_long_queue_ids", "no"),                 # the ledger keys on queue ids
])
def test_parameters_we_own_outright_replace_the_admins_value(name, admin):
    """Lists keep the admin's entries after ours; the data's [parameters]
    are ours alone: an admin's value is replaced, not merged."""
    p = plan(make_config(CUSTOMER), raw={name: admin})
    assert p.params[name] == DATA["parameters"][name].format(
        policy="unix:private/flushctl-policy")
    assert admin not in settings.split_list(p.params[name])
    assert p.params[name] not in p.ours   # nothing to take back from a list next time


@pytest.mark.parametrize("spelling", ["${header_checks}", "$(header_checks)"])
def test_nested_header_checks_expands_every_spelling_of_header_checks(spelling):
    raw = {"header_checks": f"regexp:{MAP_DIR}/intake, pcre:/etc/postfix/mine",
           "nested_header_checks": f"{spelling}, pcre:/etc/postfix/nested"}
    p = plan(make_config(CUSTOMER), raw=raw)
    assert p.params["nested_header_checks"] == (f"regexp:{MAP_DIR}/strip_hold, "
                                                "pcre:/etc/postfix/mine, pcre:/etc/postfix/nested")


def test_nested_header_checks_drops_what_an_earlier_run_put_there():
    old = "regexp:/etc/postfix/flushctl/hold_tagged"
    raw = {"nested_header_checks": f"regexp:{MAP_DIR}/strip_hold, {old}, pcre:/b"}
    p = plan(make_config(CUSTOMER), raw=raw, previous_ours={old})
    assert p.params["nested_header_checks"] == f"regexp:{MAP_DIR}/strip_hold, pcre:/b"


@pytest.mark.parametrize("expanded, planned", [
    pytest.param("permit_mynetworks, reject_unauth_destination", False,
                 id="safe once expanded: left alone"),
    pytest.param("permit_mynetworks, permit", True, id="open once expanded: replaced"),
])
def test_relay_restrictions_are_judged_as_postfix_expands_them(expanded, planned):
    raw = {"smtpd_relay_restrictions": "$my_relay_rules"}
    p = plan(make_config(CUSTOMER), raw=raw,
             expanded=dict(EXPANDED, smtpd_relay_restrictions=expanded))
    assert ("smtpd_relay_restrictions" in p.params) is planned
    if planned:
        assert p.params["smtpd_relay_restrictions"] == DATA["relay_restrictions"]["value"]


def test_relay_networks_and_the_admins_mynetworks_together_too_wide_are_refused():
    """Each narrow enough alone (the config takes the /9), together more
    than a /8: an open relay made of two halves, refused before anything."""
    cfg = make_config('[relay]\nnetworks = ["12.0.0.0/9"]\n', CUSTOMER)
    mine = "127.0.0.0/8, 11.0.0.0/8"
    with pytest.raises(SettingsError, match="^mynetworks: .*together cover more than a /8"):
        plan(cfg, raw={"mynetworks": mine}, expanded=dict(EXPANDED, mynetworks=mine))


def test_the_plans_maps_carry_the_mail_owners_uid():
    cfg = make_config(CUSTOMER, LISTED)
    p = plan(cfg, requeue_uid=107)
    assert p.maps == settings.render_maps(cfg, requeue_uid=107)
    assert p.maps["intake"] != settings.render_maps(cfg)["intake"]
    assert set(p.maps) == {"relay_domains", "flush_domains", "transport", "relay_recipients",
                           "relay_recipient_domains", "intake", "strip_hold"}


# -- what is kept from the previous run --------------------------------------------------

def test_a_new_transport_name_takes_the_old_ones_place():
    """[postfix] transport renamed: the new service is written, the one
    the previous run wrote is removed, defer_transports names the new one
    only, and the transport map routes through it."""
    first_cfg = make_config(CUSTOMER)
    first = plan(first_cfg)
    raw, services = applied({}, first), services_after({"smtp/inet": "smtp inet n - n - - smtpd"},
                                                       first)
    cfg = make_config('[postfix]\ntransport = "hold-smtp"\n', CUSTOMER)
    p = plan(cfg, raw=raw, services=services, previous_ours=first.ours,
             previous_services=first.our_services)
    assert p.params == {"defer_transports": "hold-smtp"}
    assert [settings.service_key(e) for e in p.services] == ["hold-smtp/unix"]
    assert p.remove_services == ["ondemand/unix"]
    assert p.our_services == ["hold-smtp/unix"]
    assert "customer.example\thold-smtp:[mail.customer.example]:25" in p.maps["transport"]
    assert "ondemand" not in p.ours and "hold-smtp" in p.ours


def test_a_service_of_ours_the_admin_removed_is_not_removed_again():
    cfg = make_config(CUSTOMER)
    first = plan(cfg)
    services = services_after({}, first)
    p = plan(cfg, raw=applied({}, first), services=services, previous_ours=first.ours,
             previous_services={"ondemand/unix", "2587/inet"})
    assert p.remove_services == []
    assert p.services == [] and p.params == {}
    assert p.our_services == ["ondemand/unix"]   # not ours any more either


def test_a_changed_submission_setting_rewrites_its_entry_only():
    first = plan(make_config(CUSTOMER, SUBMISSION.format(cert="/etc/ssl/certs/old.pem")))
    services = services_after({}, first)
    p = plan(make_config(CUSTOMER, SUBMISSION.format(cert="/etc/ssl/certs/new.pem")),
             raw=applied({}, first), services=services, previous_ours=first.ours,
             previous_services=first.our_services)
    [entry] = p.services
    assert settings.service_key(entry) == "2587/inet"
    assert "-o smtpd_tls_cert_file=/etc/ssl/certs/new.pem" in entry
    assert p.remove_services == [] and p.params == {}


def test_what_the_last_run_owned_and_no_longer_wants_goes_in_one_run():
    """A config that drops recipient lists, relay networks and the unix
    milter socket: the next plan takes every entry of the last run's back
    out (the admin's stay), and the run after it changes nothing."""
    admin = {"relay_recipient_maps": "hash:/etc/postfix/admin_rcpt",
             "smtpd_milters": "inet:127.0.0.1:8891", "mynetworks": "127.0.0.0/8, 10.9.0.0/16",
             "relay_domains": "admin.example"}
    before = make_config('[relay]\nnetworks = ["192.0.2.0/24"]\n', CUSTOMER, LISTED)
    first = plan(before, raw=admin)
    raw, services = applied(admin, first), services_after({}, first)
    assert "192.0.2.0/24" in raw["mynetworks"]
    assert f"hash:{MAP_DIR}/relay_recipients" in raw["relay_recipient_maps"]

    after = make_config('[milter]\nlisten = "inet:127.0.0.1:8899"\n', CUSTOMER)
    second = plan(after, raw=raw, services=services, previous_ours=first.ours,
                  previous_services=first.our_services)
    raw = applied(raw, second)
    assert raw["relay_recipient_maps"] == "hash:/etc/postfix/admin_rcpt"
    assert raw["mynetworks"] == "127.0.0.0/8, 10.9.0.0/16"
    assert raw["smtpd_milters"] == "inet:127.0.0.1:8899, inet:127.0.0.1:8891"
    assert raw["relay_domains"] == f"hash:{MAP_DIR}/relay_domains, admin.example"
    assert second.services == [] and second.remove_services == []

    # applied.json now holds the second run's entries only
    third = plan(after, raw=raw, services=services_after(services, second),
                 previous_ours=second.ours, previous_services=second.our_services)
    assert third.params == {} and third.services == [] and third.remove_services == []


# -- apply's helpers: what master.cf says -------------------------------------------------

SMTPD = "smtp inet n - {chroot} - - smtpd"


@pytest.mark.parametrize("services, chrooted", [
    pytest.param({"smtp/inet": SMTPD.format(chroot="y")}, True, id="Debian's smtpd"),
    pytest.param({"smtp/inet": SMTPD.format(chroot="n")}, False, id="not chrooted"),
    pytest.param({"smtp/inet": SMTPD.format(chroot="-")}, False,
                 id="the default (n since Postfix 3.0)"),
    pytest.param({"smtp/inet": SMTPD.format(chroot="n"),
                  "2587/inet": "2587 inet n - y - - smtpd -o smtpd_tls_security_level=encrypt"},
                 True, id="any smtpd listening chrooted"),
    pytest.param({"smtp/inet": SMTPD.format(chroot="n"),
                  "relay/unix": "relay unix - - y - - smtp",
                  "cleanup/unix": "cleanup unix n - y - 0 cleanup"},
                 False, id="other services chrooted"),
    pytest.param({}, False, id="no smtpd"),
])
def test_is_smtpd_chrooted(services, chrooted):
    assert applying._smtpd_chrooted(services) is chrooted


def test_smtpd_behind_postscreen_is_seen_chrooted():
    services = {"smtp/inet": "smtp inet n - y - 1 postscreen",
                "smtpd/pass": "smtpd pass - - y - - smtpd",
                "dnsblog/unix": "dnsblog unix - - y - 0 dnsblog",
                "tlsproxy/unix": "tlsproxy unix - - y - 0 tlsproxy"}
    assert applying._smtpd_chrooted(services) is True


@pytest.mark.parametrize("entry, chrooted", [
    pytest.param("cleanup unix n - y - 0 cleanup", True, id="chrooted"),
    pytest.param("cleanup unix n - n - 0 cleanup", False, id="not chrooted"),
    pytest.param("cleanup unix n - - - 0 cleanup", False, id="the default"),
    pytest.param(None, False, id="no cleanup entry"),
])
def test_is_cleanup_chrooted(entry, chrooted):
    services = {"smtp/inet": SMTPD.format(chroot="y")}
    if entry is not None:
        services["cleanup/unix"] = entry
    assert applying._cleanup_chrooted(services) is chrooted


# -- applied.json: what the previous run owned ------------------------------------------

@pytest.fixture
def instance(tmp_path):
    """A config whose state and Postfix directories are scratch ones."""
    (tmp_path / "etc").mkdir()
    return make_config(f'[state]\ndirectory = "{tmp_path}/state"\n'
                       f'[postfix]\nconfig_directory = "{tmp_path}/etc"\n', CUSTOMER,
                       path=str(tmp_path / "flushctl.toml"))


@pytest.mark.parametrize("content", [
    pytest.param(None, id="never applied"),
    pytest.param("{not json", id="garbled"),
    pytest.param("", id="empty"),
])
def test_without_a_readable_last_run_nothing_is_ours(instance, content):
    if content is not None:
        os.makedirs(instance.state_directory)
        with open(os.path.join(instance.state_directory, applying.STATE_FILE), "w") as fh:
            fh.write(content)
    assert applying._previous(instance) == (set(), frozenset())
    assert applying._applied(instance).get("kept_removed", []) == []


def test_what_a_run_saves_is_what_the_next_run_reads(instance):
    p = plan(instance, services={}, requeue_uid=None)
    applying._save_ours(instance, p, ["zeta.example", "alpha.example"])
    assert applying._previous(instance) == (set(p.ours), frozenset(p.our_services))
    assert applying._applied(instance)["kept_removed"] == ["alpha.example", "zeta.example"]
    # written whole under a name of its own, then renamed: nothing else is left
    assert os.listdir(instance.state_directory) == [applying.STATE_FILE]
    # and the next run's plan, fed what was saved, changes nothing
    ours, services = applying._previous(instance)
    again = plan(instance, raw=applied({}, p), services=services_after({}, p),
                 previous_ours=ours, previous_services=services)
    assert again.params == {} and again.services == [] and again.remove_services == []


# -- which maps changed ----------------------------------------------------------------

def write_maps(cfg, maps, db=True):
    directory = settings.map_dir(cfg)
    os.makedirs(directory, exist_ok=True)
    for name, text in maps.items():
        with open(os.path.join(directory, name), "w") as fh:
            fh.write(text)
        if db and name in settings.HASH_MAPS:
            open(os.path.join(directory, name + ".db"), "w").close()


def test_every_map_is_built_the_first_time(instance):
    maps = settings.render_maps(instance)
    assert applying._changed_maps(instance, maps) == list(maps)


def test_maps_as_they_are_are_not_built_again(instance):
    maps = settings.render_maps(instance)
    write_maps(instance, maps)
    assert applying._changed_maps(instance, maps) == []


def test_a_map_whose_text_differs_is_built(instance):
    maps = settings.render_maps(instance)
    write_maps(instance, maps)
    grown = settings.render_maps(make_config(
        f'[state]\ndirectory = "{instance.state_directory}"\n'
        f'[postfix]\nconfig_directory = "{instance.config_directory}"\n', CUSTOMER, LISTED,
        path=instance.path))
    assert applying._changed_maps(instance, grown) == [
        "relay_domains", "flush_domains", "transport", "relay_recipients"]


def test_a_hash_map_without_its_db_is_built_a_regexp_map_needs_none(instance):
    maps = settings.render_maps(instance)
    write_maps(instance, maps, db=False)
    assert applying._changed_maps(instance, maps) == list(settings.HASH_MAPS)
    assert "intake" not in settings.HASH_MAPS and "strip_hold" not in settings.HASH_MAPS


# -- the mail of removed domains -------------------------------------------------------

HELD = {"gone.example": (3, 4096), "old.example": (1, 700), "kept.example": (2, 10)}


@pytest.mark.parametrize("held, kept", [
    pytest.param({}, set(), id="nothing held"),
    pytest.param(HELD, set(HELD), id="all kept by an earlier --keep-removed"),
])
def test_nothing_pending_does_not_stop_the_apply(instance, held, kept):
    assert removed_domains.refuse_removed(instance, held, kept) is None


def test_mail_of_a_removed_domain_stops_the_apply_naming_it(instance):
    with pytest.raises(applying.ApplyError) as info:
        removed_domains.refuse_removed(instance, HELD, {"kept.example"})
    text = str(info.value)
    assert text.startswith(f"{instance.path}: no longer names domains whose mail is held here "
                           "(gone.example: 3 held message(s), 4096 bytes; old.example: "
                           "1 held message(s), 700 bytes); ")
    assert "kept.example" not in text
    for option in ("--release-removed", "--purge-removed", "--keep-removed"):
        assert option in text


@pytest.mark.parametrize("held, action, lines", [
    pytest.param(HELD, "keep", [
        "gone.example: kept 3 held message(s) of a removed domain (flushctl status shows them)",
        "kept.example: kept 2 held message(s) of a removed domain (flushctl status shows them)",
        "old.example: kept 1 held message(s) of a removed domain (flushctl status shows them)",
    ], id="kept: said, sorted"),
    pytest.param(HELD, None, [], id="no option (kept earlier): nothing said"),
    pytest.param({}, "keep", [], id="nothing held"),
    pytest.param({}, "release", [], id="nothing held to release"),
    pytest.param({}, "purge", [], id="nothing held to purge"),
])
def test_settling_without_touching_the_mail(instance, held, action, lines):
    report = applying.ApplyReport()
    removed_domains.settle_removed(instance, held, action, report)
    assert report.removed_domains == lines
    assert not os.path.exists(instance.state_directory)   # no ledger opened, nothing made


# -- the report -----------------------------------------------------------------------

def test_a_dry_run_says_what_it_would_do():
    report = applying.ApplyReport(changed_params={"defer_transports": "ondemand"},
                                  services=["ondemand unix - - n - - smtp"],
                                  removed_services=["2587/inet"], maps=["transport"],
                                  dry_run=True)
    assert report.changed
    assert report.lines() == ["would set defer_transports = ondemand",
                              "would write master.cf: ondemand unix - - n - - smtp",
                              "would remove master.cf: 2587/inet",
                              "would build map transport"]


def test_a_run_says_what_it_did():
    report = applying.ApplyReport(changed_params={"defer_transports": "ondemand"},
                                  maps=["transport", "intake"], reloaded=True,
                                  removed_domains=["gone.example: deleted 3 held message(s)"])
    assert report.lines() == ["set defer_transports = ondemand", "built map transport",
                              "built map intake", "reloaded postfix",
                              "gone.example: deleted 3 held message(s)"]


@pytest.mark.parametrize("report, lines", [
    pytest.param(applying.ApplyReport(), ["nothing to change"], id="nothing"),
    pytest.param(applying.ApplyReport(dry_run=True), ["nothing to change"], id="dry run"),
    pytest.param(applying.ApplyReport(removed_domains=["a.example: kept 1 ..."]),
                 ["a.example: kept 1 ..."], id="only the removed domains' mail"),
])
def test_a_run_with_nothing_to_change(report, lines):
    assert not report.changed    # nothing for the swap to do
    assert report.lines() == lines


def test_the_plans_entries_survive_a_json_round_trip(instance):
    """applied.json keeps lists, in order: what the next plan compares against."""
    p = plan(make_config(CUSTOMER, SUBMISSION.format(cert="/c.pem")))
    applying._save_ours(instance, p, [])
    with open(os.path.join(instance.state_directory, applying.STATE_FILE)) as fh:
        data = json.load(fh)
    assert data == {"ours": p.ours, "services": ["ondemand/unix", "2587/inet"],
                    "kept_removed": []}
