"""flushctl.names: what may reach a Postfix command line or map file."""

import pytest

from flushctl import names


# -- domain --------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("customer.example", "customer.example"),
    ("Customer.EXAMPLE", "customer.example"),
    ("  customer.example  ", "customer.example"),
    ("customer.example.", "customer.example"),
    ("mail-1.customer.example", "mail-1.customer.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("a.b.c.d.example", "a.b.c.d.example"),
    ("123.example", "123.example"),           # numeric labels are fine except the TLD
    ("a" * 63 + ".example", "a" * 63 + ".example"),
])
def test_domain_valid(value, expected):
    assert names.domain(value) == expected


@pytest.mark.parametrize("value", [
    "",
    "   ",
    ".",
    "-customer.example",                 # leading '-' would look like an option
    "-h",
    "customer-.example",                 # label ends with '-'
    "customer.-example",
    "customer.example;rm -rf /",        # shell metacharacter
    "customer;.example",
    "$(x).example",
    "customer.example$(x)",
    "`id`.example",
    "custo mer.example",                 # inner space
    "customer.example x",
    "customer..example",                 # empty label
    ".customer.example",
    "customer",                          # single label
    "localhost",
    "customer.123",                      # numeric TLD
    "1.2.3.4",
    "a" * 64 + ".example",               # label too long
    ("a" * 63 + ".") * 4 + "example",    # 263 chars > 253
    "under_score.example",
    "customer.example/x",
    "../etc.example",
    "cust*omer.example",
])
def test_domain_invalid(value):
    with pytest.raises(ValueError):
        names.domain(value)


def test_domain_too_long_message():
    value = ("a" * 63 + ".") * 4 + "example"
    assert len(value) > 253
    with pytest.raises(ValueError, match="too long"):
        names.domain(value)


def test_domain_just_long_enough():
    value = ("a" * 61 + ".") * 3 + "a" * 60 + ".example"  # 62*3 + 60 + 8 = 254
    assert len(value) == 254
    with pytest.raises(ValueError, match="too long"):
        names.domain(value)
    value = ("a" * 61 + ".") * 3 + "a" * 59 + ".example"  # 253: the limit
    assert len(value) == 253
    assert names.domain(value) == value


def test_domain_single_label_message():
    with pytest.raises(ValueError, match="fully qualified"):
        names.domain("customer")


def test_domain_numeric_tld_message():
    with pytest.raises(ValueError, match="numeric top-level"):
        names.domain("customer.42")


@pytest.mark.parametrize("value", [None, 42, b"customer.example"])
def test_domain_not_a_string(value):
    with pytest.raises(ValueError):
        names.domain(value)


@pytest.mark.parametrize("value", ["example\n.com", "a.example\n.com"])
def test_domain_rejects_embedded_newline(value):
    with pytest.raises(ValueError):
        names.domain(value)


# -- queue_id ------------------------------------------------------------------

@pytest.mark.parametrize("value", [
    "4jcczJ2wnFzJ9C2",       # long ids (enable_long_queue_ids = yes)
    "4jcczJ2xwpzJ9C3",
    "4jcczJ2v7dzJ9C1",
    "3F2A81C0B",             # short hex id
    "ABCDEF",                # shortest accepted
    "A" * 32,                # longest accepted
])
def test_queue_id_valid(value):
    assert names.queue_id(value) == value


@pytest.mark.parametrize("value", [
    "",
    "-h",
    "-ALL",
    "../x",
    "../../etc/passwd",
    "ABC",                    # too short
    "A" * 33,                 # too long
    "3F2A81C0B;id",
    "3F2A81C0B $(x)",
    "3F2A 81C0B",
    "3F2A81C0B/",
    "ALL ",
    None,
    12345678,
])
def test_queue_id_invalid(value):
    with pytest.raises(ValueError):
        names.queue_id(value)


def test_queue_id_rejects_trailing_newline():
    with pytest.raises(ValueError):
        names.queue_id("3F2A81C0B\n")


# -- address -------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("alice@customer.example", ("alice", "customer.example")),
    ("<alice@customer.example>", ("alice", "customer.example")),
    (" <alice@customer.example> ", ("alice", "customer.example")),
    ("Alice@Customer.Example", ("Alice", "customer.example")),  # local part kept as is
    ("<alice+tag@mx.customer.example.>", ("alice+tag", "mx.customer.example")),
    ('"odd@local"@customer.example', ('"odd@local"', "customer.example")),
])
def test_address_valid(value, expected):
    assert names.address(value) == expected


@pytest.mark.parametrize("value", [
    "",
    "<>",
    "alice",
    "<alice>",
    "@customer.example",
    "<@customer.example>",
    "alice@",
    "alice@customer",                 # domain not fully qualified
    "al ice@customer.example",
    "alice;x@customer.example",
    "alice,bob@customer.example",
    "a<b@customer.example",
    "alice@-customer.example",
    "alice@customer.example;x",
])
def test_address_invalid(value):
    with pytest.raises(ValueError):
        names.address(value)


# -- customer_of ---------------------------------------------------------------

CUSTOMERS = {"customer.example": 1, "other.example": 2, "deep.sub.third.example": 3}


@pytest.mark.parametrize("rcpt_domain, expected", [
    ("customer.example", "customer.example"),
    ("Customer.Example.", "customer.example"),
    ("mx.customer.example", "customer.example"),
    ("a.b.c.customer.example", "customer.example"),
    ("other.example", "other.example"),
    ("x.other.example", "other.example"),
    ("deep.sub.third.example", "deep.sub.third.example"),
    ("x.deep.sub.third.example", "deep.sub.third.example"),
    ("sub.third.example", None),           # parent of a customer is not a customer
    ("third.example", None),
    ("notcustomer.example", None),         # suffix match only on label boundaries
    ("customer.example.net", None),
    ("example", None),
    ("stranger.example", None),
    ("", None),
])
def test_customer_of(rcpt_domain, expected):
    assert names.customer_of(rcpt_domain, CUSTOMERS) == expected


def test_customer_of_prefers_nearest_parent():
    customers = {"customer.example", "eu.customer.example"}
    assert names.customer_of("mx.eu.customer.example", customers) == "eu.customer.example"
    assert names.customer_of("us.customer.example", customers) == "customer.example"


def test_customer_of_never_matches_bare_tld():
    # "example" alone is never a configured name; the walk stops at two labels
    assert names.customer_of("a.example", {"example"}) is None


# -- whose mail is it: lenient splitting of envelope recipients --------------

@pytest.mark.parametrize("rcpt, expected", [
    ("alice@customer.example", ("alice", "customer.example")),
    ("<Alice@Customer.Example.>", ("Alice", "customer.example")),
    ('"john doe"@customer.example', ('"john doe"', "customer.example")),
    ("u@pc_1.customer.example", ("u", "pc_1.customer.example")),
    ("a@b@customer.example", ("a@b", "customer.example")),
    ("postmaster", None),
    ("@customer.example", None),
    ("u@", None),
    ("u@[192.0.2.1]", None),
    ("u@bad domain.example", None),
])
def test_split_recipient(rcpt, expected):
    from flushctl.names import split_recipient
    assert split_recipient(rcpt) == expected
