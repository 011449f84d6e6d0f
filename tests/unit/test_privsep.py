"""flushctl.privsep: what the root parent accepts from the unprivileged child."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flushctl import config
from flushctl.privsep import PrivsepError, account, check_request

DOMAINS = {"customer.example": object()}


def req(**kw):
    base = {"id": 1, "domain": "customer.example", "how": "finger", "client": "192.0.2.1"}
    base.update(kw)
    return base


def test_a_good_request():
    assert check_request(req(), DOMAINS) == (1, "customer.example", "finger", "192.0.2.1")
    assert check_request(req(how="etrn", client="2001:db8::1"), DOMAINS)[2] == "etrn"
    assert check_request(req(client="unknown"), DOMAINS)[3] == "unknown"


@pytest.mark.parametrize("bad", [
    req(domain="other.example"),              # not configured
    req(domain="CUSTOMER.example"),           # not in canonical form
    req(domain="customer.example -d ALL"),
    req(domain=["customer.example"]),
    req(how="admin"),                         # only the network triggers
    req(how="poller"),
    req(client="192.0.2.1; rm -rf /"),
    req(client=7),
    req(id="1"),
    req(id=True),
    {"id": 1, "domain": "customer.example", "how": "finger"},
    {**req(), "extra": 1},
    ["customer.example"],
    "customer.example",
])
def test_refused(bad):
    with pytest.raises(ValueError):
        check_request(bad, DOMAINS)


@given(st.dictionaries(st.sampled_from(["id", "domain", "how", "client", "x"]),
                       st.one_of(st.text(), st.integers(), st.none(), st.booleans())))
def test_anything_else_is_a_value_error_or_a_configured_domain(data):
    try:
        rid, domain, how, client = check_request(data, DOMAINS)
    except ValueError:
        return
    assert domain in DOMAINS and how in ("finger", "etrn")


def test_account_refuses_root_and_strangers():
    with pytest.raises(PrivsepError, match="is root"):
        account("root")
    with pytest.raises(PrivsepError, match="does not exist"):
        account("no-such-user-here")
    assert account("nobody").pw_uid != 0


def test_config_user():
    assert config.parse("").gateway.user == "nobody"
    assert config.parse('[gateway]\nuser = "flushctl"').gateway.user == "flushctl"
    assert config.parse('[gateway]\nuser = ""').gateway.user == ""
    with pytest.raises(config.ConfigError, match="must not run as root"):
        config.parse('[gateway]\nuser = "root"')
    with pytest.raises(config.ConfigError, match="not a user name"):
        config.parse('[gateway]\nuser = "-o evil"')
