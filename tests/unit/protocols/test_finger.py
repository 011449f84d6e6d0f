"""flushctl.protocols.finger: RFC 1288 query lines, parsed without sockets."""

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flushctl import names

from flushctl.protocols import finger
from flushctl.protocols.finger import DOMAIN, EMPTY, FORWARD, INVALID, REPORT, Query

KINDS = {EMPTY, DOMAIN, FORWARD, INVALID, REPORT}


# -- named cases ---------------------------------------------------------------

@pytest.mark.parametrize("line, expected", [
    (b"customer.example\r\n", Query(DOMAIN, "customer.example", False)),
    (b"customer.example", Query(DOMAIN, "customer.example", False)),       # no line end
    (b"customer.example\n", Query(DOMAIN, "customer.example", False)),     # bare LF
    (b"CUSTOMER.Example\r\n", Query(DOMAIN, "customer.example", False)),   # case
    (b"/W customer.example\r\n", Query(DOMAIN, "customer.example", True)),
    (b"/w customer.example\r\n", Query(DOMAIN, "customer.example", True)),
    (b"  customer.example  \r\n", Query(DOMAIN, "customer.example", False)),
    (b"customer.example.\r\n", Query(DOMAIN, "customer.example", False)),  # root dot
    (b"#customer.example\r\n", Query(DOMAIN, "customer.example", False)),  # ETRN-style '#'
    (b"mail-1.customer.example\r\n", Query(DOMAIN, "mail-1.customer.example", False)),
])
def test_parse_domain(line, expected):
    assert finger.parse(line) == expected


def test_parse_idn_gives_a_label():
    query = finger.parse("bücher.example\r\n".encode("utf-8"))
    assert query == Query(DOMAIN, "xn--bcher-kva.example", False)


def test_parse_idn_upper_case_and_verbose():
    query = finger.parse("/W BÜCHER.Example\n".encode("utf-8"))
    assert query == Query(DOMAIN, "xn--bcher-kva.example", True)


@pytest.mark.parametrize("line", [b"", b"\r\n", b"\n", b"   \r\n", b"\r"])
def test_parse_empty(line):
    assert finger.parse(line) == Query(EMPTY, "", False)


@pytest.mark.parametrize("line", [b"/W\r\n", b"/w", b"  /W   \n"])
def test_parse_verbose_empty(line):
    assert finger.parse(line) == Query(EMPTY, "", True)


@pytest.mark.parametrize("line", [
    b"x@host\r\n",
    b"alice@customer.example\r\n",
    b"@customer.example\r\n",
    b"customer.example@this-host@other-host\r\n",
    b"/W x@host\r\n",
])
def test_parse_forward(line):
    assert finger.parse(line) == Query(FORWARD, "", False)


@pytest.mark.parametrize("line", [
    b"customer.example other.example\r\n",      # two words
    b"/W customer.example other.example\r\n",
    b"/W /W customer.example\r\n",
    b"customer.example\x00\r\n",                 # NUL
    b"\x00\r\n",
    b"customer\x00.example\r\n",
    b"customer.example\x1b[2J\r\n",             # escape sequence
    b"customer.example\x7f\r\n",                 # DEL
    b"customer.example\t\r\n",                   # TAB is a control char
    b"customer.example\x0b\r\n",
    b"customer.example\r\nother.example\r\n",    # a second line
    b"customer\rexample\r\n",                    # inner bare CR
    b"\xff\xfe\r\n",                             # not UTF-8
    b"customer.example\xc3\r\n",                 # truncated UTF-8 sequence
    b"\xed\xa0\x80.example\r\n",                 # UTF-8 encoded surrogate
    b"\xc0\xae.example\r\n",                     # overlong encoding of '.'
    b"-rf\r\n",
    b"-rf.example\r\n",
    b"a;b.example\r\n",
    b"$(id).example\r\n",
    b"`id`.example\r\n",
    b"customer.example|sh\r\n",
    b"../etc/passwd\r\n",
    b"localhost\r\n",                            # not fully qualified
    b"customer\r\n",
    b"1.2.3.4\r\n",                              # numeric top-level label
    b"customer..example\r\n",
    b"#\r\n",
    b"##customer.example\r\n",
    b"bu\xcc\x88cher..example\r\n",              # IDN with an empty label
])
def test_parse_invalid(line):
    assert finger.parse(line) == Query(INVALID, "", False)


def test_parse_line_length_limit():
    assert finger.MAX_LINE == 512
    # padded with spaces so only the length decides: exactly MAX_LINE is fine ...
    body = b"customer.example"
    line = body + b" " * (finger.MAX_LINE - len(body) - 2) + b"\r\n"
    assert len(line) == finger.MAX_LINE
    assert finger.parse(line) == Query(DOMAIN, "customer.example", False)
    # ... one byte more is not
    longer = body + b" " * (finger.MAX_LINE - len(body) - 1) + b"\r\n"
    assert len(longer) == finger.MAX_LINE + 1
    assert finger.parse(longer) == Query(INVALID)


def test_parse_huge_line_is_invalid():
    assert finger.parse(b"a" * 100_000 + b".example\r\n").kind == INVALID
    assert finger.parse(b"x" * (finger.MAX_LINE + 1)).kind == INVALID


def test_parse_long_domain_under_line_limit_is_invalid():
    # fits the line, but not a domain name (> 253 characters)
    value = ("a" * 63 + ".") * 4 + "example"
    assert finger.parse(value.encode() + b"\r\n").kind == INVALID


# -- age_text ------------------------------------------------------------------

@pytest.mark.parametrize("seconds, text", [
    (0, "0s"),
    (-5, "0s"),              # a clock step backwards never gives a negative age
    (0.9, "0s"),
    (59, "59s"),
    (60, "1m 0s"),
    (61, "1m 1s"),
    (3599, "59m 59s"),
    (3600, "1h 0m"),
    (3600 + 59 * 60 + 59, "1h 59m"),
    (86399, "23h 59m"),
    (86400, "1d 0h"),
    (86400 * 3 + 3600 * 5 + 17, "3d 5h"),
])
def test_age_text(seconds, text):
    assert finger.age_text(seconds) == text


# -- lines_to_bytes ------------------------------------------------------------

def test_lines_to_bytes_crlf():
    assert finger.lines_to_bytes(["one", "two"]) == b"one\r\ntwo\r\n"
    assert finger.lines_to_bytes([]) == b""
    assert finger.lines_to_bytes(["bücher"]) == "bücher\r\n".encode("utf-8")


def test_lines_to_bytes_surrogate_is_replaced():
    assert finger.lines_to_bytes(["a\udcffb"]) == b"a?b\r\n"


def test_not_served_line_names_domain():
    assert finger.NOT_SERVED.format(domain="x.example") == "x.example: not served here."


# -- properties ----------------------------------------------------------------

_SAFE = re.compile(r"^[a-z0-9.-]+$")

# Bytes that look like query lines often enough to reach every branch.
_interesting_text = st.text(
    alphabet=st.sampled_from(list("abcXYZ019.-_@#/Ww ;$()`|\t\r\n\x00\x7f\x85\u00a0"
                                  "üÜß。．ａ\u200b\u2028\u00ad☃")),
    max_size=40)
_lines = st.one_of(
    st.binary(max_size=600),
    st.text(max_size=100).map(lambda t: t.encode("utf-8")),
    _interesting_text.map(lambda t: t.encode("utf-8")),
    st.tuples(st.sampled_from([b"", b"/W ", b"/w ", b"#", b"@", b" "]),
              _interesting_text.map(lambda t: t.encode("utf-8")),
              st.sampled_from([b"", b"\r\n", b"\n", b"\r", b"\r\r\n"]))
      .map(b"".join),
    st.binary(min_size=500, max_size=530),
)


@settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_lines)
def test_parse_never_raises_and_domain_is_argv_safe(line):
    query = finger.parse(line)
    assert isinstance(query, Query)
    assert query.kind in KINDS
    if query.kind in (DOMAIN, REPORT):
        dom = query.domain
        assert _SAFE.match(dom), dom
        assert not dom.startswith("-")
        assert not dom.startswith(".") and not dom.endswith(".")
        assert "." in dom
        assert len(dom) <= 253
        assert names.domain(dom) == dom
        assert len(line) <= finger.MAX_LINE
    else:
        assert query.domain == ""
    if query.kind in (FORWARD, INVALID):
        assert query.verbose is False


_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_LETTERS = _ALNUM[:52]


def _label_of(first, middle, last):
    return first + middle + last


def _labels(first_chars, max_middle):
    return st.one_of(
        st.sampled_from(first_chars),
        st.builds(_label_of, st.sampled_from(first_chars),
                  st.text(alphabet=_ALNUM + "-", max_size=max_middle),
                  st.sampled_from(_ALNUM)))


_label = _labels(_ALNUM, 20)
_tld = _labels(_LETTERS, 10)
_domains = st.builds(lambda labels, tld: ".".join(labels + [tld]),
                     st.lists(_label, min_size=1, max_size=6), _tld)


@settings(max_examples=3000, deadline=None)
@given(_domains, st.sampled_from([b"\r\n", b"\n", b""]), st.booleans())
def test_parse_valid_domain_round_trips(domain, ending, verbose):
    prefix = b"/W " if verbose else b""
    query = finger.parse(prefix + domain.encode("ascii") + ending)
    assert query == Query(DOMAIN, domain.lower(), verbose)


@settings(max_examples=3000, deadline=None)
@given(_domains)
def test_parse_domain_crlf_lower_cased(domain):
    assert finger.parse(domain.encode("ascii") + b"\r\n") == Query(DOMAIN, domain.lower())


@settings(max_examples=2000, deadline=None)
@given(_domains, st.sampled_from(["\x00", "\x01", "\x1b", "\x7f", "\t", "\x0b", "\x0c"]),
       st.integers(min_value=0, max_value=200))
def test_parse_control_char_anywhere_is_invalid(domain, ctrl, where):
    where = min(where, len(domain))
    line = (domain[:where] + ctrl + domain[where:]).encode("ascii") + b"\r\n"
    assert finger.parse(line).kind == INVALID
