"""flushctl_milter.rules: RCPT and end-of-message decisions (no sockets)."""

import pytest

from flushctl import config
from flushctl_milter import rules
from flushctl_milter.rules import OTHER, QUOTA, SECOND_DOMAIN, UNKNOWN_RECIPIENT

CONFIG = """
[domains."customer.example"]
relay = "[mail.customer.example]:25"

[domains."second.example"]

[domains."listed.example"]
recipients = ["alice@listed.example", "Bob@listed.example"]

[domains."small.example"]
quota_messages = 2

[domains."bytes.example"]
quota_bytes = 1000
"""

DOMAINS = config.parse(CONFIG, "/etc/flushctl/t.toml").domains


def totals_of(values=None):
    """A totals(domain) function; unknown domains hold nothing."""
    values = values or {}
    calls = []

    def totals(domain):
        calls.append(domain)
        return values.get(domain, (0, 0))
    totals.calls = calls
    return totals


EMPTY = totals_of()


def rcpt(address, current=None, totals=EMPTY):
    return rules.decide_rcpt(address, current, DOMAINS, totals)


# -- replies -------------------------------------------------------------------

def test_reply_codes():
    assert (SECOND_DOMAIN.code, SECOND_DOMAIN.dsn) == ("452", "4.5.3")
    assert (UNKNOWN_RECIPIENT.code, UNKNOWN_RECIPIENT.dsn) == ("550", "5.1.1")
    assert (QUOTA.code, QUOTA.dsn) == ("452", "4.2.2")
    assert (rules.LOCAL_PROBLEM.code, rules.LOCAL_PROBLEM.dsn) == ("451", "4.3.0")
    assert SECOND_DOMAIN.temporary and QUOTA.temporary and rules.LOCAL_PROBLEM.temporary
    assert not UNKNOWN_RECIPIENT.temporary


# -- classes -------------------------------------------------------------------

@pytest.mark.parametrize("address, expected", [
    ("<alice@customer.example>", ("customer.example", "alice", "customer.example")),
    ("<Alice@MX.Customer.Example>", ("customer.example", "Alice", "mx.customer.example")),
    ("<someone@stranger.example>", (OTHER, None, None)),
    ("<>", (OTHER, None, None)),
    ("postmaster", (OTHER, None, None)),
])
def test_recipient_class(address, expected):
    assert rules.recipient_class(address, DOMAINS) == expected


# -- decide_rcpt ---------------------------------------------------------------

def test_first_customer_recipient_sets_class():
    assert rcpt("<alice@customer.example>") == (None, "customer.example")


def test_same_customer_again_accepted():
    assert rcpt("<bob@customer.example>", "customer.example") == (None, "customer.example")


def test_subdomain_recipient_belongs_to_customer():
    assert rcpt("<bob@mx.customer.example>") == (None, "customer.example")
    assert rcpt("<bob@mx.customer.example>", "customer.example") == (None, "customer.example")


def test_second_customer_domain_refused():
    reply, klass = rcpt("<carol@second.example>", "customer.example")
    assert reply is SECOND_DOMAIN
    assert (reply.code, reply.dsn) == ("452", "4.5.3")
    assert klass == "customer.example"


def test_non_customer_after_customer_refused():
    reply, klass = rcpt("<someone@stranger.example>", "customer.example")
    assert reply is SECOND_DOMAIN
    assert klass == "customer.example"


def test_customer_after_non_customer_refused():
    reply, klass = rcpt("<alice@customer.example>", OTHER)
    assert reply is SECOND_DOMAIN
    assert klass == OTHER


def test_non_customer_first_sets_other():
    assert rcpt("<someone@stranger.example>") == (None, OTHER)
    assert rcpt("<another@elsewhere.example>", OTHER) == (None, OTHER)


def test_listed_domain_known_recipient():
    assert rcpt("<alice@listed.example>") == (None, "listed.example")


@pytest.mark.parametrize("address", [
    "<ALICE@listed.example>",
    "<Alice@Listed.Example>",
    "<bob@listed.example>",
    "<BOB@LISTED.EXAMPLE>",
])
def test_listed_domain_local_part_case_insensitive(address):
    assert rcpt(address) == (None, "listed.example")


def test_listed_domain_unknown_local_part():
    reply, klass = rcpt("<mallory@listed.example>")
    assert reply is UNKNOWN_RECIPIENT
    assert (reply.code, reply.dsn) == ("550", "5.1.1")
    assert klass is None   # nothing accepted yet: no class


def test_listed_domain_unknown_keeps_class():
    reply, klass = rcpt("<mallory@listed.example>", "listed.example")
    assert reply is UNKNOWN_RECIPIENT
    assert klass == "listed.example"


def test_listed_domain_subdomain_recipient_refused():
    reply, klass = rcpt("<alice@sub.listed.example>")
    assert reply is UNKNOWN_RECIPIENT
    assert reply.code == "550"
    assert klass is None


def test_quota_messages_reached():
    totals = totals_of({"small.example": (2, 0)})
    reply, klass = rcpt("<x@small.example>", totals=totals)
    assert reply is QUOTA
    assert (reply.code, reply.dsn) == ("452", "4.2.2")
    assert klass is None
    assert totals.calls == ["small.example"]


def test_quota_messages_below():
    totals = totals_of({"small.example": (1, 0)})
    assert rcpt("<x@small.example>", totals=totals) == (None, "small.example")


def test_quota_messages_far_over():
    totals = totals_of({"small.example": (50, 0)})
    assert rcpt("<x@small.example>", totals=totals)[0] is QUOTA


def test_quota_bytes_full_at_rcpt():
    assert rcpt("<x@bytes.example>", totals=totals_of({"bytes.example": (3, 1000)}))[0] is QUOTA
    assert rcpt("<x@bytes.example>", totals=totals_of({"bytes.example": (3, 999)})) == \
        (None, "bytes.example")


def test_no_quota_never_over():
    totals = totals_of({"customer.example": (10**6, 10**12)})
    assert rcpt("<x@customer.example>", totals=totals) == (None, "customer.example")


def test_non_customer_does_not_ask_totals():
    totals = totals_of()
    rcpt("<x@stranger.example>", totals=totals)
    assert totals.calls == []


# -- decide_eom ----------------------------------------------------------------

def test_eom_no_class():
    assert rules.decide_eom(None, 10**9, DOMAINS, EMPTY) is None
    assert rules.decide_eom(OTHER, 10**9, DOMAINS, EMPTY) is None


def test_eom_quota_bytes_pushed_over():
    totals = totals_of({"bytes.example": (1, 500)})
    assert rules.decide_eom("bytes.example", 501, DOMAINS, totals) is QUOTA


def test_eom_quota_bytes_exactly_full_fits():
    totals = totals_of({"bytes.example": (1, 500)})
    assert rules.decide_eom("bytes.example", 500, DOMAINS, totals) is None


def test_eom_quota_bytes_small_message_fits():
    totals = totals_of({"bytes.example": (1, 500)})
    assert rules.decide_eom("bytes.example", 100, DOMAINS, totals) is None


def test_eom_quota_bytes_message_alone_too_big():
    assert rules.decide_eom("bytes.example", 1001, DOMAINS, EMPTY) is QUOTA


def test_eom_quota_messages():
    assert rules.decide_eom("small.example", 10, DOMAINS,
                             totals_of({"small.example": (2, 0)})) is QUOTA
    assert rules.decide_eom("small.example", 10, DOMAINS,
                             totals_of({"small.example": (1, 0)})) is None


def test_eom_without_quota():
    assert rules.decide_eom("customer.example", 10**9, DOMAINS,
                             totals_of({"customer.example": (10**5, 10**10)})) is None


@pytest.mark.parametrize("messages, held, size, over", [
    (0, 0, 0, False),
    (1, 0, 0, False),
    (2, 0, 0, True),
])
def test_over_quota_messages(messages, held, size, over):
    assert rules.over_quota(DOMAINS["small.example"], messages, held, size) is over


@pytest.mark.parametrize("held, size, over", [
    (0, 1000, False),
    (0, 1001, True),
    (999, 0, False),     # counts as one byte
    (1000, 0, True),
    (400, 600, False),
    (400, 601, True),
])
def test_over_quota_bytes(held, size, over):
    assert rules.over_quota(DOMAINS["bytes.example"], 0, held, size) is over


@pytest.mark.parametrize("rcpt, klass", [
    ('"john doe"@customer.example', "customer.example"),   # Postfix accepts these:
    ("u@pc_1.customer.example", "customer.example"),      # never let them slip past
])
def test_odd_but_valid_recipients_are_the_customers(rcpt, klass):
    from flushctl_milter.rules import recipient_class
    assert recipient_class(rcpt, DOMAINS)[0] == klass


def test_quoted_local_part_is_matched_unquoted_against_the_list():
    from flushctl_milter.rules import recipient_class
    _, local, _ = recipient_class('"Alice"@listed.example', DOMAINS)
    assert local == "Alice"
