"""flushctl.heldmail.ledger: held messages and per-domain totals in SQLite."""

import os
import time

import pytest

from flushctl.heldmail.ledger.schema import FILENAME, DomainState, Entry
from flushctl.heldmail.ledger.store import Ledger


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(str(tmp_path / "state"))
    yield led
    led.close()


def row(entry):
    """The fields every version of Entry has."""
    return (entry.queue_id, entry.domain, entry.size, entry.arrival)


def totals(led, domain):
    st = led.state(domain)
    return st.messages, st.bytes


def test_creates_database_in_state_directory(tmp_path):
    led = Ledger(str(tmp_path / "a" / "b"))
    try:
        assert led.path == str(tmp_path / "a" / "b" / FILENAME)
        assert os.path.exists(led.path)
    finally:
        led.close()


def test_unknown_domain_state_is_empty(ledger):
    assert ledger.state("nobody.example") == DomainState("nobody.example")
    st = ledger.state("nobody.example")
    assert (st.messages, st.bytes, st.paused, st.reachable) == (0, 0, False, None)
    assert ledger.entries("nobody.example") == []


def test_record_updates_totals(ledger):
    assert ledger.record("4jcczJ2wnFzJ9C2", "customer.example", 100, arrival=1000.0) is True
    assert ledger.record("4jcczJ2xwpzJ9C3", "customer.example", 250, arrival=1001.0) is True
    assert ledger.record("4jcczJ2v7dzJ9C1", "other.example", 7, arrival=999.0) is True
    assert totals(ledger, "customer.example") == (2, 350)
    assert totals(ledger, "other.example") == (1, 7)


def test_duplicate_record_returns_false_and_keeps_totals(ledger):
    assert ledger.record("4jcczJ2wnFzJ9C2", "customer.example", 100, arrival=1.0)
    assert ledger.record("4jcczJ2wnFzJ9C2", "customer.example", 100, arrival=2.0) is False
    # same id for another domain is also a duplicate
    assert ledger.record("4jcczJ2wnFzJ9C2", "other.example", 5) is False
    assert totals(ledger, "customer.example") == (1, 100)
    assert totals(ledger, "other.example") == (0, 0)
    assert [row(e) for e in ledger.entries("customer.example")] == [
        ("4jcczJ2wnFzJ9C2", "customer.example", 100, 1.0)]
    assert ledger.entries("other.example") == []


def test_entries_ordered_by_arrival(ledger):
    ledger.record("CCCCCC", "customer.example", 3, arrival=30.0)
    ledger.record("AAAAAA", "customer.example", 1, arrival=10.0)
    ledger.record("BBBBBB", "customer.example", 2, arrival=20.0)
    ledger.record("DDDDDD", "other.example", 4, arrival=5.0)
    assert [e.queue_id for e in ledger.entries("customer.example")] == \
        ["AAAAAA", "BBBBBB", "CCCCCC"]
    assert row(ledger.entries("customer.example")[0]) == ("AAAAAA", "customer.example", 1, 10.0)
    assert all(isinstance(e, Entry) for e in ledger.entries("customer.example"))


def test_record_default_arrival_is_now(ledger):
    before = time.time()
    ledger.record("AAAAAA", "customer.example", 1)
    after = time.time()
    (entry,) = ledger.entries("customer.example")
    assert before <= entry.arrival <= after


def test_forget_updates_totals(ledger):
    ledger.record("AAAAAA", "customer.example", 100, arrival=1.0)
    ledger.record("BBBBBB", "customer.example", 200, arrival=2.0)
    ledger.record("CCCCCC", "other.example", 300, arrival=3.0)
    assert ledger.forget(["AAAAAA", "CCCCCC"]) == 2
    assert totals(ledger, "customer.example") == (1, 200)
    assert totals(ledger, "other.example") == (0, 0)
    assert [e.queue_id for e in ledger.entries("customer.example")] == ["BBBBBB"]
    assert ledger.entries("other.example") == []


def test_forget_unknown_and_twice(ledger):
    ledger.record("AAAAAA", "customer.example", 100)
    assert ledger.forget(["ZZZZZZ"]) == 0
    assert ledger.forget(iter(["AAAAAA", "AAAAAA"])) == 1
    assert ledger.forget(["AAAAAA"]) == 0
    assert ledger.forget([]) == 0
    assert totals(ledger, "customer.example") == (0, 0)


def test_record_again_after_forget(ledger):
    ledger.record("AAAAAA", "customer.example", 100)
    ledger.forget(["AAAAAA"])
    assert ledger.record("AAAAAA", "customer.example", 40) is True
    assert totals(ledger, "customer.example") == (1, 40)


def test_totals_match_entries_after_mixed_operations(ledger):
    for i in range(20):
        ledger.record(f"Q{i:06d}", "customer.example", 10 + i, arrival=float(i))
    ledger.forget([f"Q{i:06d}" for i in range(0, 20, 3)])
    ledger.record("Q000005", "customer.example", 999)  # duplicate, ignored
    entries = ledger.entries("customer.example")
    assert totals(ledger, "customer.example") == (len(entries), sum(e.size for e in entries))
    assert len(entries) == 13


def test_set_paused(ledger):
    ledger.set_paused("customer.example", True)
    assert ledger.state("customer.example").paused is True
    ledger.set_paused("customer.example", False)
    assert ledger.state("customer.example").paused is False


def test_set_paused_keeps_totals(ledger):
    ledger.record("AAAAAA", "customer.example", 100)
    ledger.set_paused("customer.example", True)
    st = ledger.state("customer.example")
    assert (st.messages, st.bytes, st.paused) == (1, 100, True)


def test_record_flush(ledger):
    ledger.record_flush("customer.example", "finger", "released 3", releasing_until=2000.0,
                        when=1000.0)
    st = ledger.state("customer.example")
    assert st.last_flush == 1000.0
    assert st.last_flush_trigger == "finger"
    assert st.last_flush_result == "released 3"
    assert st.releasing_until == 2000.0
    assert st.paused is False


def test_record_probe(ledger):
    ledger.record_probe("customer.example", False, "connection refused", when=5.0)
    st = ledger.state("customer.example")
    assert (st.reachable, st.last_error, st.last_probe) == (False, "connection refused", 5.0)
    ledger.record_probe("customer.example", True, None, when=6.0)
    st = ledger.state("customer.example")
    assert (st.reachable, st.last_error, st.last_probe) == (True, None, 6.0)


def test_releasing_domains(ledger):
    ledger.record_flush("a.example", "admin", "released 1", releasing_until=2000.0, when=1.0)
    ledger.record_flush("b.example", "etrn", "released 2", releasing_until=1500.0, when=1.0)
    ledger.record_flush("c.example", "admin", "not released", releasing_until=None, when=1.0)
    ledger.set_paused("d.example", True)
    assert sorted(ledger.releasing_domains(now=1000.0)) == ["a.example", "b.example"]
    assert ledger.releasing_domains(now=1500.0) == ["a.example"]   # strictly later
    assert ledger.releasing_domains(now=2000.0) == []
    ledger.set_releasing_until("a.example", None)
    assert ledger.releasing_domains(now=1000.0) == ["b.example"]


def test_persists_across_reopen(tmp_path):
    led = Ledger(str(tmp_path))
    led.record("AAAAAA", "customer.example", 100, arrival=1.0)
    led.set_paused("customer.example", True)
    led.close()
    led = Ledger(str(tmp_path))
    try:
        st = led.state("customer.example")
        assert (st.messages, st.bytes, st.paused) == (1, 100, True)
        assert [e.queue_id for e in led.entries("customer.example")] == ["AAAAAA"]
    finally:
        led.close()


def test_failed_transaction_rolls_back(ledger):
    ledger.record("AAAAAA", "customer.example", 100)
    with pytest.raises(Exception):
        ledger._update("customer.example", no_such_column=1)
    # the ledger is still usable and unchanged
    assert totals(ledger, "customer.example") == (1, 100)
    assert ledger.record("BBBBBB", "customer.example", 1) is True


def test_a_ledger_of_an_older_version_opens_and_works(tmp_path):
    """An upgraded host: its foreign_mail table predates the scope column
    (CREATE TABLE IF NOT EXISTS kept the old one, and every keeper pass
    failed on it). The cache is made anew; the rest of the ledger stays."""
    import sqlite3
    first = Ledger(str(tmp_path))
    first.record("Q1", "customer.example", 100, arrival=1.0)
    first.close()
    db = sqlite3.connect(tmp_path / FILENAME)
    db.executescript("DROP TABLE foreign_mail; CREATE TABLE foreign_mail ("
                     "queue TEXT NOT NULL, queue_id TEXT NOT NULL, domain TEXT, "
                     "PRIMARY KEY (queue, queue_id));"
                     "INSERT INTO foreign_mail VALUES ('hold', 'Q9', NULL);")
    db.close()
    ledger = Ledger(str(tmp_path))
    ledger.set_foreign_scope("config-1")
    assert ledger.state("customer.example").messages == 1
