"""flushctl.protocols.smtpd_policy: Postfix's policy delegation protocol, pure."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flushctl.protocols import smtpd_policy
from flushctl.protocols.smtpd_policy import ProtocolError, Request

# What smtpd 3.x sends for "ETRN customer.example" (SMTPD_POLICY_README).
ETRN_REQUEST = (
    b"request=smtpd_access_policy\n"
    b"protocol_state=ETRN\n"
    b"protocol_name=ESMTP\n"
    b"client_address=192.0.2.10\n"
    b"client_name=mail.customer.example\n"
    b"client_port=54321\n"
    b"reverse_client_name=mail.customer.example\n"
    b"server_address=198.51.100.1\n"
    b"server_port=25\n"
    b"helo_name=mail.customer.example\n"
    b"sender=\n"
    b"recipient=\n"
    b"recipient_count=0\n"
    b"queue_id=\n"
    b"instance=1a2b.5f0e1c2d.3e4f.0\n"
    b"size=0\n"
    b"etrn_domain=customer.example\n"
    b"stress=\n"
    b"sasl_method=\n"
    b"sasl_username=\n"
    b"ccert_subject=\n"
    b"encryption_protocol=TLSv1.3\n"
    b"encryption_cipher=TLS_AES_256_GCM_SHA384\n"
    b"policy_context=\n"
    b"compatibility_level=3.6\n"
    b"\n"
)


# -- named cases ---------------------------------------------------------------

def test_parse_etrn_request():
    req = smtpd_policy.parse(ETRN_REQUEST)
    assert isinstance(req, Request)
    assert req.state == "ETRN"
    assert req.etrn_domain == "customer.example"
    assert req.client_address == "192.0.2.10"
    assert req.attrs["request"] == "smtpd_access_policy"
    assert req.attrs["sender"] == ""                     # empty values are kept
    assert req.attrs["instance"] == "1a2b.5f0e1c2d.3e4f.0"
    assert req.attrs["compatibility_level"] == "3.6"
    assert len(req.attrs) == 25


def test_parse_etrn_request_with_crlf():
    req = smtpd_policy.parse(ETRN_REQUEST.replace(b"\n", b"\r\n"))
    assert req.state == "ETRN"
    assert req.etrn_domain == "customer.example"
    assert req.client_address == "192.0.2.10"


def test_parse_etrn_hash_domain_kept_verbatim():
    req = smtpd_policy.parse(b"protocol_state=ETRN\netrn_domain=#Customer.Example\n\n")
    assert req.etrn_domain == "#Customer.Example"     # normalised later by wire_domain


def test_parse_rcpt_request():
    req = smtpd_policy.parse(
        b"request=smtpd_access_policy\n"
        b"protocol_state=RCPT\n"
        b"protocol_name=SMTP\n"
        b"client_address=2001:db8::25\n"
        b"sender=alice@sender.example\n"
        b"recipient=bob@customer.example\n"
        b"\n")
    assert req.state == "RCPT"
    assert req.etrn_domain == ""
    assert req.client_address == "2001:db8::25"
    assert req.attrs["recipient"] == "bob@customer.example"


def test_state_is_upper_cased():
    assert smtpd_policy.parse(b"protocol_state=etrn\n\n").state == "ETRN"


def test_defaults_when_missing():
    req = smtpd_policy.parse(b"\n")
    assert req.attrs == {}
    assert req.state == ""
    assert req.client_address == ""
    assert req.etrn_domain == ""


def test_value_may_contain_equals_sign():
    req = smtpd_policy.parse(b"ccert_subject=CN=mail.customer.example,O=x\n\n")
    assert req.attrs == {"ccert_subject": "CN=mail.customer.example,O=x"}


def test_utf8_value():
    req = smtpd_policy.parse("client_name=bücher.example\n\n".encode("utf-8"))
    assert req.attrs["client_name"] == "bücher.example"


def test_request_without_request_attribute_is_accepted():
    assert smtpd_policy.parse(b"protocol_state=ETRN\n\n").attrs == {"protocol_state": "ETRN"}


def test_later_duplicate_wins():
    req = smtpd_policy.parse(b"etrn_domain=a.example\netrn_domain=b.example\n\n")
    assert req.etrn_domain == "b.example"


@pytest.mark.parametrize("block", [
    b"protocol_state\n\n",                     # no '='
    b"request=smtpd_access_policy\nETRN\n\n",
    b"=value\n\n",                             # empty name
    b"protocol state=ETRN\n\n",                # space in name
    b"protocol-state=ETRN\n\n",
    b"protocol.state=ETRN\n\n",
    b" protocol_state=ETRN\n\n",
    b"protocol_state =ETRN\n\n",
    b"___=x\n\n",                              # underscores only
    b"a;b=c\n\n",
    b"a\x00b=c\n\n",
])
def test_parse_bad_line(block):
    with pytest.raises(ProtocolError, match="not an attribute line"):
        smtpd_policy.parse(block)


@pytest.mark.parametrize("block", [
    b"\xff\xfe=x\n\n",
    b"etrn_domain=\xc3\n\n",
    b"client_name=\xed\xa0\x80\n\n",
])
def test_parse_not_utf8(block):
    with pytest.raises(ProtocolError, match="UTF-8"):
        smtpd_policy.parse(block)


def test_parse_oversize():
    assert smtpd_policy.MAX_REQUEST == 32 * 1024
    line = b"x=" + b"a" * 100 + b"\n"
    block = line * (smtpd_policy.MAX_REQUEST // len(line) + 1)
    assert len(block) > smtpd_policy.MAX_REQUEST
    with pytest.raises(ProtocolError, match="too long"):
        smtpd_policy.parse(block)


def test_parse_size_boundary():
    head = b"x="
    exact = head + b"a" * (smtpd_policy.MAX_REQUEST - len(head) - 2) + b"\n\n"
    assert len(exact) == smtpd_policy.MAX_REQUEST
    assert len(smtpd_policy.parse(exact).attrs["x"]) == smtpd_policy.MAX_REQUEST - 4
    with pytest.raises(ProtocolError):
        smtpd_policy.parse(exact[:-2] + b"a\n\n")


def test_parse_too_many_attributes():
    ok = b"".join(b"a%d=1\n" % i for i in range(smtpd_policy.MAX_ATTRIBUTES)) + b"\n"
    assert len(smtpd_policy.parse(ok).attrs) == smtpd_policy.MAX_ATTRIBUTES
    too_many = b"".join(b"a%d=1\n" % i for i in range(smtpd_policy.MAX_ATTRIBUTES + 1)) + b"\n"
    with pytest.raises(ProtocolError, match="too many"):
        smtpd_policy.parse(too_many)


@pytest.mark.parametrize("kind", [b"junk", b"smtpd_access_policy ", b"SMTPD_ACCESS_POLICY", b""])
def test_parse_unknown_request_type(kind):
    with pytest.raises(ProtocolError, match="unknown request type"):
        smtpd_policy.parse(b"request=" + kind + b"\nprotocol_state=ETRN\n\n")


def test_protocol_error_is_a_value_error():
    assert issubclass(ProtocolError, ValueError)


@pytest.mark.parametrize("block", ["ñame=x\n\n", "²=x\n\n", "名前=x\n\n", "ａ=x\n\n"])
def test_parse_non_ascii_attribute_name(block):
    with pytest.raises(ProtocolError):
        smtpd_policy.parse(block.encode("utf-8"))


# -- answer --------------------------------------------------------------------

@pytest.mark.parametrize("action, encoded", [
    ("OK", b"action=OK\n\n"),
    ("DUNNO", b"action=DUNNO\n\n"),
    ("458 4.4.1 <x.example>: unable", b"action=458 4.4.1 <x.example>: unable\n\n"),
    ("", b"action=\n\n"),
    ("  padded  ", b"action=padded\n\n"),
    ("a\tb", b"action=a b\n\n"),
    ("bücher", "action=bücher\n\n".encode("utf-8")),
])
def test_answer(action, encoded):
    assert smtpd_policy.answer(action) == encoded


@pytest.mark.parametrize("action", [
    "OK\naction=REJECT",
    "OK\n\naction=REJECT",
    "OK\r\naction=REJECT",
    "OK\raction=REJECT",
    "OK\u2028action=REJECT",
    "OK\x85action=REJECT",
    "OK\x0baction=REJECT",
    "OK\x0caction=REJECT",
])
def test_answer_cannot_inject_a_second_attribute(action):
    out = smtpd_policy.answer(action)
    assert out == b"action=OK action=REJECT\n\n"
    assert out.count(b"\n") == 2
    assert out.count(b"\r") == 0


def test_answer_surrogate_replaced():
    assert smtpd_policy.answer("OK\udcff") == b"action=OK?\n\n"


def test_dunno():
    assert smtpd_policy.DUNNO == "DUNNO"


# -- properties ----------------------------------------------------------------

@settings(max_examples=5000, deadline=None)
@given(st.one_of(
    st.binary(max_size=400),
    st.text(alphabet=st.sampled_from(list("abz_=\n\r \x00é²request=smtpd_access_policy")),
            max_size=120).map(lambda t: t.encode("utf-8")),
    st.lists(st.tuples(st.sampled_from(["request", "protocol_state", "x", "a_b", "", "a b"]),
                       st.sampled_from(["=", "", "=="]),
                       st.text(max_size=20)), max_size=8)
      .map(lambda items: "".join(n + s + v + "\n" for n, s, v in items).encode("utf-8")),
))
def test_parse_returns_request_or_raises_protocol_error(block):
    try:
        req = smtpd_policy.parse(block)
    except ProtocolError:
        return
    assert isinstance(req, Request)
    assert len(req.attrs) <= smtpd_policy.MAX_ATTRIBUTES
    for name, value in req.attrs.items():
        assert name and "=" not in name and "\n" not in name
        assert "\n" not in value
    assert req.attrs.get("request", "smtpd_access_policy") == "smtpd_access_policy"


_NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"
_names = st.text(alphabet=_NAME_CHARS, min_size=1, max_size=30).filter(
    lambda n: n.strip("_") and n != "request")
_values = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")),
    max_size=60).filter(str.isprintable)


@settings(max_examples=3000, deadline=None)
@given(st.dictionaries(_names, _values, max_size=25),
       st.sampled_from(["\n", "\r\n"]), st.booleans())
def test_parse_round_trips(attrs, eol, with_request):
    if with_request:
        attrs = {"request": "smtpd_access_policy", **attrs}
    block = ("".join(f"{n}={v}{eol}" for n, v in attrs.items()) + eol).encode("utf-8")
    assert smtpd_policy.parse(block).attrs == attrs


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet=st.one_of(
    st.characters(),                                   # any code point but surrogates
    st.sampled_from(list("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029 \t=")),
    st.characters(categories=["Cs"]),                  # lone surrogates
), max_size=200))
def test_answer_is_one_line(action):
    out = smtpd_policy.answer(action)
    assert out.startswith(b"action=")
    assert out.endswith(b"\n\n")
    assert out.count(b"\n\n") == 1
    assert out.count(b"\n") == 2
    assert b"\r" not in out
    assert out.split(b"\n") == [out[:-2], b"", b""]
    # and what we sent parses back as one attribute
    req = smtpd_policy.parse(out)
    assert list(req.attrs) == ["action"]
    assert req.attrs["action"] == out[len(b"action="):-2].decode("utf-8")
