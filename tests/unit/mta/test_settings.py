"""flushctl.mta.settings: what the Postfix instance must look like (pure)."""

import pytest

from flushctl import config

from flushctl.mta import settings
from flushctl.mta.settings import SettingsError

DATA = settings.load_data()

BASE = """
[postfix]
config_directory = "/etc/postfix"

[milter]
listen = "{listen}"
"""

CUSTOMER = """
[domains."customer.example"]
relay = "[mail.customer.example]:25"
"""

LISTED = """
[domains."listed.example"]
recipients = ["alice@listed.example", "Bob@listed.example"]
"""

OPEN = """
[domains."open.example"]
"""

EXPANDED = {
    "queue_directory": "/var/spool/postfix",
    "mynetworks": "127.0.0.0/8",
    "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
}

MAP_DIR = "/etc/postfix/flushctl"
OUR_MILTER = "unix:/var/spool/postfix/flushctl/milter.sock"


def make_config(*domains, listen="unix:/var/spool/postfix/flushctl/milter.sock"):
    return config.parse(BASE.format(listen=listen) + "".join(domains), "/etc/flushctl/t.toml")


def run_plan(cfg, raw=None, expanded=None, services=None, previous_ours=frozenset(),
             chrooted=False):
    return settings.plan(cfg, DATA, dict(raw or {}), dict(expanded or EXPANDED),
                         dict(services or {}), set(previous_ours), smtpd_chrooted=chrooted)


# -- split_list ----------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("", []),
    ("   ", []),
    ("a", ["a"]),
    ("a,b", ["a", "b"]),
    ("a, b", ["a", "b"]),
    ("a b\tc\n d", ["a", "b", "c", "d"]),
    (" ,a,, ,b, ", ["a", "b"]),
    ("inline:{a=b, c=d}", ["inline:{a=b, c=d}"]),
    ("hash:/x, inline:{a=b, c=d}, y", ["hash:/x", "inline:{a=b, c=d}", "y"]),
    ("inline:{ {a = b}, {c = d} } z", ["inline:{ {a = b}, {c = d} }", "z"]),
    ("permit_mynetworks,reject_unauth_destination",
     ["permit_mynetworks", "reject_unauth_destination"]),
])
def test_split_list(value, expected):
    assert settings.split_list(value) == expected


# -- merge_list ----------------------------------------------------------------

def test_merge_list_ours_first_admin_kept():
    assert settings.merge_list(["ours"], "admin1, admin2", set()) == "ours, admin1, admin2"


def test_merge_list_empty_current():
    assert settings.merge_list(["a", "b"], "", set()) == "a, b"


def test_merge_list_ours_moves_to_front():
    assert settings.merge_list(["ours"], "admin1 ours admin2", set()) == "ours, admin1, admin2"


def test_merge_list_drops_our_stale_entries():
    merged = settings.merge_list(["new"], "old, admin, new", {"old", "new"})
    assert merged == "new, admin"


def test_merge_list_no_duplicates():
    assert settings.merge_list(["a", "a"], "b, b, a, c", set()) == "a, b, c"


def test_merge_list_keeps_inline_tables_whole():
    merged = settings.merge_list(["ours"], "inline:{x=y, z=w}", set())
    assert merged == "ours, inline:{x=y, z=w}"


@pytest.mark.parametrize("current, previous", [
    ("", set()),
    ("admin1, admin2", set()),
    ("old, admin, ours", {"old"}),
    ("admin ours admin", {"ours"}),
])
def test_merge_list_idempotent(current, previous):
    once = settings.merge_list(["ours", "ours2"], current, previous)
    twice = settings.merge_list(["ours", "ours2"], once, previous)
    assert once == twice


def test_merge_list_nothing_of_ours():
    assert settings.merge_list([], "ours, admin", {"ours"}) == "admin"
    assert settings.merge_list([], "ours", {"ours"}) == ""


# -- milter_spec ---------------------------------------------------------------

def test_milter_spec_chrooted_inside_queue_dir():
    cfg = make_config()
    assert settings.milter_spec(cfg, "/var/spool/postfix", True) == "unix:/flushctl/milter.sock"
    assert settings.milter_spec(cfg, "/var/spool/postfix/", True) == "unix:/flushctl/milter.sock"


def test_milter_spec_chrooted_outside_queue_dir():
    cfg = make_config(listen="unix:/run/flushctl/milter.sock")
    with pytest.raises(SettingsError, match="milter.listen"):
        settings.milter_spec(cfg, "/var/spool/postfix", True)


def test_milter_spec_chrooted_sibling_prefix_is_outside():
    cfg = make_config(listen="unix:/var/spool/postfix2/milter.sock")
    with pytest.raises(SettingsError):
        settings.milter_spec(cfg, "/var/spool/postfix", True)


def test_milter_spec_not_chrooted_is_absolute():
    cfg = make_config(listen="unix:/run/flushctl/milter.sock")
    assert settings.milter_spec(cfg, "/var/spool/postfix", False) == \
        "unix:/run/flushctl/milter.sock"


@pytest.mark.parametrize("chrooted", [True, False])
def test_milter_spec_inet_unchanged(chrooted):
    cfg = make_config(listen="inet:127.0.0.1:8899")
    assert settings.milter_spec(cfg, "/var/spool/postfix", chrooted) == "inet:127.0.0.1:8899"


# -- render_maps ---------------------------------------------------------------

def test_render_maps():
    cfg = make_config(CUSTOMER, LISTED, OPEN)
    maps = settings.render_maps(cfg)
    assert set(maps) >= {"relay_domains", "transport", "relay_recipients"}

    transport = maps["transport"].splitlines()
    assert transport[0].startswith("#")
    assert "customer.example\tondemand:[mail.customer.example]:25" in transport
    assert ".customer.example\tondemand:[mail.customer.example]:25" in transport
    # without a relay, an empty next hop: each host under the domain is
    # routed by its own DNS (pc1.listed.example by pc1's MX, else its address)
    assert "listed.example\tondemand:" in transport
    assert ".listed.example\tondemand:" in transport
    assert len(transport) == 1 + 6

    relay = maps["relay_domains"].splitlines()
    assert relay[1:] == ["customer.example\tOK", "listed.example\tOK", "open.example\tOK"]

    recipients = maps["relay_recipients"].splitlines()
    assert recipients[1:] == [
        "alice@listed.example\tOK",
        "bob@listed.example\tOK",
    ]
    # domains without a list: the domain and its subdomains, any user
    any_user = maps["relay_recipient_domains"].splitlines()
    assert any_user[1:] == [
        "/@(.+\\.)?customer\\.example$/\tOK",
        "/@(.+\\.)?open\\.example$/\tOK",
    ]
    import re
    pattern = re.compile(any_user[1].split("/")[1], re.IGNORECASE)
    assert pattern.search("x@customer.example") and pattern.search("x@a.b.customer.example")
    assert not pattern.search("x@notcustomer.example")
    assert not pattern.search("x@customer.example.evil")


HOSTS_CONFIG = """
[domains."customer.example"]
relay = "[mail.customer.example]:25"
hosts = {"pc1.customer.example" = "[192.0.2.7]:25", "pc2.customer.example" = "pc2.customer.example"}
"""


def test_render_maps_hosts_with_routes_of_their_own():
    cfg = config.parse(HOSTS_CONFIG, "/etc/flushctl/t.toml")
    transport = settings.render_maps(cfg)["transport"].splitlines()[1:]
    assert transport == [
        "customer.example\tondemand:[mail.customer.example]:25",
        ".customer.example\tondemand:[mail.customer.example]:25",
        "pc1.customer.example\tondemand:[192.0.2.7]:25",
        ".pc1.customer.example\tondemand:[192.0.2.7]:25",
        "pc2.customer.example\tondemand:pc2.customer.example:25",
        ".pc2.customer.example\tondemand:pc2.customer.example:25",
    ]


def test_intake_table_drops_the_requeue_trace_header_and_every_header_of_ours():
    maps = settings.render_maps(make_config(CUSTOMER), requeue_uid=107)
    lines = maps["intake"].splitlines()[1:]
    assert lines[0].endswith(" IGNORE")
    import re
    drop = re.compile(lines[0].split("/")[1])
    # what pickup writes for requeued mail (owned by the mail_owner, uid 107)
    assert drop.search("Received: by mx.provider.test (Postfix, from userid 107)\n"
                       "\tid 4jcczJ2wnFzJ9C2; Tue,  1 Dec 2026 22:24:48 +0000 (UTC)")
    # a local user's submission, and ordinary SMTP trace headers, are kept
    assert not drop.search("Received: by mx.provider.test (Postfix, from userid 1000)")
    assert not drop.search("Received: by mx.provider.test (Postfix, from userid 1070)")
    assert not drop.search("Received: from [127.0.0.1] (localhost [127.0.0.1])\n"
                           "\tby mx.provider.test (Postfix) with ESMTP id 109E520C271")
    # nothing is held by a header: the hold header of earlier versions goes
    assert lines[1] == "/^X-OnDemand-Hold:/ IGNORE"
    assert "HOLD" not in maps["intake"]
    ours = re.compile(lines[1].split("/")[1], re.I)
    assert ours.search("x-ondemand-hold: 0123")
    assert not ours.search("X-OnDemand-Domain: a.example")   # the milter's, kept by requeues
    assert not ours.search("Subject: X-OnDemand-Hold:")
    assert "Received" not in settings.render_maps(make_config(CUSTOMER))["intake"]


def test_render_maps_header_names_config_file():
    maps = settings.render_maps(make_config(CUSTOMER))
    for name in ("relay_domains", "transport", "relay_recipients"):
        assert maps[name].startswith("# Written by flushctl apply from /etc/flushctl/t.toml")


def test_render_maps_custom_transport_name():
    cfg = config.parse('[postfix]\ntransport = "hold-smtp"\n' + CUSTOMER)
    transport = settings.render_maps(cfg)["transport"].splitlines()
    assert "customer.example\thold-smtp:[mail.customer.example]:25" in transport


# -- safety checks -------------------------------------------------------------

@pytest.mark.parametrize("value", [
    "0.0.0.0/0",
    "::/0",
    "[::]/0",
    "127.0.0.0/8, 0.0.0.0/0",
    "127.0.0.0/8 [::]/0",
    "10.0.0.0/8\n  0.0.0.0/0",
    "0.0.0.0/0.0.0.0",
    "127.0.0.0/8, 0.0.0.0/1, 128.0.0.0/1",
    "[::]/1, [8000::]/1",
    "11.0.0.0/8, 12.0.0.0/8",
])
def test_check_mynetworks_open_relay(value):
    with pytest.raises(SettingsError, match="open relay"):
        settings.check_mynetworks(value, DATA)


@pytest.mark.parametrize("value", [
    "",
    "127.0.0.0/8",
    "127.0.0.0/8 [::1]/128",
    "127.0.0.0/8, 192.0.2.0/24, [2001:db8::]/32",
    "127.0.0.0/8, 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16",
    "hash:/etc/postfix/network_table",
    "$myhostname",
])
def test_check_mynetworks_ok(value):
    assert settings.check_mynetworks(value, DATA) is None


@pytest.mark.parametrize("value, ok", [
    ("permit_mynetworks, reject_unauth_destination", True),
    ("permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination", True),
    ("reject_unauth_destination", True),
    ("permit_mynetworks reject_unauth_destination permit", True),
    ("", False),
    ("permit_mynetworks", False),
    ("permit_mynetworks, permit", False),
    ("permit, reject_unauth_destination", False),
    ("permit_mynetworks, permit, reject_unauth_destination", False),
    ("permit_auth_destination, reject_unauth_destination", False),
    ("permit_mynetworks, reject", False),
])
def test_relay_restrictions_ok(value, ok):
    assert settings.relay_restrictions_ok(value, DATA) is ok


# -- plan ----------------------------------------------------------------------

def fill(template, milter=OUR_MILTER):
    return template.format(transport="ondemand", map_dir=MAP_DIR, milter=milter,
                           cleanup_milter=milter, policy="unix:private/flushctl-policy")


SERVICE = fill(DATA["service"]["entry"])


def test_plan_fresh_instance():
    cfg = make_config(CUSTOMER)
    p = run_plan(cfg)
    # the entries the design requires, whatever else settings.toml adds
    required = {
        "relay_domains": f"hash:{MAP_DIR}/relay_domains",
        "transport_maps": f"hash:{MAP_DIR}/transport",
        "defer_transports": "ondemand",
        "fast_flush_domains": f"hash:{MAP_DIR}/flush_domains",
        "smtpd_milters": OUR_MILTER,
        "enable_long_queue_ids": "yes",
        "milter_default_action": "tempfail",
    }
    for name, value in required.items():
        assert p.params.get(name) == value, name
    assert p.params["smtpd_etrn_restrictions"]   # never empty: empty lets anyone ETRN
    # exactly the data's parameters and lists, each list holding only our entries
    assert set(p.params) == set(DATA["parameters"]) | set(DATA["lists"]) | \
        {"nested_header_checks"}
    assert p.params["nested_header_checks"] == f"regexp:{MAP_DIR}/strip_hold"
    for name, value in DATA["parameters"].items():
        assert p.params[name] == fill(value)
    for name, templates in DATA["lists"].items():
        assert p.params[name] == ", ".join(fill(t) for t in templates)
    assert "relay_recipient_maps" not in p.params
    assert "smtpd_relay_restrictions" not in p.params
    assert p.services == [SERVICE]
    assert p.services[0].split()[:8] == ["ondemand", "unix", "-", "-", "n", "-", "-", "smtp"]
    assert p.maps == settings.render_maps(cfg)
    assert f"hash:{MAP_DIR}/relay_domains" in p.ours
    assert OUR_MILTER in p.ours
    assert "ondemand" in p.ours


def test_plan_second_run_is_idempotent():
    cfg = make_config(CUSTOMER)
    first = run_plan(cfg)
    raw = dict(first.params)
    services = {"ondemand/unix": first.services[0]}
    second = run_plan(cfg, raw=raw, services=services)
    assert second.params == {}
    assert second.services == []
    # and with the previous run's entries known as ours
    third = run_plan(cfg, raw=raw, services=services, previous_ours=set(first.ours))
    assert third.params == {}
    assert third.services == []


def test_plan_service_whitespace_insensitive():
    cfg = make_config(CUSTOMER)
    first = run_plan(cfg)
    services = {"ondemand/unix": "   ".join(SERVICE.split()) + "\n"}
    assert run_plan(cfg, raw=first.params, services=services).services == []


def test_plan_service_differs():
    cfg = make_config(CUSTOMER)
    services = {"ondemand/unix": SERVICE.replace(" n ", " y ", 1)}
    assert services["ondemand/unix"] != SERVICE
    assert run_plan(cfg, services=services).services == [SERVICE]


def test_plan_keeps_admin_milter_after_ours():
    cfg = make_config(CUSTOMER)
    p = run_plan(cfg, raw={"smtpd_milters": "inet:127.0.0.1:8891"})
    assert p.params["smtpd_milters"] == f"{OUR_MILTER}, inet:127.0.0.1:8891"


def test_plan_keeps_admin_entries_in_lists():
    cfg = make_config(CUSTOMER)
    raw = {"relay_domains": "admin.example", "transport_maps": "hash:/etc/postfix/transport"}
    p = run_plan(cfg, raw=raw)
    assert p.params["relay_domains"] == f"hash:{MAP_DIR}/relay_domains, admin.example"
    assert p.params["transport_maps"] == \
        f"hash:{MAP_DIR}/transport, hash:/etc/postfix/transport"


def test_plan_drops_previous_entries_no_longer_ours():
    cfg = make_config(CUSTOMER, listen="inet:127.0.0.1:8899")
    raw = {"smtpd_milters": f"{OUR_MILTER}, inet:127.0.0.1:8891"}
    p = run_plan(cfg, raw=raw, previous_ours={OUR_MILTER})
    assert p.params["smtpd_milters"] == "inet:127.0.0.1:8899, inet:127.0.0.1:8891"


def test_plan_chrooted_milter_path():
    p = run_plan(make_config(CUSTOMER), chrooted=True)
    assert p.params["smtpd_milters"] == "unix:/flushctl/milter.sock"
    assert p.params["non_smtpd_milters"] == \
        "{ unix:/flushctl/milter.sock, default_action=accept }"


def test_cleanup_names_the_milter_in_its_own_chroot():
    """non_smtpd_milters: cleanup connects itself, smtpd hands its milter
    connection over; each names the socket as its chroot shows it."""
    cfg = make_config(CUSTOMER)
    p = settings.plan(cfg, DATA, {}, dict(EXPANDED), {}, set(), smtpd_chrooted=True,
                      cleanup_chrooted=False)
    assert p.params["smtpd_milters"] == "unix:/flushctl/milter.sock"
    assert p.params["non_smtpd_milters"] == f"{{ {OUR_MILTER}, default_action=accept }}"
    p = settings.plan(cfg, DATA, {}, dict(EXPANDED), {}, set(), smtpd_chrooted=False,
                      cleanup_chrooted=True)
    assert p.params["smtpd_milters"] == OUR_MILTER
    assert p.params["non_smtpd_milters"] == \
        "{ unix:/flushctl/milter.sock, default_action=accept }"
    # the admin's own milters stay, after ours, braces and all
    p = run_plan(cfg, raw={"non_smtpd_milters": "{ inet:127.0.0.1:8891, protocol=6 }"})
    assert settings.split_list(p.params["non_smtpd_milters"]) == [
        f"{{ {OUR_MILTER}, default_action=accept }}", "{ inet:127.0.0.1:8891, protocol=6 }"]
    outside = make_config(CUSTOMER, listen="unix:/run/flushctl/milter.sock")
    with pytest.raises(SettingsError, match="cleanup runs chrooted"):
        settings.plan(outside, DATA, {}, dict(EXPANDED), {}, set(), smtpd_chrooted=False,
                      cleanup_chrooted=True)


def test_plan_chrooted_socket_outside_queue_fails():
    cfg = make_config(CUSTOMER, listen="unix:/run/flushctl/milter.sock")
    with pytest.raises(SettingsError):
        run_plan(cfg, chrooted=True)


def test_plan_open_mynetworks_refused():
    expanded = dict(EXPANDED, mynetworks="0.0.0.0/0")
    with pytest.raises(SettingsError, match="open relay"):
        run_plan(make_config(CUSTOMER), expanded=expanded)


def test_plan_fixes_unsafe_relay_restrictions():
    expanded = dict(EXPANDED, smtpd_relay_restrictions="permit_mynetworks, permit")
    p = run_plan(make_config(CUSTOMER), expanded=expanded)
    assert p.params["smtpd_relay_restrictions"] == \
        "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination"


def test_plan_relay_recipient_maps_only_with_lists():
    without = run_plan(make_config(CUSTOMER, OPEN))
    assert "relay_recipient_maps" not in without.params
    assert f"hash:{MAP_DIR}/relay_recipients" not in without.ours

    with_lists = run_plan(make_config(CUSTOMER, LISTED))
    assert with_lists.params["relay_recipient_maps"] == \
        f"hash:{MAP_DIR}/relay_recipients, regexp:{MAP_DIR}/relay_recipient_domains"
    assert f"hash:{MAP_DIR}/relay_recipients" in with_lists.ours


def test_plan_relay_recipient_maps_idempotent():
    cfg = make_config(CUSTOMER, LISTED)
    first = run_plan(cfg)
    second = run_plan(cfg, raw=first.params, services={"ondemand/unix": first.services[0]},
                      previous_ours=set(first.ours))
    assert second.params == {}
    assert second.services == []


def test_plan_relay_recipient_maps_keeps_admin_map():
    cfg = make_config(CUSTOMER, LISTED)
    raw = {"relay_domains": "admin.example",
           "relay_recipient_maps": "hash:/etc/postfix/relay_recipients"}
    p = run_plan(cfg, raw=raw)
    assert p.params["relay_recipient_maps"] == \
        f"hash:{MAP_DIR}/relay_recipients, regexp:{MAP_DIR}/relay_recipient_domains, " \
        "hash:/etc/postfix/relay_recipients"


def test_plan_refuses_recipient_maps_that_would_block_admin_domains():
    cfg = make_config(CUSTOMER, LISTED)
    with pytest.raises(SettingsError, match="admin.example"):
        run_plan(cfg, raw={"relay_domains": "admin.example", "relay_recipient_maps": ""})


def test_plan_admin_domains_fine_without_lists():
    p = run_plan(make_config(CUSTOMER, OPEN), raw={"relay_domains": "admin.example"})
    assert "relay_recipient_maps" not in p.params


def test_plan_removes_our_recipient_map_when_lists_go_away():
    ours = f"hash:{MAP_DIR}/relay_recipients"
    p = run_plan(make_config(CUSTOMER),
                 raw={"relay_recipient_maps": f"{ours}, hash:/etc/postfix/admin_rcpt"},
                 previous_ours={ours})
    assert p.params["relay_recipient_maps"] == "hash:/etc/postfix/admin_rcpt"

    p = run_plan(make_config(CUSTOMER), raw={"relay_recipient_maps": ours})
    assert p.params["relay_recipient_maps"] == ""


# -- optional submission service -------------------------------------------------

SUBMISSION = """
[submission]
listen = "2587"
tls_cert_file = "/etc/ssl/certs/mx.pem"
tls_key_file = "/etc/ssl/private/mx.key"
"""


def submission_plan(previous=frozenset(), services=None, extra=SUBMISSION):
    cfg = make_config(CUSTOMER + extra)
    return settings.plan(cfg, DATA, {}, dict(EXPANDED), dict(services or {}), set(),
                         smtpd_chrooted=False, previous_services=frozenset(previous))


def test_submission_entry():
    p = submission_plan()
    [ondemand, sub] = p.services
    assert ondemand == SERVICE
    assert sub.split()[:8] == ["2587", "inet", "n", "-", "n", "-", "-", "smtpd"]
    options = dict(o.split("=", 1) for o in sub.split()[9::2])
    assert sub.split()[8::2] == ["-o"] * len(options)
    assert options["smtpd_tls_security_level"] == "encrypt"     # TLS before anything
    assert options["smtpd_tls_auth_only"] == "yes"               # no password in clear
    assert options["smtpd_relay_restrictions"] == "permit_sasl_authenticated,reject"
    assert options["smtpd_sasl_type"] == "cyrus" and options["smtpd_sasl_path"] == "smtpd"
    assert options["cyrus_sasl_config_path"] == "/etc/postfix/sasl"
    assert options["smtpd_tls_cert_file"] == "/etc/ssl/certs/mx.pem"
    # ETRN after AUTH asks the gateway like any other (main.cf's policy
    # check, never overridden here): a login names its domains
    assert "smtpd_etrn_restrictions" not in options
    assert p.our_services == ["ondemand/unix", "2587/inet"]
    assert p.remove_services == []


def test_submission_dovecot():
    p = submission_plan(extra=SUBMISSION + 'sasl_type = "dovecot"\n')
    assert "-o smtpd_sasl_path=private/auth" in p.services[1]
    assert "-o smtpd_sasl_type=dovecot" in p.services[1]


def test_submission_idempotent():
    first = submission_plan()
    services = {settings.service_key(e): e for e in first.services}
    second = submission_plan(previous=first.our_services, services=services)
    assert second.services == [] and second.remove_services == []


def test_submission_removed_when_unconfigured():
    first = submission_plan()
    services = {settings.service_key(e): e for e in first.services}
    services["smtp/inet"] = "smtp inet n - y - - smtpd"
    p = settings.plan(make_config(CUSTOMER), DATA, {}, dict(EXPANDED), services, set(),
                      smtpd_chrooted=False, previous_services=frozenset(first.our_services))
    assert p.remove_services == ["2587/inet"]       # ours, and no longer wanted
    assert p.our_services == ["ondemand/unix"]


def test_submission_never_takes_over_an_admin_service():
    admin = {"2587/inet": "2587 inet n - y - - smtpd -o smtpd_sasl_auth_enable=yes"}
    with pytest.raises(SettingsError, match="did not write"):
        submission_plan(services=admin)
    # nor removes one it did not write
    p = settings.plan(make_config(CUSTOMER), DATA, {}, dict(EXPANDED), admin, set(),
                      smtpd_chrooted=False)
    assert p.remove_services == []


@pytest.mark.parametrize("bad, message", [
    ('[submission]\ntls_key_file = "/k"\n', "tls_cert_file: missing"),
    ('[submission]\nlisten = "99999"\ntls_cert_file = "/c"\ntls_key_file = "/k"\n', "listen"),
    ('[submission]\nlisten = "587 -o x=y"\ntls_cert_file = "/c"\ntls_key_file = "/k"\n', "listen"),
    ('[submission]\nsasl_type = "pam"\ntls_cert_file = "/c"\ntls_key_file = "/k"\n', "sasl_type"),
    ('[submission]\nsasl_path = "a b"\ntls_cert_file = "/c"\ntls_key_file = "/k"\n', "sasl_path"),
    ('[submission]\ntls_cert_file = "c.pem"\ntls_key_file = "/k"\n', "absolute path"),
    ('[submission]\ntls_cert_file = "/c,d"\ntls_key_file = "/k"\n', "commas"),
    ('[submission]\nport = 587\ntls_cert_file = "/c"\ntls_key_file = "/k"\n', "unknown key"),
])
def test_submission_config_errors(bad, message):
    with pytest.raises(config.ConfigError, match=message):
        config.parse(bad)


def test_submission_chrooted_like_smtpd():
    cfg = make_config(CUSTOMER + SUBMISSION)
    chrooted = settings.plan(cfg, DATA, {}, dict(EXPANDED), {}, set(), smtpd_chrooted=True)
    assert chrooted.services[1].split()[4] == "y"
    assert submission_plan().services[1].split()[4] == "n"



STRIP = f"regexp:{MAP_DIR}/strip_hold"
INTAKE = f"regexp:{MAP_DIR}/intake"
OLD_HOLD = f"regexp:{MAP_DIR}/hold_tagged"   # earlier versions


@pytest.mark.parametrize("raw, expected", [
    # Postfix's default ($header_checks) without our hold table: the admin's own
    ({"header_checks": f"{INTAKE}, pcre:/etc/postfix/spam"}, f"{STRIP}, pcre:/etc/postfix/spam"),
    ({}, STRIP),
    # set by the admin: kept, $header_checks expanded without our hold table
    ({"header_checks": f"{INTAKE}, pcre:/a", "nested_header_checks": "$header_checks, pcre:/b"},
     f"{STRIP}, pcre:/a, pcre:/b"),
    ({"nested_header_checks": "pcre:/b"}, f"{STRIP}, pcre:/b"),
])
def test_attached_headers_never_meet_our_hold_table(raw, expected):
    p = run_plan(make_config(CUSTOMER), raw=raw)
    assert p.params["nested_header_checks"] == expected
    assert INTAKE not in p.params["nested_header_checks"]


def test_the_hold_table_of_earlier_versions_gives_way_to_intake():
    p = run_plan(make_config(CUSTOMER), raw={"header_checks": f"{OLD_HOLD}, pcre:/mine"},
                 previous_ours={OLD_HOLD, STRIP})
    assert p.params["header_checks"] == f"{INTAKE}, pcre:/mine"
    assert p.params["nested_header_checks"] == f"{STRIP}, pcre:/mine"
    assert "hold_tagged" not in p.maps


def test_our_header_is_stripped_from_every_smtp_delivery():
    p = run_plan(make_config(CUSTOMER), raw={"smtp_header_checks": "pcre:/mine"})
    assert p.params["smtp_header_checks"] == f"{STRIP}, pcre:/mine"
    assert p.params["smtp_nested_header_checks"] == STRIP



@pytest.mark.parametrize("listen, spec", [
    ("unix:/var/spool/postfix/private/flushctl-policy", "unix:private/flushctl-policy"),
    ("unix:/var/spool/postfix/flushctl/policy", "unix:flushctl/policy"),
    ("127.0.0.1:10041", "inet:127.0.0.1:10041"),
    ("inet:127.0.0.1:10041", "inet:127.0.0.1:10041"),
])
def test_policy_service_as_smtpd_names_it(listen, spec):
    cfg = config.parse(f'[gateway]\npolicy_listen = "{listen}"\n', "/etc/flushctl/t.toml")
    assert settings.policy_spec(cfg, "/var/spool/postfix") == spec
    assert run_plan(cfg).params["smtpd_etrn_restrictions"] == \
        f"check_policy_service {spec}, reject"


def test_policy_socket_outside_the_queue_directory_is_refused():
    cfg = config.parse('[gateway]\npolicy_listen = "unix:/run/flushctl/policy"\n', "t.toml")
    with pytest.raises(SettingsError, match="gateway.policy_listen: smtpd reaches unix "
                                            "sockets under /var/spool/postfix only"):
        settings.policy_spec(cfg, "/var/spool/postfix")
