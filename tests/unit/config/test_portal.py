"""[portal]: defaults, and each bad value refused with its key named."""

import pytest

from flushctl.config import ConfigError, parse


def test_absent_means_no_portal_and_defaults_are_loopback():
    assert parse("").portal is None
    p = parse("[portal]\n").portal
    assert (p.listen.host, p.listen.port, p.user, p.admins) == ("127.0.0.1", 8366, "nobody", ())
    assert p.secure_cookie is True and p.session_lifetime == 8 * 3600


def test_values_are_read():
    p = parse('[portal]\nlisten = "127.0.0.1:9000"\nadmins = ["ops", "Ops2"]\n'
              'session_lifetime = "30m"\nurl = "https://mx.example/held/"\n'
              'secure_cookie = false\ntrusted_proxies = ["::1"]\n').portal
    assert p.listen.port == 9000 and p.session_lifetime == 1800
    assert p.url == "https://mx.example/held" and p.secure_cookie is False
    assert p.trusted_proxies == ("::1",)


@pytest.mark.parametrize("text, key", [
    ('user = "root"', "user"),
    ('listen = "mx.example:80"', "listen"),
    ('url = "javascript:alert(1)"', "url"),
    ('session_lifetime = "-1"', "session_lifetime"),
    ('trusted_proxies = ["proxy.example"]', "trusted_proxies"),
    ('admins = ["bad name"]', "admins"),
    ('nonsense = 1', "nonsense"),
])
def test_bad_values_are_refused(text, key):
    with pytest.raises(ConfigError, match=key):
        parse(f"[portal]\n{text}\n")


def test_a_notice_to_held_mail_is_refused_as_a_loop():
    base = '[domains."a.example"]\nnotify = ["{}"]\n[domains."b.example"]\n'
    for address in ("ops@a.example", "ops@pc1.a.example", "ops@b.example", "OPS@B.Example"):
        with pytest.raises(ConfigError, match="notify: .* is mail for"):
            parse(base.format(address))
    assert parse(base.format("ops@elsewhere.example")).domains["a.example"].notify == \
        ("ops@elsewhere.example",)


@pytest.mark.parametrize("text, key", [
    ('notify = ["not an address"]', "notify"),
    ('notify = ["\\"quoted x\\"@elsewhere.example"]', "notify"),
    ('notify = ["-oops@elsewhere.example"]', "notify"),
    ('notify_webhook = "ftp://x"', "notify_webhook"),
    ('notify_interval = "soon"', "notify_interval"),
])
def test_bad_notify_values_are_refused(text, key):
    with pytest.raises(ConfigError, match=key):
        parse(f'[domains."a.example"]\n{text}\n')


def test_a_webhook_needs_its_secret():
    with pytest.raises(ConfigError, match="webhook_secret_file"):
        parse('[domains."a.example"]\nnotify_webhook = "https://tickets.example/hook"\n')


@pytest.mark.parametrize("address", ["ops%a.example@elsewhere.example",
                                     "a.example!ops@elsewhere.example"])
def test_percent_and_bang_routing_in_a_notice_address_is_refused(address):
    with pytest.raises(ConfigError, match="no % or !"):
        parse(f'[domains."a.example"]\nnotify = ["{address}"]\n')


@pytest.mark.parametrize("key", ["sender", "from"])
def test_notices_are_not_sent_from_a_customer_domain(key):
    with pytest.raises(ConfigError, match=f"notify: {key}: .* is mail for a.example"):
        parse(f'[notify]\n{key} = "postmaster@a.example"\n[domains."a.example"]\n')
