"""The compiled copy of the config (FILE.compiled): the very Config the file
parses to, believed no further than the file itself, and never a way around
a change or a check."""

import dataclasses
import marshal
import os
import pwd
from collections.abc import Mapping

import pytest

from flushctl import config
from flushctl.config import ConfigError, compiled
from flushctl.config.domains import plain_domain
from flushctl.config.table import DomainTable

# every section and every kind of value a Config holds: networks, frozensets,
# nested hosts, optional sections, fields left at their defaults and not
EVERY = """
[postfix]
config_directory = "/etc/postfix-ondemand"
transport = "ondemand2"
[state]
directory = "/var/lib/flushctl-x"
[milter]
listen = "inet:127.0.0.1:8899"
user = "flushctl-milter"
[gateway]
finger_listen = "[::1]:7979"
policy_listen = "127.0.0.1:10041"
release_window = 30.5
rate_burst = 7
user = ""
[poller]
interval = 120
own_hosts = ["mx1.provider.example"]
nameservers = ["192.0.2.53", "[2001:db8::53]:5353"]
[helper]
socket = "/run/fx/helper.sock"
group = "fx"
[relay]
networks = ["198.51.100.0/24", "2001:db8:1::/48"]
[submission]
listen = "587"
sasl_type = "dovecot"
tls_cert_file = "/etc/ssl/c.pem"
tls_key_file = "/etc/ssl/k.pem"
[cluster]
peers = ["mx2.provider.example:25", "[2001:db8::2]:2525"]
retry_for = 600
[metrics]
listen = ""
[odmr]
listen = ["127.0.0.1:366"]
relay_port = 867
[portal]
listen = "127.0.0.1:8366"
admins = ["boss"]
relay_allow = ["10.0.0.0/8"]
[notify]
sender = "noc@provider.example"
webhook_secret_file = "/etc/fx/secret"

[domains."customer.example"]
relay = "[mail.customer.example]:25"
recipients = ["alice@customer.example", "<Bob@Customer.Example>"]
quota_messages = 1000
quota_bytes = 50000000
flush_from = ["192.0.2.0/24", "2001:db8::/32", "198.51.100.7"]
refused_return_after = 86400.5
notify = ["ops@elsewhere.example"]
notify_webhook = "https://hooks.elsewhere.example/x"
notify_interval = 3600
[domains."customer.example".hosts]
"shop.customer.example" = "[192.0.2.9]:2525"

[domains."odmr.example"]
odmr = true
users = ["cust1", "cust2"]

[domains."plain.example"]
relay = "mx.plain.example"

[domains."bare.example"]
"""


def write(tmp_path, text=EVERY):
    path = tmp_path / "flushctl.toml"
    path.write_text(text)
    return str(path)


def test_every_field_comes_back_as_parsed(tmp_path):
    path = write(tmp_path)
    parsed = config.load(path)
    assert os.path.exists(path + ".compiled")
    kept = config.load(path)
    assert kept is not parsed
    # equal, not the same repr: a frozenset's repr follows its hash table's order
    assert kept == parsed

    # the same types all the way down (a tuple is no list, a network no string)
    def shape(value):
        if dataclasses.is_dataclass(value):
            return (type(value), tuple(shape(getattr(value, f.name))
                                       for f in dataclasses.fields(value)))
        if isinstance(value, (tuple, frozenset)):
            return (type(value), tuple(sorted(map(repr, map(shape, value)))))
        if isinstance(value, Mapping):   # the domains: a DomainTable (config.table)
            return (dict, tuple((k, shape(v)) for k, v in value.items()))
        return type(value)
    assert shape(kept) == shape(parsed)
    # each domain's hosts its own dict, as the parser makes them
    assert kept.domains["bare.example"].hosts is not kept.domains["plain.example"].hosts


def test_it_is_read_from_the_copy_and_names_the_path_it_was_loaded_by(tmp_path, monkeypatch):
    path = write(tmp_path)
    config.load(path)
    monkeypatch.setattr(config.parser, "parse", lambda *a: pytest.fail("parsed again"))
    assert config.load(path).path == path
    os.link(path, tmp_path / "other.toml")
    os.link(path + ".compiled", str(tmp_path / "other.toml") + ".compiled")
    assert config.load(str(tmp_path / "other.toml")).path == str(tmp_path / "other.toml")


def test_a_changed_file_is_parsed_again_and_its_errors_still_stop_the_load(tmp_path):
    path = write(tmp_path)
    config.load(path)
    with open(path, "a") as fh:
        fh.write('[domains."new.example"]\n')
    assert "new.example" in config.load(path).domains
    with open(path, "a") as fh:
        fh.write('[domains."bad"]\n')
    with pytest.raises(ConfigError, match="bad"):
        config.load(path)


def test_a_copy_made_by_other_code_is_not_believed(tmp_path, monkeypatch):
    path = write(tmp_path)
    config.load(path)
    monkeypatch.setattr(compiled, "code_key", lambda: "another flushctl")
    decoded = []
    monkeypatch.setattr(compiled, "_decode", decoded.append)
    assert config.load(path) == config.parse(EVERY, path)
    assert decoded == []   # the key did not match: nothing of it was decoded


def forged(path: str, extra_domain: str) -> bytes:
    """The copy of ``path`` with a domain slipped in, all else right."""
    magic, key, digest, payload = marshal.loads(open(path + ".compiled", "rb").read())
    tag, (names, relays, whole) = payload[1]["domains"]
    payload[1]["domains"] = [tag, (names + (extra_domain,), relays + (None,), whole)]
    return marshal.dumps((magic, key, digest, payload))


def test_the_forged_copy_is_what_it_says_when_the_owner_wrote_it(tmp_path):
    """The control for the tests below: the forgery works when it is
    trusted, so their refusals are the checks at work."""
    path = write(tmp_path)
    config.load(path)
    blob = forged(path, "evil.example")
    with open(path + ".compiled", "wb") as fh:
        fh.write(blob)
    assert "evil.example" in config.load(path).domains


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the copy to another user")
def test_a_copy_of_another_owner_is_not_believed_nor_replaced(tmp_path):
    """A local user who could put a file beside the config (a group- or
    world-writable directory) cannot make it say more than the file."""
    path = write(tmp_path)
    config.load(path)
    nobody = pwd.getpwnam("nobody").pw_uid
    blob = forged(path, "evil.example")
    with open(path + ".compiled", "wb") as fh:
        fh.write(blob)
    os.chown(path + ".compiled", nobody, -1)
    loaded = config.load(path)
    assert "evil.example" not in loaded.domains and "bare.example" in loaded.domains
    # made again by the owner (root writes over it): the forgery is gone
    assert os.stat(path + ".compiled").st_uid == 0
    assert "evil.example" not in config.load(path).domains


def test_a_copy_others_may_write_or_a_link_is_not_believed(tmp_path):
    path = write(tmp_path)
    config.load(path)
    blob = forged(path, "evil.example")
    with open(path + ".compiled", "wb") as fh:
        fh.write(blob)
    os.chmod(path + ".compiled", 0o666)
    assert "evil.example" not in config.load(path).domains

    os.replace(path + ".compiled", tmp_path / "elsewhere")
    with open(tmp_path / "elsewhere", "wb") as fh:
        fh.write(blob)
    os.chmod(tmp_path / "elsewhere", 0o644)
    os.symlink(tmp_path / "elsewhere", path + ".compiled")
    assert "evil.example" not in config.load(path).domains


@pytest.mark.parametrize("damage", [
    lambda blob: blob[: len(blob) // 2],
    lambda blob: b"",
    lambda blob: b"not marshal at all",
    lambda blob: marshal.dumps(("flushctl-config-1",)),
])
def test_a_damaged_copy_is_a_miss_not_an_error(tmp_path, damage):
    path = write(tmp_path)
    expected = config.load(path)
    blob = open(path + ".compiled", "rb").read()
    with open(path + ".compiled", "wb") as fh:
        fh.write(damage(blob))
    assert config.load(path) == expected


@pytest.mark.parametrize("payload", [
    ["!domains", (("a.example",), (), {})],               # columns of different lengths
    ["!domains", (("a.example",), (("h.example", "25", True),), {})],   # not a relay
    ["!domains", ((7,), (None,), {})],                    # not a name
    ["!domains", (("a.example",), (("h.example", 25),), {})],   # a relay cut short
    ["!domains", (("a.example", "b.example"),                  # valid once, then not
                  (("h.example", 25, True), ("h.example", 25, "yes")), {})],
    ["!domains", (("a.example", "b.example"),                  # equal to a valid one
                  (("h.example", 25, True), ("h.example", 25, 1)), {})],
    ["!domains", (("a.example", "b.example"),
                  (("h.example", 25, True), ("h.example", 25.0, True)), {})],
    ["!domains", (("a.example",), (["h.example", 25, True],), {})],   # a list
    ["!domains", (("a.example",), (False,), {"a.example": ["Domain", {"name": "b.example"}]})],
    ["!domains", (("a.example", "a.example"), (None, None), {})],   # a name twice
    ["!domains", (("a.example",), ((),), {})],             # an empty relay
    ["!domains", (("a.example",), (True,), {})],           # neither a relay nor "whole"
    ["!domains", (("a.example",), (0,), {})],              # equal to False, not False
    ["!domains", (("a.example",), (("h.example", True, True),), {})],   # a port that is a bool
    ["!domains", (("a.example",), (False,), {})],          # whole, but not there
    ["!domains", (("a.example",), (None,),                 # there, but not named whole
                  {"a.example": ["Domain", {"name": "a.example"}]})],
    ["!domains", (("a.example",), (False,), [("a.example", ["Domain", {"name": "a.example"}])])],
    ["!domains", (["a.example"], (None,), {})],            # a list of names
    ["os.system", {}],                                    # a class the schema does not know
    ["Domain", {"name": "x.example", "exec": "rm"}],      # a field a Domain does not have
    ["Relay", {"host": "x.example"}],                     # a field missing
    ["Config", {}],
])
def test_what_the_schema_does_not_know_is_refused(payload):
    with pytest.raises((KeyError, ValueError, TypeError)):
        compiled._decode(payload)


def test_domains_with_one_relay_share_it_and_read_as_parsed(tmp_path):
    """100,000 domains behind one relay: one Relay object (frozen) for
    all, the fields each as parsed."""
    text = "".join(f'[domains."c{i}.example"]\nrelay = "[10.0.0.{i % 2}]:2525"\n'
                   for i in range(6)) + '[domains."d.example"]\n'
    path = str(tmp_path / "flushctl.toml")
    with open(path, "w") as fh:
        fh.write(text)
    parsed = config.load(path)
    loaded = config.load(path)
    assert os.path.exists(path + ".compiled") and loaded == parsed
    relays = {id(d.relay) for d in loaded.domains.values() if d.relay is not None}
    assert len(relays) == 2
    assert [d.relay.host for d in loaded.domains.values() if d.relay] == ["10.0.0.0", "10.0.0.1"] * 3
    assert loaded.domains["d.example"].relay is None


def test_domains_are_built_when_asked_for_the_same_one_every_time(tmp_path):
    """From the copy, a domain is made when first asked for (a command
    that needs one of 100,000 builds one), then the same object, whichever
    thread asked first; the questions asked at every start (any domain
    editable? any with a webhook?) build none of the plain ones."""
    import threading
    text = EVERY + "".join(f'\n[domains."c{i}.example"]\nrelay = "[10.0.0.{i % 3}]:2525"\n'
                           for i in range(50))
    path = str(tmp_path / "flushctl.toml")
    with open(path, "w") as fh:
        fh.write(text)
    parsed = config.load(path)
    loaded = config.load(path)
    table = loaded.domains
    assert type(table) is DomainTable and list(table) == list(parsed.domains)
    assert len(table) == len(parsed.domains) and "c7.example" in table
    assert "nowhere.example" not in table and table.get("nowhere.example") is None
    with pytest.raises(KeyError):
        table["nowhere.example"]
    assert table._built.keys() == {n for n, d in parsed.domains.items()
                                   if d != plain_domain(n, d.relay)}   # only the whole ones so far
    for field in ("relay_editable", "notify_webhook", "odmr", "users", "notify"):
        assert loaded.domains_where(field) == parsed.domains_where(field) == \
            [d for d in parsed.domains.values() if getattr(d, field)]
    assert "c7.example" not in table._built   # asked nothing of it yet
    got = []
    threads = [threading.Thread(target=lambda: got.append(table["c7.example"]))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(d) for d in got}) == 1 and got[0] is table["c7.example"]
    assert loaded.domain("c7.example") is got[0] and loaded.domain(got[0]) is got[0]
    assert got[0] == parsed.domains["c7.example"]
    assert loaded.domains_where("relay") == parsed.domains_where("relay")
    assert table == parsed.domains and parsed.domains == table and loaded == parsed
    assert dict(table) == parsed.domains
    # a pass over them all builds the rest once, then reads a dict's own
    # views (the keeper's pass, a scrape, the poller's cycle: as fast as
    # before), the same objects as a lookup gives
    assert type(table.values()) is type({}.values()) and type(table.items()) is type({}.items())
    assert [d.name for d in table.values()] == list(parsed.domains)
    assert all(table[name] is dom for name, dom in table.items())
    assert got[0] is table["c7.example"] and table.keys() == parsed.domains.keys()
    with pytest.raises(AttributeError):
        loaded.domains_where("no_such_field")


def test_where_follows_the_tables_order_whatever_order_the_whole_tables_came_in():
    whole = {name: ["Domain", {"name": name, "odmr": True}] for name in ("b.example", "a.example")}
    table = compiled._decode(["!domains", (("a.example", "c.example", "b.example"),
                                           (False, None, False), whole)])
    assert list(table) == ["a.example", "c.example", "b.example"]
    assert [d.name for d in table.where("odmr")] == ["a.example", "b.example"]


def test_a_copy_that_decodes_to_something_else_is_a_miss(tmp_path):
    path = write(tmp_path)
    expected = config.load(path)
    magic, key, digest, _ = marshal.loads(open(path + ".compiled", "rb").read())
    with open(path + ".compiled", "wb") as fh:
        fh.write(marshal.dumps((magic, key, digest, ["Relay", {"host": "a.example", "port": 25,
                                                             "mx_lookup": True}])))
    assert config.load(path) == expected


def test_the_copy_is_readable_by_whoever_reads_the_file_and_nobody_else(tmp_path):
    path = write(tmp_path)
    os.chmod(path, 0o640)
    config.load(path)
    st, kept = os.stat(path), os.stat(path + ".compiled")
    assert (kept.st_mode & 0o777, kept.st_uid, kept.st_gid) == (0o640, st.st_uid, st.st_gid)


def test_a_directory_it_cannot_write_leaves_it_parsing(tmp_path):
    path = write(tmp_path)
    os.chmod(tmp_path, 0o555)
    try:
        if os.geteuid() == 0:   # root writes anyway: the test says nothing then
            pytest.skip("root ignores directory permissions")
        assert config.load(path) == config.parse(EVERY, path)
        assert not os.path.exists(path + ".compiled")
    finally:
        os.chmod(tmp_path, 0o755)


def test_crlf_text_loads_as_before(tmp_path):
    """The file was read in text mode: CRLF line ends count as LF, and the
    digest (which config an apply made live) is that text's."""
    path = tmp_path / "flushctl.toml"
    path.write_bytes(EVERY.replace("\n", "\r\n").encode())
    loaded = config.load(str(path))
    assert loaded.digest == config.parse(EVERY, str(path)).digest
    assert config.load(str(path)) == loaded


def test_check_config_parses_and_leaves_no_copy(tmp_path):
    """It checks candidate files too (Ansible's validate): it judges the
    text itself, and puts nothing beside it."""
    from click.testing import CliRunner

    from flushctl.cli.main import main
    path = write(tmp_path)
    config.load(path)
    blob = forged(path, "evil.example")
    with open(path + ".compiled", "wb") as fh:
        fh.write(blob)
    result = CliRunner().invoke(main, ["--config", path, "check-config", "--json"])
    assert result.exit_code == 0 and "evil.example" not in result.stdout
    (tmp_path / "new").mkdir()
    candidate = write(tmp_path / "new")
    result = CliRunner().invoke(main, ["--config", candidate, "check-config"])
    assert result.exit_code == 0 and "4 domain(s)" in result.stdout
    assert os.listdir(tmp_path / "new") == ["flushctl.toml"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the files to another user")
def test_root_never_takes_a_copy_another_user_wrote_for_their_own_config(tmp_path):
    """Review finding: a config owned by a delegated admin, with a copy of
    theirs beside it: root loaded values parse() refuses (the milter as
    root, a transport name with a newline) from the copy."""
    path = write(tmp_path)
    config.load(path)
    blob = forged(path, "evil.example")
    with open(path + ".compiled", "wb") as fh:
        fh.write(blob)
    nobody = pwd.getpwnam("nobody").pw_uid
    os.chown(path, nobody, -1)
    os.chown(path + ".compiled", nobody, -1)
    assert "evil.example" not in config.load(path).domains
    assert os.stat(path + ".compiled").st_uid == nobody   # and root wrote none for them


def test_a_file_made_more_private_makes_its_copy_so_too(tmp_path):
    """Review finding: the copy kept the mode it was written with; a
    chmod 600 of the unchanged file left the copy readable by all."""
    path = write(tmp_path)
    config.load(path)
    assert os.stat(path + ".compiled").st_mode & 0o777 == 0o644
    os.chmod(path, 0o600)
    config.load(path)
    assert os.stat(path + ".compiled").st_mode & 0o777 == 0o600
    os.chmod(path + ".compiled", 0o640)   # and a copy opened wider is a miss
    config.load(path)
    assert os.stat(path + ".compiled").st_mode & 0o777 == 0o600


def test_a_fifo_in_its_place_does_not_hang_the_load(tmp_path):
    """Review finding: open() of a FIFO waited for a writer."""
    import threading
    path = write(tmp_path)
    os.mkfifo(path + ".compiled", 0o644)
    done = []
    worker = threading.Thread(target=lambda: done.append(config.load(path)), daemon=True)
    worker.start()
    worker.join(10)
    assert done and "bare.example" in done[0].domains


def test_the_key_names_what_else_judges_the_text(monkeypatch):
    """Review finding: an upgrade of rtoml or of Python (ipaddress,
    tomllib) kept a copy trusted that the new parse might refuse."""
    compiled.code_key.cache_clear()
    before = compiled.code_key()
    monkeypatch.setattr(compiled, "_judges", lambda: ("3.11.99", "4", "0.0.1"))
    compiled.code_key.cache_clear()
    try:
        assert compiled.code_key() != before
    finally:
        monkeypatch.undo()
        compiled.code_key.cache_clear()


def test_sources_being_replaced_make_no_copy_and_no_error(tmp_path, monkeypatch):
    """Review finding: a source file gone mid-upgrade raised out of load()."""
    def gone():
        raise FileNotFoundError("names.py")
    monkeypatch.setattr(compiled, "code_key", gone)
    path = write(tmp_path)
    assert "bare.example" in config.load(path).domains
    assert not os.path.exists(path + ".compiled")


def test_an_interrupted_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def interrupted(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(compiled.os, "replace", interrupted)
    path = write(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        config.load(path)
    assert os.listdir(tmp_path) == ["flushctl.toml"]
