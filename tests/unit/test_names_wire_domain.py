"""flushctl.names.wire_domain: a domain as it comes from finger or ETRN."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flushctl import names


@pytest.mark.parametrize("value, expected", [
    ("customer.example", "customer.example"),
    ("Customer.EXAMPLE", "customer.example"),
    ("#Customer.Example", "customer.example"),        # RFC 1985 '#' form
    ("@customer.example", "customer.example"),        # RFC 1985 '@' form
    ("@Customer.Example.", "customer.example"),
    ("  #customer.example  ", "customer.example"),
    ("x.example\n", "x.example"),                     # surrounding whitespace is stripped
    ("x.example\r\n", "x.example"),
    ("bücher.example", "xn--bcher-kva.example"),      # IDNA: U-label -> A-label
    ("BÜCHER.Example", "xn--bcher-kva.example"),
    ("#bücher.example", "xn--bcher-kva.example"),
    ("bücher。example", "xn--bcher-kva.example"),     # ideographic full stop separates labels
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("\u0430.example", "xn--80a.example"),            # Cyrillic 'а' is not Latin 'a'
    ("ｃｕｓｔｏｍｅｒ.example", "customer.example"),  # full-width letters fold (nameprep)
])
def test_wire_domain_valid(value, expected):
    assert names.wire_domain(value) == expected


@pytest.mark.parametrize("value", [
    "",
    " ",
    "#",                           # the prefix alone
    "@",
    "# ",
    "##x.example",                 # only one prefix is stripped
    "#@x.example",
    "@@x.example",
    "-x.example",                  # would look like an option
    "#-x.example",
    "-rf",
    "x.example\nother.example",    # an embedded newline
    "x.example other.example",
    "x.example;id",
    "$(id).example",
    "`id`.example",
    "a;b.example",
    "x_y.example",
    "customer",                    # not fully qualified
    "#customer",
    "customer.123",                # numeric top-level label
    "customer..example",
    "bücher..example",             # IDN with an empty label
    "b\u00fccher.example\x00",
    "a" * 64 + ".example",         # label too long
    "ü" * 64 + ".example",         # IDN label too long
    ("a" * 63 + ".") * 4 + "example",   # 263 > 253
    "a." * 128 + "example",             # > 255 before validation
    "#" + "a." * 128 + "example",
])
def test_wire_domain_invalid(value):
    with pytest.raises(ValueError):
        names.wire_domain(value)


def test_wire_domain_length_limit():
    value = ("a" * 61 + ".") * 3 + "a" * 59 + ".example"
    assert len(value) == 253
    assert names.wire_domain("#" + value) == value
    with pytest.raises(ValueError):
        names.wire_domain("#a" + value)


@pytest.mark.parametrize("value", [None, 42, b"customer.example"])
def test_wire_domain_not_a_string(value):
    with pytest.raises(ValueError):
        names.wire_domain(value)


_SAFE = re.compile(r"^[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?$")


@settings(max_examples=5000, deadline=None)
@given(st.one_of(
    st.text(max_size=80),
    st.text(alphabet=st.sampled_from(list("aZ9.-#@ \n;$ü。．ａ\u00ad\u200bß☃Ω\u0301")),
            max_size=40),
))
def test_wire_domain_is_safe_or_raises(value):
    try:
        out = names.wire_domain(value)
    except ValueError:
        return
    assert _SAFE.match(out), out
    assert "." in out
    assert ".." not in out
    assert len(out) <= 253
    assert out.isascii()
    assert names.domain(out) == out
    assert names.wire_domain(out) == out          # idempotent
