"""The relays customers choose: the config keys, the file, the domains as
they route, what a customer may point at, and the transport map's lines."""

import ipaddress
import os

import pytest

from dataclasses import replace

from flushctl.config import ConfigError, parse, relay_text
from flushctl.mta import relay_change, relays

EDITABLE = '[domains."a.example"]\nrelay = "[192.0.2.1]:25"\nrelay_editable = true\n' \
           '[domains."b.example"]\nrelay = "[192.0.2.2]:25"\n'


def test_relay_editable_is_read_and_refused_where_it_cannot_hold():
    cfg = parse(EDITABLE)
    assert cfg.domains["a.example"].relay_editable and not cfg.domains["b.example"].relay_editable
    with pytest.raises(ConfigError, match="relay_editable: must be true or false"):
        parse('[domains."a.example"]\nrelay_editable = "yes"\n')
    # on a cluster the other MX hosts would keep the old relay
    with pytest.raises(ConfigError, match="relay_editable.*cluster"):
        parse(EDITABLE + '[cluster]\npeers = ["192.0.2.9"]\n')
    # an ODMR domain's mail goes out over its customer's session only
    with pytest.raises(ConfigError, match="drop relay_editable"):
        parse('[odmr]\n[domains."a.example"]\nodmr = true\nusers = ["u1"]\n'
              'relay_editable = true\n')


def test_relay_allow_takes_networks_only():
    cfg = parse('[portal]\nrelay_allow = ["127.0.0.0/8", "fd00::/8"]\n')
    assert cfg.portal.relay_allow == (ipaddress.ip_network("127.0.0.0/8"),
                                      ipaddress.ip_network("fd00::/8"))
    assert parse("[portal]\n").portal.relay_allow == ()
    with pytest.raises(ConfigError, match="portal.relay_allow: not an IP network"):
        parse('[portal]\nrelay_allow = ["mx.example"]\n')


@pytest.mark.parametrize("text, nexthop", [
    ("[192.0.2.7]:2525", "[192.0.2.7]:2525"),
    ("mail.example.net:25", "mail.example.net:25"),
    ("[Mail.Example.NET]", "[mail.example.net]:25"),
    ("[2001:db8::1]:587", "[2001:db8::1]:587"),
])
def test_a_customers_relay_is_read_as_the_configs(text, nexthop):
    assert relay_text(text).nexthop == nexthop


@pytest.mark.parametrize("text", ["", "not a next hop", "192.0.2.7:25", "[192.0.2.7]:0",
                                  "[192.0.2.7]:70000", "mx..example:25", "a b:25",
                                  "[" + "1" * 400 + "]:25"])
def test_what_is_no_next_hop_is_refused_in_words(text):
    with pytest.raises(ValueError) as exc:
        relay_text(text)
    assert not str(exc.value).startswith(":")


def entry(dom, relay, at=5.0, pending=False):
    return {"relay": relay, "at": at, "basis": relays.basis(dom), "pending": pending}


def test_the_file_is_checked_and_only_editable_domains_take_it():
    cfg = parse(EDITABLE)
    a, b = cfg.domains["a.example"], cfg.domains["b.example"]
    text = relays.render({"a.example": entry(a, "[198.51.100.7]:2525"),
                          "b.example": entry(b, "[198.51.100.8]:25")})
    assert "u1" not in text   # no login in a file every user reads
    entries = relays.parse(text)
    domains = relays.effective(cfg.domains, entries)
    assert domains["a.example"].relay.nexthop == "[198.51.100.7]:2525"
    assert domains["a.example"].relay_chosen
    assert domains["b.example"] is b   # not editable: the config's
    # null: the configured relay again
    entries["a.example"]["relay"] = None
    assert relays.effective(cfg.domains, entries)["a.example"] is a
    for bad in ('[]', '{"domains": []}', '{"domains": {"a.example": {"relay": 5, "basis": "x",'
                ' "at": 1}}}', '{"domains": {"a.example": {"relay": "nonsense", "basis": "x",'
                ' "at": 1}}}', '{"domains": {"a.example": {"relay": null, "at": 1}}}'):
        with pytest.raises(ValueError):
            relays.parse(bad)


@pytest.mark.parametrize("edit", [
    pytest.param(lambda t: t.replace('relay = "[192.0.2.1]:25"', 'relay = "[192.0.2.9]:25"'),
                 id="the configured relay changed"),
    pytest.param(lambda t: t.replace('users = ["u1"]', 'users = ["newcust"]'),
                 id="another customer"),
    pytest.param(lambda t: t.replace("relay_editable = true", "relay_editable = false"),
                 id="no longer editable"),
    pytest.param(lambda t: t.replace('[domains."a.example"]', '[domains."c.example"]'),
                 id="the domain removed"),
])
def test_a_choice_lapses_when_the_admin_changes_what_it_was_made_on(edit):
    """The domain re-added for another customer, a new configured relay, or
    editable no more: the old customer's choice routes nothing."""
    text = EDITABLE.replace("relay_editable = true", 'users = ["u1"]\nrelay_editable = true')
    before = parse(text)
    entries = {"a.example": entry(before.domains["a.example"], "[198.51.100.7]:25")}
    assert relays.effective(before.domains, entries)["a.example"].relay_chosen
    after = parse(edit(text))
    dom = relays.effective(after.domains, entries).get("a.example")
    assert dom is None or not dom.relay_chosen
    assert not relays.holds(after.domains.get("a.example"), entries["a.example"])


def test_a_process_sees_a_change_of_the_file(tmp_path):
    cfg = parse(EDITABLE + f'[postfix]\nconfig_directory = "{tmp_path}"\n')
    overrides = relays.Overrides(cfg)
    assert overrides.domains() is cfg.domains   # no file
    (tmp_path / "flushctl").mkdir()
    path = tmp_path / "flushctl" / "relays.json"
    path.write_text(relays.render({"a.example": entry(cfg.domains["a.example"],
                                                      "[198.51.100.7]:25")}))
    relays.forget(cfg)
    assert overrides.domain(cfg.domains["a.example"]).relay.nexthop == "[198.51.100.7]:25"
    assert overrides.entry("a.example")["at"] == 5.0
    # a file that is not one: what was known stands
    path.write_text("garbage")
    relays.forget(cfg)
    assert overrides.domain(cfg.domains["a.example"]).relay.nexthop == "[198.51.100.7]:25"
    # nothing editable: no look at the file at all
    plain = relays.Overrides(parse('[domains."b.example"]\n'))
    assert plain.domains() is plain.config.domains and plain.entry("b.example") is None


def test_apply_drops_the_choices_that_lapsed(tmp_path):
    cfg = parse(EDITABLE + f'[postfix]\nconfig_directory = "{tmp_path}"\n')
    (tmp_path / "flushctl").mkdir()
    path = tmp_path / "flushctl" / "relays.json"
    a = cfg.domains["a.example"]
    path.write_text(relays.render({"a.example": entry(a, "[198.51.100.7]:25"),
                                   "gone.example": entry(a, "[198.51.100.8]:25")}))
    assert relay_change.prune(cfg) == ["gone.example"]
    assert list(relays.parse(path.read_text())) == ["a.example"]
    assert relay_change.prune(cfg) == []


@pytest.mark.parametrize("port, ok", [(25, True), (587, True), (1024, True), (2525, True),
                                      (22, False), (80, False), (465, False), (1023, False)])
def test_ports_a_customer_may_use(port, ok):
    assert (relays.port_refusal(port) is None) == ok


def test_addresses_a_customer_may_point_at():
    allow = (ipaddress.ip_network("127.0.0.2/32"),)
    refusal = relays.address_refusal
    assert refusal("mx.example", ["198.51.100.7"], ()) is not None   # TEST-NET: not global
    assert refusal("mx.example", ["8.8.8.8", "2001:4860::8888"], ()) is None
    for bad in ("10.0.0.1", "192.168.1.1", "169.254.1.1", "127.0.0.1", "::1", "fe80::1%eth0",
                "fd00::1", "0.0.0.0", "::ffff:10.0.0.1", "100.64.0.1", "224.0.0.1", "ff0e::1"):
        assert "not an address on the internet" in refusal("mx.example", [bad], ()), bad
    assert refusal("mx.example", ["8.8.8.8", "10.0.0.1"], ()) is not None   # any one
    assert refusal("mx.example", ["127.0.0.2"], allow) is None
    # the words name what the customer wrote, never where it resolves
    assert refusal("db.corp.example", ["10.1.2.3"], ()) == \
        "db.corp.example: not an address on the internet"
    # IPv6 forms that carry an IPv4 address a gateway may deliver to
    for bad in ("64:ff9b::a00:1", "64:ff9b:1::a00:1", "64:ff9b::808:808", "2002:a00:1::1",
                "2002:808:808::1", "::7f00:1", "::ffff:0:7f00:1", "fec0::1"):
        assert "not an address on the internet" in refusal("mx.example", [bad], ()), bad
    assert "this host" in refusal("mx.example", ["8.8.8.8"], (), frozenset({"8.8.8.8"}))
    assert "this host" in refusal("mx.example", ["127.0.0.2"], allow, frozenset({"127.0.0.2"}))


def test_target_refusal_takes_the_probers_targets():
    relay = relay_text("mx.example:25")
    assert relays.target_refusal(relay, [], "mx.example: no address", ()) == \
        "mx.example: no address"
    assert relays.target_refusal(relay, [("mx.example", 25, ("8.8.8.8",))], "", ()) is None
    assert "not an address" in relays.target_refusal(
        relay, [("a.example", 25, ("8.8.8.8",)), ("b.example", 25, ("10.0.0.1",))], "", ())
    assert "port 80" in relays.target_refusal(relay_text("[8.8.8.8]:80"),
                                                    [("8.8.8.8", 80, ("8.8.8.8",))], "", ())


def test_the_transport_lines_of_one_domain_are_replaced_in_place():
    text = ("# header\na.example\tondemand:[192.0.2.1]:25\n.a.example\tondemand:[192.0.2.1]:25\n"
            "pc.a.example\tondemand:[192.0.2.5]:25\n.pc.a.example\tondemand:[192.0.2.5]:25\n"
            "b.example\tondemand:[192.0.2.2]:25\n.b.example\tondemand:[192.0.2.2]:25\n")
    lines = ["a.example\tondemand:[198.51.100.7]:2525\n", ".a.example\tondemand:[198.51.100.7]:2525\n"]
    out = relay_change.with_lines(text, "a.example", lines)
    assert out.splitlines()[1:3] == [line.rstrip("\n") for line in lines]
    assert out.splitlines()[3:] == text.splitlines()[3:]   # hosts and other domains as they were
    with pytest.raises(ValueError, match="flushctl apply"):
        relay_change.with_lines(text, "c.example", lines)
    # a comment naming the domain is not an entry
    with pytest.raises(ValueError):
        relay_change.with_lines("#a.example x\n", "a.example", lines)


def test_lines_for_a_domain_follow_transport_entries():
    cfg = parse(EDITABLE)
    dom = replace(cfg.domains["a.example"], relay=relay_text("mx.example.net:2525"))
    assert relay_change._lines(cfg, dom) == ["a.example\tondemand:mx.example.net:2525\n",
                                             ".a.example\tondemand:mx.example.net:2525\n"]
    dom = replace(cfg.domains["a.example"], relay=None)
    assert relay_change._lines(cfg, dom) == ["a.example\tondemand:\n", ".a.example\tondemand:\n"]


def test_the_maps_lock_is_root_s_alone_and_one_writer_at_a_time(tmp_path):
    import fcntl
    import stat
    cfg = parse(f'[postfix]\nconfig_directory = "{tmp_path}"\n')
    lock = tmp_path / "flushctl" / relay_change.LOCK
    with relay_change.maps_lock(cfg):
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600   # no other user can take it
        fd = os.open(lock, os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # another writer waits, then gives up saying why
        with pytest.raises(relay_change.RelayChangeError, match="under way"):
            with relay_change.maps_lock(cfg, wait=0.2):
                pass
        os.close(fd)
    # a link planted in its place is not followed
    lock.unlink()
    lock.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        with relay_change.maps_lock(cfg):
            pass
    assert not (tmp_path / "elsewhere").exists()


def test_changes_are_made_only_on_the_config_apply_made_live(tmp_path):
    cfg = parse(EDITABLE + f'[postfix]\nconfig_directory = "{tmp_path}"\n')
    assert not relay_change.live(cfg)              # never applied
    (tmp_path / "flushctl").mkdir()
    os.replace(*relay_change.stage_digest(cfg))
    assert relay_change.live(cfg)
    edited = parse(EDITABLE + "# edited\n" + f'[postfix]\nconfig_directory = "{tmp_path}"\n')
    assert not relay_change.live(edited)           # loaded, not applied
    digest = tmp_path / "flushctl" / relay_change.DIGEST
    assert digest.stat().st_mode & 0o777 == 0o644  # beside the maps, root's
    digest.unlink()
    os.mkfifo(digest)                               # no reader waits on it
    assert not relay_change.live(cfg)


@pytest.mark.parametrize("target, relay, knocked", [
    ("mail.example.net[192.0.2.7]:2525", "[mail.example.net]:2525", True),
    ("mail.example.net[192.0.2.7]:25", "[mail.example.net]:2525", False),
    ("old.example.net[192.0.2.8]:2525", "[mail.example.net]:2525", False),
    ("192.0.2.7:25", "[192.0.2.7]:25", True),
    ("2001:db8::7:25", "[2001:db8::7]:25", True),
    ("2001:db8::8:25", "[2001:db8::7]:25", False),
    ("mx1.example.net[192.0.2.7]:25", "example.net:25", True),   # through MX: any MX host
])
def test_a_probe_counts_only_where_the_mail_goes_now(target, relay, knocked):
    from flushctl.heldmail.release import knocked_at
    from flushctl.poller.prober import REACHABLE, ProbeResult
    assert knocked_at(ProbeResult(REACHABLE, target, "220", 1.0), relay_text(relay)) is knocked
    assert knocked_at(ProbeResult(REACHABLE, target, "220", 1.0), None)


def test_tries_are_counted_per_domain_refused_ones_too():
    from flushctl.portal import authority
    authority._attempts.clear()
    now = 1000.0
    assert all(authority._may_try("a.example", now + i) for i in range(authority.ATTEMPTS))
    assert not authority._may_try("a.example", now + 10)
    assert authority._may_try("b.example", now + 10)          # another domain's own count
    assert authority._may_try("a.example", now + authority.ATTEMPT_WINDOW + 1)
