"""[odmr] and a domain's users and odmr: logins that take a domain's mail (RFC 2645)."""

import pytest

from flushctl import config
from flushctl.config import ConfigError, HostPort, OdmrSettings

PATH = "/etc/flushctl/flushctl.toml"
ODMR_DOMAIN = '[domains."customer.example"]\nusers = ["cust1"]\nodmr = true\n'


def parse(text):
    return config.parse(text, PATH)


def parse_error(text) -> str:
    with pytest.raises(ConfigError) as info:
        config.parse(text, PATH)
    return str(info.value)


# -- [odmr] ------------------------------------------------------------------------

def test_no_odmr_section_is_no_odmr():
    cfg = parse("")
    assert cfg.odmr is None
    assert cfg.logins_path == "/var/lib/flushctl/logins"


def test_empty_odmr_section_has_the_defaults():
    odmr = parse("[odmr]\n").odmr
    assert odmr == OdmrSettings()
    assert odmr.listen == (HostPort("0.0.0.0", 366),)
    assert odmr.tls_listen == ()
    assert odmr.user == "nobody"
    assert odmr.relay_port == 367
    assert odmr.tls_cert_file is None and odmr.tls_key_file is None
    assert (odmr.session_timeout, odmr.idle_timeout) == (1800.0, 600.0)
    assert (odmr.auth_failures, odmr.auth_delay, odmr.max_sessions) == (3, 2.0, 100)


def test_every_odmr_key():
    odmr = parse("""
[state]
directory = "/srv/flushctl"
[odmr]
listen = ["192.0.2.1", "[2001:db8::1]:10366", "::"]
tls_listen = "0.0.0.0:4366"
user = "flushctl-odmr"
relay_port = 999
tls_cert_file = "/etc/ssl/odmr.pem"
tls_key_file = "/etc/ssl/odmr.key"
session_timeout = 3600
idle_timeout = 900.5
auth_failures = 5
auth_delay = 0
max_sessions = 20
""").odmr
    assert odmr.listen == (HostPort("192.0.2.1", 366), HostPort("2001:db8::1", 10366),
                           HostPort("::", 366))
    assert odmr.tls_listen == (HostPort("0.0.0.0", 4366),)
    assert odmr.user == "flushctl-odmr"
    assert odmr.relay_port == 999
    assert (odmr.tls_cert_file, odmr.tls_key_file) == ("/etc/ssl/odmr.pem", "/etc/ssl/odmr.key")
    assert odmr.session_timeout == 3600.0 and isinstance(odmr.session_timeout, float)
    assert odmr.idle_timeout == 900.5
    assert (odmr.auth_failures, odmr.auth_delay, odmr.max_sessions) == (5, 0.0, 20)


def test_listen_as_one_string_and_ipv6_in_brackets():
    assert parse('[odmr]\nlisten = "[::]:366"\n').odmr.listen == (HostPort("::", 366),)
    assert str(parse('[odmr]\nlisten = "[::]"\n').odmr.listen[0]) == "[::]:366"


@pytest.mark.parametrize("body, message", [
    ('colour = "blue"', "odmr.colour: unknown key"),
    ('listen = ["mail.example:366"]', "odmr.listen: host must be an IP address"),
    ('listen = ["0.0.0.0:70000"]', "odmr.listen: port out of range"),
    ('listen = ["0.0.0.0", "0.0.0.0:366"]', "odmr.listen: 0.0.0.0:366 is listed twice"),
    ("listen = [366]", "odmr.listen: entries must be strings"),
    ("listen = 366", "odmr.listen: must be a list"),
    ("listen = []", "odmr.listen: no address to listen on"),
    ('tls_listen = ["0.0.0.0"]', "odmr.tls_listen: must be"),   # no default port for TLS
    ('tls_listen = ["0.0.0.0:4366"]', "odmr.tls_listen: implicit TLS needs tls_cert_file"),
    ('tls_listen = ["0.0.0.0:366"]\ntls_cert_file = "/c"\ntls_key_file = "/k"',
     "odmr.tls_listen: 0.0.0.0:366 is in listen too"),
    ('tls_cert_file = "/etc/ssl/odmr.pem"', "odmr.tls_key_file: give tls_cert_file and"),
    ('tls_key_file = "/etc/ssl/odmr.key"', "odmr.tls_cert_file: give tls_cert_file and"),
    ('tls_cert_file = "odmr.pem"\ntls_key_file = "/k"', "odmr.tls_cert_file: must be an absolute"),
    ("relay_port = 1024", "odmr.relay_port: must be below 1024"),
    ("relay_port = 0", "odmr.relay_port: must be greater than zero"),
    ('user = "root"', "odmr.user: the ODMR daemon talks to customers"),
    ('user = "Bad User"', "odmr.user: not a user name"),
    ("session_timeout = 0", "odmr.session_timeout: must be greater than zero"),
    ("idle_timeout = -1", "odmr.idle_timeout: must be greater than zero"),
    ('idle_timeout = "10m"', "odmr.idle_timeout: must be a number"),
    ("auth_failures = 0", "odmr.auth_failures: must be greater than zero"),
    ("auth_failures = 2.5", "odmr.auth_failures: must be an integer"),
    ("auth_delay = -0.5", "odmr.auth_delay: must not be negative"),
    ("max_sessions = 0", "odmr.max_sessions: must be greater than zero"),
])
def test_odmr_refused(body, message):
    error = parse_error(f"[odmr]\n{body}\n")
    assert error.startswith(PATH + ": ")
    assert message in error


def test_odmr_must_be_a_table():
    assert "odmr: must be a table" in parse_error('odmr = "yes"\n')


# -- a domain's users and odmr --------------------------------------------------------

def test_domain_defaults_no_users_no_odmr():
    dom = parse('[domains."customer.example"]\n').domains["customer.example"]
    assert dom.users == () and dom.odmr is False


def test_users_keep_their_order_without_duplicates():
    dom = parse('[domains."customer.example"]\n'
                'users = ["cust1", "Bob@customer.example", "a.b+c_d-e", "cust1", "9"]\n'
                ).domains["customer.example"]
    assert dom.users == ("cust1", "Bob@customer.example", "a.b+c_d-e", "9")
    assert dom.odmr is False   # users without odmr: they may release, delivery as before


def test_an_odmr_domain():
    cfg = parse("[odmr]\n" + ODMR_DOMAIN)
    dom = cfg.domains["customer.example"]
    assert dom.odmr is True and dom.users == ("cust1",)


@pytest.mark.parametrize("users", [
    '["-cust"]', '[".cust"]', '["cust one"]', '["cust/1"]', '[""]', '["cust1\\n"]',
    '["' + "a" * 65 + '"]', '["cüst"]', "[1]", '"cust1"',
])
def test_bad_users_refused(users):
    error = parse_error(f'[domains."customer.example"]\nusers = {users}\n')
    assert error.startswith(f'{PATH}: domains."customer.example".users: ')


def test_longest_user_name_accepted():
    name = "a" * 64
    cfg = parse(f'[domains."customer.example"]\nusers = ["{name}"]\n')
    assert cfg.domains["customer.example"].users == (name,)


@pytest.mark.parametrize("text, message", [
    (ODMR_DOMAIN, "odmr: there is no [odmr] section"),
    ('[odmr]\n[domains."customer.example"]\nodmr = true\n', "odmr: name its users"),
    ('[odmr]\n[domains."customer.example"]\nusers = []\nodmr = true\n',
     "odmr: name its users"),
    ("[odmr]\n" + ODMR_DOMAIN + 'relay = "[192.0.2.7]:25"\n', "odmr: its mail goes out over "
     "ODMR only; drop relay"),
    ("[odmr]\n" + ODMR_DOMAIN + '[domains."customer.example".hosts]\n'
     '"shop.customer.example" = "[192.0.2.8]:25"\n', "drop hosts"),
    ('[odmr]\n[domains."customer.example"]\nodmr = "yes"\n', "odmr: must be true or false"),
    ('[odmr]\n[domains."customer.example"]\nodmr = 1\n', "odmr: must be true or false"),
])
def test_odmr_domain_refused(text, message):
    error = parse_error(text)
    assert error.startswith(f'{PATH}: domains."customer.example".odmr: ')
    assert message in error


def test_login_name_is_the_one_rule():
    assert config.login_name("cust1") == "cust1"
    for bad in ("", "-x", "x y", "a" * 65, None):
        with pytest.raises(ValueError, match="not a login name"):
            config.login_name(bad)
