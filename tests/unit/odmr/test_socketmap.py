"""Postfix's socketmap protocol: netstrings in, answers out (pure)."""

import pytest

from flushctl.odmr.socketmap import Malformed, answer, netstring, parse_netstring


def test_netstrings():
    assert parse_netstring(b"8:odmr a.b,rest") == (b"odmr a.b", b"rest")
    assert parse_netstring(b"9:odmr a.") == (None, b"9:odmr a.")     # not all there yet
    assert parse_netstring(b"") == (None, b"")
    assert netstring("OK x") == b"4:OK x,"


@pytest.mark.parametrize("bad", [b"x:abc,", b"3:abcd", b"01:a,", b"9999999:", b"1234567",
                                 b"20000:" + b"a" * 20001 + b","])
def test_what_is_not_a_netstring(bad):
    with pytest.raises(Malformed):
        parse_netstring(bad)


def test_answers():
    lookup = {"home.example": "odmr:[127.0.0.1]:4000"}.get
    assert answer(b"odmr home.example", lambda k: lookup(k) or "ondemand:") == \
        "OK odmr:[127.0.0.1]:4000"
    assert answer(b"odmr HOME.example.", lambda k: lookup(k) or "ondemand:") == \
        "OK odmr:[127.0.0.1]:4000"
    assert answer(b"odmr other.example", lambda k: lookup(k) or "ondemand:") == "OK ondemand:"
    assert answer(b"transport x", lambda k: "no").startswith("PERM")
