"""The helper's side of ODMR: one-time CRAM-MD5 challenges, logins that
lock out, tokens that name their login's domains only (real store files)."""

import hmac

import pytest

from flushctl.logins import store
from flushctl.logins import tokens as tokens_module
from flushctl.odmr.authority import Tokens, answer
from flushctl.privsep.errors import Malformed

from tests.unit.logins.held_logins import ROOT_ONLY, held_with

pytestmark = ROOT_ONLY


@pytest.fixture
def held(tmp_path):
    return held_with(tmp_path, """
[odmr]
listen = "127.0.0.1:10366"
[domains."home.example"]
odmr = true
users = ["cust1"]
[domains."other.example"]
odmr = true
users = ["cust2"]
""", {"cust1": "pw-one"})


def cram(tokens, held, password="pw-one", challenge=None, user="cust1"):
    challenge = challenge or answer(held, tokens, {"op": "challenge"})["challenge"]
    digest = hmac.new(password.encode(), challenge.encode(), "md5").hexdigest()
    request = {"op": "login", "mechanism": "CRAM-MD5", "user": user, "client": "192.0.2.7",
               "challenge": challenge, "response": digest}
    return answer(held, tokens, request)["token"], request


def test_a_cram_exchange_cannot_be_replayed(held):
    tokens = Tokens(600)
    token, request = cram(tokens, held)
    assert token
    assert answer(held, tokens, request)["token"] is None   # the same exchange again


def test_a_challenge_the_helper_never_gave_is_refused(held):
    token, _ = cram(Tokens(600), held, challenge="<1.2@made.up>")
    assert token is None


def test_failed_logins_lock_the_user_out_even_with_the_right_password(held):
    tokens = Tokens(600, max_failures=3)
    for _ in range(3):
        assert cram(tokens, held, password="wrong")[0] is None
    assert cram(tokens, held)[0] is None
    assert cram(Tokens(600), held)[0]   # a fresh helper: fine again


def test_a_token_reaches_its_logins_domains_only(held):
    tokens = Tokens(600)
    token, _ = cram(tokens, held)
    with pytest.raises(PermissionError):
        answer(held, tokens, {"op": "release", "token": token, "domain": "other.example"})
    with pytest.raises(PermissionError):
        answer(held, tokens, {"op": "held", "token": token, "domains": ["other.example"]})
    with pytest.raises(PermissionError):
        answer(held, tokens, {"op": "release", "token": "forged", "domain": "home.example"})


def test_a_session_result_must_be_one_of_ours(held):
    tokens = Tokens(600)
    token, _ = cram(tokens, held)
    with pytest.raises(Malformed):
        answer(held, tokens, {"op": "end", "token": token, "domains": [], "result": "x{y}",
                              "delivered": 0})


def test_removing_a_login_or_changing_its_password_ends_its_token(held):
    tokens = Tokens(600)
    token, _ = cram(tokens, held)
    request = {"op": "held", "token": token, "domains": ["other.example"]}
    store.set_password(held.config.logins_path, "cust1", "pw-two")
    with pytest.raises(PermissionError, match="removed or its password changed"):
        answer(held, tokens, request)
    token, _ = cram(tokens, held, password="pw-two")
    store.delete_user(held.config.logins_path, "cust1")
    with pytest.raises(PermissionError, match="removed"):
        answer(held, tokens, {**request, "token": token})


def test_a_flood_of_names_does_not_unlock_a_user(held, monkeypatch):
    monkeypatch.setattr(tokens_module, "MAX_FAILED_USERS", 50)
    tokens = Tokens(600, max_failures=3)
    for _ in range(3):
        cram(tokens, held, password="wrong")
    for i in range(200):
        tokens.failed(f"made-up-{i}")
    assert cram(tokens, held)[0] is None
