"""The portal's pure parts: the login throttle, the chart, the held list's
subject and recipients, the history samples (a real ledger file)."""

import time

from flushctl.heldmail.listing import decode_subject, own_recipients
from flushctl.portal.app import _domain_name
from flushctl.portal.guards import FAILURE_MEMORY, Throttle, throttle_key
from flushctl.portal.views import chart


def test_throttle_waits_after_the_limit_and_forgets_in_time():
    t = Throttle(3)
    for i in range(3):
        assert t.wait("192.0.2.1", 100.0 + i) == 0
        t.failed("192.0.2.1", 100.0 + i)
    assert t.wait("192.0.2.1", 103.0) == FAILURE_MEMORY - 3
    assert t.wait("192.0.2.2", 103.0) == 0   # another address is not held up
    assert t.wait("192.0.2.1", 100.0 + FAILURE_MEMORY + 1) == 0


def test_domain_names_in_canonical_form_only():
    assert _domain_name("customer.example")
    for bad in ("Customer.Example", "..", "a" * 300, "customer.example.", "x/y", ""):
        assert not _domain_name(bad), bad


def test_chart_scales_to_the_highest_hour_and_skips_empty_ones():
    hours = [(3600 * h, v) for h, v in enumerate([0, None, 5, 10])]
    c = chart(hours, width=40, height=22)
    assert c["top"] == 10 and [b["v"] for b in c["bars"]] == [5, 10]
    assert c["bars"][1]["h"] == 20 and c["bars"][0]["h"] == 10
    assert chart([])["bars"] == []


def test_subjects_are_decoded_on_one_line_and_cut():
    assert decode_subject("=?utf-8?q?f=C3=BCr?= you") == "für you"
    assert decode_subject("a\r\n\tb") == "a b"
    assert len(decode_subject("x" * 5000)) == 200
    assert decode_subject("=?bogus-charset?q?x?=")   # never an error


def test_only_the_domains_own_recipients_are_shown():
    customers = {"customer.example": 1, "other.example": 1}
    rcpts = ["a@customer.example", "b@other.example", "c@pc1.customer.example",
             "d@elsewhere.example", "a@customer.example", '"x y"@customer.example']
    assert own_recipients(rcpts, "customer.example", customers) == (
        "a@customer.example", "c@pc1.customer.example", '"x y"@customer.example')


def test_history_is_sampled_once_an_hour_and_kept_a_week(tmp_path):
    from flushctl.heldmail.ledger.store import Ledger
    ledger = Ledger(str(tmp_path))
    now = time.time()
    ledger.record("Q1", "customer.example", 10, now)
    hour = (now // 3600) * 3600
    assert ledger.sample_history(hour + 1) is True
    assert ledger.sample_history(hour + 2) is False   # once an hour
    hist = ledger.history("customer.example", now)
    assert len(hist) == 7 * 24 and hist[-1][1] == 1
    assert hist[0][1] is None   # not sampled: no run then
    assert ledger.history("other.example", now)[-1][1] == 0   # sampled, nothing held
    ledger.sample_history(now + 9 * 24 * 3600)
    with ledger._lock:
        oldest = ledger._db.execute("SELECT MIN(hour) FROM history").fetchone()[0]
    assert oldest >= int(now // 3600) + 24


def test_throttle_keys_are_addresses_and_ipv6_64s():
    assert throttle_key("192.0.2.1") == "192.0.2.1"
    assert throttle_key("2001:db8:1:2:3:4:5:6") == throttle_key("2001:db8:1:2::9") \
        == "2001:db8:1:2::/64"
    assert throttle_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert throttle_key("unknown") == "unknown"


def test_an_attempt_counts_from_its_start_and_a_success_is_forgiven():
    t = Throttle(2)
    t.failed("a", 1.0)
    t.failed("a", 1.0)   # two at once: the third waits
    assert t.wait("a", 1.0) > 0
    t.forgive("a")
    assert t.wait("a", 1.0) == 0
