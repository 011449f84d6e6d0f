"""flushctl.config: one TOML file validated into frozen objects."""

import ipaddress

import pytest

from flushctl import config
from flushctl.config import ConfigError

PATH = "/etc/flushctl/flushctl.toml"

FULL = """
[postfix]
config_directory = "/etc/postfix-ondemand"

[state]
directory = "/var/lib/flushctl"

[milter]
listen = "unix:/var/spool/postfix/flushctl/milter.sock"

[gateway]
finger_listen = "0.0.0.0:79"
policy_listen = "127.0.0.1:10041"

[poller]
interval = 120

[domains."customer.example"]
relay = "[mail.customer.example]:25"
recipients = ["alice@customer.example", "<Bob@Customer.Example>"]
quota_messages = 1000
quota_bytes = 50000000
flush_from = ["192.0.2.0/24", "2001:db8::/32", "198.51.100.7"]

[domains."other.example"]
"""


def parse(text, path=PATH):
    return config.parse(text, path)


def parse_error(text, path=PATH) -> str:
    with pytest.raises(ConfigError) as info:
        config.parse(text, path)
    return str(info.value)


def with_domain(body: str, name: str = "x.example") -> str:
    return f'[domains."{name}"]\n{body}\n'


# -- a full valid file ---------------------------------------------------------

def test_full_config_every_key():
    cfg = parse(FULL)
    assert cfg.path == PATH
    assert cfg.config_directory == "/etc/postfix-ondemand"
    assert cfg.state_directory == "/var/lib/flushctl"
    assert cfg.milter_listen == config.Listen("unix", path="/var/spool/postfix/flushctl/milter.sock")
    assert cfg.milter_listen.milter_spec == "unix:/var/spool/postfix/flushctl/milter.sock"
    assert cfg.finger_listen == config.HostPort("0.0.0.0", 79)
    assert cfg.policy_listen == config.Listen("inet", host="127.0.0.1", port=10041)
    assert str(cfg.policy_listen) == "inet:127.0.0.1:10041"
    assert cfg.poller_interval == 120
    assert cfg.probe_timeout == 10.0
    assert cfg.transport_name == "ondemand"
    assert sorted(cfg.domains) == ["customer.example", "other.example"]

    dom = cfg.domains["customer.example"]
    assert dom.name == "customer.example"
    assert dom.relay == config.Relay("mail.customer.example", 25, mx_lookup=False)
    assert dom.relay.nexthop == "[mail.customer.example]:25"
    assert dom.recipients == frozenset({"alice", "bob"})
    assert dom.quota_messages == 1000
    assert dom.quota_bytes == 50000000
    assert dom.flush_from == (ipaddress.ip_network("192.0.2.0/24"),
                              ipaddress.ip_network("2001:db8::/32"),
                              ipaddress.ip_network("198.51.100.7/32"))
    assert dom.accepts_local_part("ALICE")
    assert not dom.accepts_local_part("carol")

    other = cfg.domains["other.example"]
    assert other == config.Domain("other.example")
    assert other.accepts_local_part("anyone")


def test_defaults_for_empty_file():
    cfg = parse("")
    assert cfg.config_directory == "/etc/postfix"
    assert cfg.state_directory == "/var/lib/flushctl"
    assert cfg.milter_listen.kind == "unix"
    assert cfg.milter_listen.path == "/var/spool/postfix/flushctl/milter.sock"
    assert cfg.finger_listen == config.HostPort("0.0.0.0", 79)
    # the policy service: a unix socket in Postfix's private/ directory
    assert cfg.policy_listen == config.Listen(
        "unix", path="/var/spool/postfix/private/flushctl-policy")
    assert cfg.poller_interval == 60
    assert cfg.domains == {}


def test_milter_listen_inet():
    cfg = parse('[milter]\nlisten = "inet:127.0.0.1:8899"\n')
    assert cfg.milter_listen == config.Listen("inet", host="127.0.0.1", port=8899)
    assert cfg.milter_listen.milter_spec == "inet:127.0.0.1:8899"
    assert cfg.milter_listen.pymilter_spec == "inet:8899@127.0.0.1"


@pytest.mark.parametrize("text, user", [
    ("", "flushctl-milter"),                 # its own user by default
    ('[milter]\nuser = "mail-filter"\n', "mail-filter"),
    ('[milter]\nuser = ""\n', ""),           # stays root: the admin says so
])
def test_milter_user(text, user):
    assert parse(text).milter_user == user


@pytest.mark.parametrize("value, message", [
    ('"root"', "milter.user: the milter reads every message"),
    ('"Bad User"', "milter.user: not a user name"),
    ("7", "milter.user"),
])
def test_milter_user_refused(value, message):
    with pytest.raises(ConfigError, match=message):
        parse(f"[milter]\nuser = {value}\n")


def test_milter_listen_unix_is_normalised():
    cfg = parse('[milter]\nlisten = "unix:/var/spool/postfix//flushctl/./milter.sock"\n')
    assert cfg.milter_listen.path == "/var/spool/postfix/flushctl/milter.sock"
    assert cfg.milter_listen.pymilter_spec == "unix:/var/spool/postfix/flushctl/milter.sock"


def test_gateway_ipv6_listen():
    cfg = parse('[gateway]\nfinger_listen = "[::]:79"\n')
    assert cfg.finger_listen == config.HostPort("::", 79)
    assert str(cfg.finger_listen) == "[::]:79"


@pytest.mark.parametrize("relay, host, port, mx", [
    ("[mail.customer.example]:25", "mail.customer.example", 25, False),
    ("[mail.customer.example]", "mail.customer.example", 25, False),
    ("mail.customer.example:2525", "mail.customer.example", 2525, True),
    ("mail.customer.example", "mail.customer.example", 25, True),
    ("[192.0.2.10]:25", "192.0.2.10", 25, False),
    ("[192.0.2.10]:587", "192.0.2.10", 587, False),
    ("[Mail.Customer.Example]:25", "mail.customer.example", 25, False),
])
def test_relay_forms(relay, host, port, mx):
    cfg = parse(with_domain(f'relay = "{relay}"'))
    assert cfg.domains["x.example"].relay == config.Relay(host, port, mx)


def test_relay_nexthop_with_mx_lookup():
    cfg = parse(with_domain('relay = "mail.customer.example:2525"'))
    assert cfg.domains["x.example"].relay.nexthop == "mail.customer.example:2525"


def test_config_domain_lookup():
    cfg = parse(FULL)
    assert cfg.domain("Customer.Example.").name == "customer.example"
    with pytest.raises(config.UnknownDomain, match="not a configured domain"):
        cfg.domain("stranger.example")
    with pytest.raises(config.UnknownDomain):
        cfg.domain("-x")
    # its own exception: a KeyError elsewhere (a bug) is not taken for it
    assert not issubclass(config.UnknownDomain, KeyError)


def test_a_domain_validated_at_the_edge_travels_as_itself():
    cfg = parse(FULL)
    dom = cfg.domain("customer.example")
    assert cfg.domain(dom) is dom                       # no second lookup, no copy
    other = parse(FULL).domain("customer.example")      # another config's (a reload)
    assert cfg.domain(other) is dom
    assert parse(with_domain("")).domains.get("customer.example") is None
    with pytest.raises(config.UnknownDomain, match="not a configured domain"):
        parse(with_domain("")).domain(dom)              # a domain since removed


# -- errors: "FILE: KEY: what is wrong" ----------------------------------------

@pytest.mark.parametrize("text, key, words", [
    # unknown keys
    ('bogus = 1\n', "bogus", "unknown key"),
    ('[postfix]\nbogus = 1\n', "postfix.bogus", "unknown key"),
    ('[state]\ndir = "/x"\n', "state.dir", "unknown key"),
    ('[milter]\nsocket = "unix:/x"\n', "milter.socket", "unknown key"),
    ('[gateway]\nfinger = "0.0.0.0:79"\n', "gateway.finger", "unknown key"),
    ('[poller]\nevery = 5\n', "poller.every", "unknown key"),
    (with_domain('quota = 5'), 'domains."x.example".quota', "unknown key"),
    # wrong types
    ('[poller]\ninterval = "60"\n', "poller.interval", "must be an integer"),
    ('[poller]\ninterval = true\n', "poller.interval", "must be an integer"),
    ('[poller]\ninterval = 1.5\n', "poller.interval", "must be an integer"),
    ('[poller]\nprobe_timeout = "10"\n', "poller.probe_timeout", "must be a number"),
    ('[poller]\nprobe_timeout = false\n', "poller.probe_timeout", "must be a number"),
    (with_domain('quota_messages = "10"'), 'domains."x.example".quota_messages',
     "must be an integer"),
    (with_domain('quota_messages = true'), 'domains."x.example".quota_messages',
     "must be an integer"),
    (with_domain('quota_bytes = false'), 'domains."x.example".quota_bytes',
     "must be an integer"),
    (with_domain('quota_bytes = 1.0e6'), 'domains."x.example".quota_bytes',
     "must be an integer"),
    (with_domain('relay = 25'), 'domains."x.example".relay', "must be a string"),
    (with_domain('recipients = "alice@x.example"'), 'domains."x.example".recipients',
     "must be a list"),
    (with_domain('recipients = [1]'), 'domains."x.example".recipients', "strings"),
    (with_domain('flush_from = "192.0.2.0/24"'), 'domains."x.example".flush_from',
     "must be a list"),
    ('[state]\ndirectory = 5\n', "state.directory", "must be a string"),
    ('[milter]\nlisten = 8899\n', "milter.listen", "must be a string"),
    # zero and negative values
    (with_domain('quota_messages = -1'), 'domains."x.example".quota_messages',
     "greater than zero"),
    (with_domain('quota_messages = 0'), 'domains."x.example".quota_messages',
     "greater than zero"),
    (with_domain('quota_bytes = -100'), 'domains."x.example".quota_bytes',
     "greater than zero"),
    ('[poller]\ninterval = 0\n', "poller.interval", "greater than zero"),
    ('[poller]\nprobe_timeout = -1.0\n', "poller.probe_timeout", "greater than zero"),
    # paths
    ('[state]\ndirectory = "var/lib/flushctl"\n', "state.directory", "absolute path"),
    ('[postfix]\nconfig_directory = "etc/postfix"\n', "postfix.config_directory",
     "absolute path"),
    ('[postfix]\nconfig_directory = "/etc/post fix"\n', "postfix.config_directory",
     "spaces"),
    ('[postfix]\nconfig_directory = "/etc/postfix,x"\n', "postfix.config_directory",
     "commas"),
    ('[milter]\nlisten = "unix:run/milter.sock"\n', "milter.listen", "absolute path"),
    ('[milter]\nlisten = "unix:/run/mil ter.sock"\n', "milter.listen", "absolute path"),
    ('[milter]\nlisten = "/run/milter.sock"\n', "milter.listen", "unix:/PATH"),
    ('[milter]\nlisten = "inet:127.0.0.1"\n', "milter.listen", "HOST:PORT"),
    ('[milter]\nlisten = "inet:127.0.0.1:70000"\n', "milter.listen", "out of range"),
    # listen addresses
    ('[gateway]\nfinger_listen = "79"\n', "gateway.finger_listen", "HOST:PORT"),
    ('[gateway]\nfinger_listen = "0.0.0.0:0"\n', "gateway.finger_listen", "out of range"),
    ('[gateway]\npolicy_listen = "mail.example:10041"\n', "gateway.policy_listen",
     "IP address"),
    ('[gateway]\npolicy_listen = "unix:private/flushctl-policy"\n', "gateway.policy_listen",
     "absolute path"),
    ('[gateway]\npolicy_listen = "inet:127.0.0.1"\n', "gateway.policy_listen", "HOST:PORT"),
    # relays
    (with_domain('relay = "1.2.3.4:25"'), 'domains."x.example".relay', "brackets"),
    (with_domain('relay = "1.2.3.4"'), 'domains."x.example".relay', "brackets"),
    (with_domain('relay = "[mail.customer.example]:99999"'), 'domains."x.example".relay',
     "out of range"),
    (with_domain('relay = "[mail.customer.example]:0"'), 'domains."x.example".relay',
     "out of range"),
    (with_domain('relay = "[mail.customer.example:25"'), 'domains."x.example".relay',
     "[host]:port"),
    (with_domain('relay = "mail.customer.example]:25"'), 'domains."x.example".relay',
     "[host]:port"),
    (with_domain('relay = "[mail.customer.example]:25;id"'), 'domains."x.example".relay',
     "[host]:port"),
    (with_domain('relay = "[-mail.customer.example]:25"'), 'domains."x.example".relay',
     "invalid domain"),
    (with_domain('relay = "[mail]:25"'), 'domains."x.example".relay', "fully qualified"),
    # recipients
    (with_domain('recipients = ["alice@other.example"]'), 'domains."x.example".recipients',
     "not an address in x.example"),
    (with_domain('recipients = ["alice@sub.x.example"]'), 'domains."x.example".recipients',
     "not an address in x.example"),
    (with_domain('recipients = ["alice"]'), 'domains."x.example".recipients',
     "not an address"),
    (with_domain('recipients = []'), 'domains."x.example".recipients', "empty list"),
    # flush_from
    (with_domain('flush_from = ["192.0.2.0/33"]'), 'domains."x.example".flush_from',
     "not an IP network"),
    (with_domain('flush_from = ["customer.example"]'), 'domains."x.example".flush_from',
     "not an IP network"),
    # domain names
    (with_domain("", "X.Example"), 'domains."X.Example"', 'write the domain as "x.example"'),
    (with_domain("", "x.example."), 'domains."x.example."', 'write the domain as "x.example"'),
    (with_domain("", "-x.example"), 'domains."-x.example"', "invalid domain"),
    (with_domain("", "customer"), 'domains."customer"', "fully qualified"),
    (with_domain("", "x.example;id"), 'domains."x.example;id"', "invalid domain"),
    ('[domains]\n"x.example" = 5\n', 'domains."x.example"', "must be a table"),
    ('domains = 5\n', "domains", "table"),
    ('postfix = 5\n', "postfix", "must be a table"),
    # transport service name
    ('[postfix]\ntransport = "On Demand"\n', "postfix.transport", "service name"),
])
def test_bad_config_names_file_and_key(text, key, words):
    message = parse_error(text)
    assert message.startswith(f"{PATH}: {key}: "), message
    assert words in message


def test_domain_key_with_newline_is_refused():
    message = parse_error('[domains."x\\n.example"]\n')
    assert message.startswith(f"{PATH}: domains.")


def test_bad_toml_names_the_file():
    message = parse_error('[domains."x.example"\nrelay = \n')
    assert message.startswith(f"{PATH}: ")
    assert "TOML" in message


def test_error_uses_given_path():
    message = parse_error(with_domain("quota_messages = -5"), path="/srv/other.toml")
    assert message.startswith('/srv/other.toml: domains."x.example".quota_messages: ')


def test_error_names_offending_value():
    message = parse_error(with_domain('relay = "1.2.3.4:25"'))
    assert "[1.2.3.4]:25" in message


# -- load / resolve_path -------------------------------------------------------

def test_load_reads_file(tmp_path):
    path = tmp_path / "flushctl.toml"
    path.write_text(FULL, encoding="utf-8")
    cfg = config.load(str(path))
    assert cfg.path == str(path)
    assert "customer.example" in cfg.domains


def test_load_errors_name_the_file(tmp_path):
    path = tmp_path / "flushctl.toml"
    path.write_text(with_domain("quota_bytes = 0"), encoding="utf-8")
    with pytest.raises(ConfigError, match=rf'^{path}: domains\."x\.example"\.quota_bytes: '):
        config.load(str(path))


def test_load_missing_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        config.load(str(missing))
    assert str(info.value).startswith(f"{missing}: no such file")


def test_resolve_path_option_wins(monkeypatch):
    monkeypatch.setenv("FLUSHCTL_CONFIG", "/from/env.toml")
    assert config.resolve_path("/from/option.toml") == "/from/option.toml"


def test_resolve_path_env_next(monkeypatch):
    monkeypatch.setenv("FLUSHCTL_CONFIG", "/from/env.toml")
    assert config.resolve_path(None) == "/from/env.toml"


def test_resolve_path_default_last(monkeypatch):
    monkeypatch.delenv("FLUSHCTL_CONFIG", raising=False)
    assert config.resolve_path(None) == "/etc/flushctl/flushctl.toml"
    assert config.resolve_path(None) == config.DEFAULT_PATH


def test_resolve_path_empty_env_falls_back_to_default(monkeypatch):
    monkeypatch.setenv("FLUSHCTL_CONFIG", "")
    assert config.resolve_path(None) == config.DEFAULT_PATH



# -- one host:port parser for every section (issue 16, item 6) ---------------------

@pytest.mark.parametrize("text,expected", [
    ('"127.0.0.1"', config.HostPort("127.0.0.1", 53)),
    ('"127.0.0.1:5353"', config.HostPort("127.0.0.1", 5353)),
    ('"::1"', config.HostPort("::1", 53)),
    ('"[::1]"', config.HostPort("::1", 53)),
    ('"[2001:db8::53]:5353"', config.HostPort("2001:db8::53", 5353)),
    # bare, the last group is the address's, never a port
    ('"::1:5353"', config.HostPort("::1:5353", 53)),
])
def test_nameservers_are_typed_host_ports(text, expected):
    cfg = parse(f"[poller]\nnameservers = [{text}]\n")
    assert cfg.nameservers == (expected,)


@pytest.mark.parametrize("section,key,value,says", [
    # with a port, an IPv6 address goes in brackets, in every section alike
    ("gateway", "finger_listen", '"::1:79"', "HOST:PORT"),
    # one range check, one wording
    ("poller", "nameservers", '["127.0.0.1:0"]', "port out of range: 0"),
    ("gateway", "finger_listen", '"127.0.0.1:70000"', "port out of range: 70000"),
    ("cluster", "peers", '["mx2.example:99999"]', "port out of range: 99999"),
    ("gateway", "finger_listen", '"[127.0.0.1:79"', "HOST:PORT"),
    ("poller", "nameservers", '["ns.example"]', "not an IP address"),
])
def test_host_and_port_are_read_alike_everywhere(section, key, value, says):
    with pytest.raises(config.ConfigError) as err:
        parse(f"[{section}]\n{key} = {value}\n")
    assert f"{section}.{key}" in str(err.value)
    if says:
        assert says in str(err.value), str(err.value)


def test_the_digest_is_the_whole_files_even_with_nameservers():
    """Found by the compiled copy's tests: a nameserver loop reused the
    name of the file's text, so the digest (which config an apply made
    live) was that of the last nameserver.  Two configs that differ in a
    domain then looked alike, and a config not yet applied looked live."""
    import hashlib
    base = '[poller]\nnameservers = ["192.0.2.53"]\n'
    one, two = parse(base), parse(base + with_domain('relay = "[192.0.2.7]:25"'))
    assert one.digest != two.digest
    assert two.digest == hashlib.sha256((base + with_domain(
        'relay = "[192.0.2.7]:25"')).encode()).hexdigest()
