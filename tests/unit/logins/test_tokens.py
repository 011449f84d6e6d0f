"""Tokens: one user's many logins never end another user's."""

from flushctl.logins import tokens as tokens_module
from flushctl.logins.tokens import Tokens


class Store:
    def __init__(self, names):
        self.entries = {n: type("Login", (), {"scrypt": "h"})() for n in names}

    def get(self, name):
        return self.entries.get(name)


def test_a_users_many_logins_end_its_own_oldest_not_anothers(monkeypatch):
    """Before: at the table's limit the token that expired first went,
    whoever's it was: one customer logging in over and over logged every
    other customer out."""
    monkeypatch.setattr(tokens_module, "MAX_TOKENS", 10)
    monkeypatch.setattr(tokens_module, "MAX_PER_USER", 3)
    t = Tokens(600)
    store = Store(["a", "b"])
    b = t.grant("b", "h")
    mine = [t.grant("a", "h") for _ in range(50)]
    assert t.user(b, store) == "b"
    assert [t.user(x, store) for x in mine[-3:]] == ["a"] * 3
    live = 0
    for x in mine[:-3]:
        try:
            t.user(x, store)
            live += 1
        except PermissionError:
            pass
    assert live == 0


def test_a_full_table_grants_nothing_new(monkeypatch):
    monkeypatch.setattr(tokens_module, "MAX_TOKENS", 4)
    t = Tokens(600)
    assert all(t.grant(f"u{i}", "h") for i in range(4))
    assert t.grant("u9", "h") is None
