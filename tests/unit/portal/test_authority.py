"""The helper's side of the portal: logins against a real store, what a
login may see, and every request field checked before anything is done."""


import pytest

from flushctl.logins.tokens import Tokens
from flushctl.portal.authority import answer, visible
from flushctl.privsep.errors import Malformed

from tests.unit.logins.held_logins import ROOT_ONLY, held_with

pytestmark = ROOT_ONLY


@pytest.fixture
def held(tmp_path):
    return held_with(tmp_path, """
[portal]
admins = ["ops"]
[domains."home.example"]
users = ["cust1"]
[domains."other.example"]
users = ["cust2"]
""", {"cust1": "pw-one", "ops": "pw-ops"})


def login(held, tokens, user="cust1", password="pw-one", client="192.0.2.7"):
    return answer(held, tokens, {"op": "login", "user": user, "password": password,
                                 "client": client})


def test_a_login_sees_its_own_domains_an_admin_all(held):
    assert visible(held.config, "cust1") == ["home.example"]
    assert visible(held.config, "ops") == ["home.example", "other.example"]
    assert visible(held.config, "nobody") == []
    tokens = Tokens(600)
    grant = login(held, tokens)
    assert grant["user"] == "cust1" and grant["admin"] is False
    mine = answer(held, tokens, {"op": "whoami", "token": grant["token"]})
    assert mine == {"user": "cust1", "admin": False, "domains": ["home.example"]}


def test_another_customers_domain_and_none_at_all_are_the_same_refusal(held):
    tokens = Tokens(600)
    token = login(held, tokens)["token"]
    for name in ("other.example", "nosuch.example"):
        with pytest.raises(PermissionError, match="no such domain"):
            answer(held, tokens, {"op": "release", "domain": name, "token": token})


def test_failures_lock_a_login_from_one_address_only(held):
    tokens = Tokens(600, max_failures=3)
    for _ in range(3):
        assert login(held, tokens, password="wrong", client="192.0.2.9")["token"] is None
    assert login(held, tokens, client="192.0.2.9")["token"] is None      # locked there
    assert login(held, tokens, client="198.51.100.1")["token"]          # not elsewhere


@pytest.mark.parametrize("request_", [
    {"op": "login", "user": "cust1", "password": "pw-one", "client": "not an address"},
    {"op": "login", "user": "cust1", "password": "pw-one", "client": "1" * 101},
    {"op": "login", "user": "u" * 201, "password": "x", "client": "192.0.2.1"},
    {"op": "login", "user": "cust1", "password": 5, "client": "192.0.2.1"},
])
def test_a_request_the_portal_would_never_send_is_malformed(held, request_):
    with pytest.raises(Malformed):
        answer(held, Tokens(600), request_)


def test_a_logout_needs_a_live_token(held):
    tokens = Tokens(600)
    token = login(held, tokens)["token"]
    assert answer(held, tokens, {"op": "logout", "token": token}) == {}
    with pytest.raises(PermissionError):
        answer(held, tokens, {"op": "logout", "token": token})
