"""The config's fast paths (100,000 domains are read by every command)
answer exactly as the slow ones they stand in for."""

import ipaddress
import math

import pytest

from flushctl.config import ConfigError
from flushctl.config.fields import _is_ip
from flushctl.config.parser import _toml


@pytest.mark.parametrize("text", [
    "1.2.3.4", "0.0.0.0", "01.2.3.4", "1.2.3", "256.1.1.1", "1.2.3.4.5", " 1.2.3.4",
    "1.2.3.4 ", "", "::1", "::ffff:1.2.3.4", "1::2::3", "fe80::1%eth0", "fe80::1%",
    "mail.customer.test", "\u0661.2.3.4", "1.2.3.4\0", "[::1]"])
def test_is_ip_answers_as_ipaddress_does(text):
    try:
        ipaddress.ip_address(text)
        expected = True
    except ValueError:
        expected = False
    assert _is_ip(text) is expected


def test_what_rtoml_refuses_tomllib_reads():
    """rtoml refuses a float too large for a double; TOML (and tomllib)
    reads it as infinity: the verdict is tomllib's."""
    assert _toml("a = 1e400\n", "t.toml") == {"a": math.inf}
    assert _toml("a = 99999999999999999999\n", "t.toml") == {"a": 99999999999999999999}


def test_a_toml_error_is_tomllibs_with_its_line_and_column():
    with pytest.raises(ConfigError) as err:
        _toml('[domains."a.test"]\nrelay = \n', "t.toml")
    assert str(err.value) == "t.toml: not valid TOML: Invalid value (at line 2, column 9)"


def test_rtoml_and_tomllib_read_a_config_alike():
    import tomllib
    text = ('[postfix]\nconfig_directory = "/etc/postfix"\n[domains."b.test"]\n'
            'relay = "[192.0.2.1]:2525"\nrecipients = ["x@b.test", "y@b.test"]\n'
            'quota_bytes = 1_000_000\nrefused_return_after = 86400.5\nodmr = true\n'
            '[domains."a.test".hosts]\n"h.a.test" = "[192.0.2.2]"\n')
    assert list(_toml(text, "t.toml")["domains"]) == ["b.test", "a.test"]
    assert _toml(text, "t.toml") == tomllib.loads(text)


def test_carriage_returns_and_a_byte_order_mark_are_tomllibs_to_judge():
    """Review finding: rtoml keeps CRLF in multi-line strings and skips a
    byte order mark; tomllib makes them LF and refuses the mark."""
    assert _toml('a = """x\r\ny"""\r\n', "t.toml") == {"a": "x\ny"}
    with pytest.raises(ConfigError):
        _toml("\ufeffa = 1\n", "t.toml")


@pytest.mark.parametrize("name, table", [
    ("a.test", {}), ("a.test", {"relay": "[192.0.2.1]:2525"}),
    ("a.test", {"relay": "mx.a.test"}), ("a.test", {"relay": "[2001:db8::1]"}),
    ("a.test", {"relay": "192.0.2.1:25"}), ("a.test", {"relay": 25}),
    ("a.test", {"relay": "[mx.a.test]:0"}), ("A.test", {}), ("a", {"relay": "x.test"}),
    ("a.test", {"relay": "x.test", "odmr": True}), ("a.test", "not a table")])
def test_a_domain_naming_a_relay_or_nothing_is_read_as_the_full_path_reads_it(name, table):
    from flushctl.config.domains import _domain, _full_domain

    def read(fn):
        try:
            return fn("t.toml", name, table)
        except ConfigError as exc:
            return str(exc)
    assert read(_domain) == read(_full_domain)


def test_a_domain_read_the_short_way_is_a_whole_domain_of_its_own():
    """The short path sets the fields without Domain's __init__: every
    field there, hashing and equality as Domain's, no dict shared."""
    import dataclasses

    from flushctl.config.domains import _domain, _full_domain
    a, b = (_domain("t.toml", "a.test", {"relay": "[192.0.2.1]:2525"}) for _ in range(2))
    full = _full_domain("t.toml", "a.test", {"relay": "[192.0.2.1]:2525"})
    assert a.__dict__ == full.__dict__ and list(a.__dict__) == [
        f.name for f in dataclasses.fields(full)]
    assert a == full and hash(a) == hash(full) and {a: 1}[full] == 1
    assert a.hosts is not b.hosts
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.relay = None
