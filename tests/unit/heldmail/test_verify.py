"""The keeper's check of every ledger row (``heldmail.verify``), which the
all-domains views count from instead of listing the hold queue: they must
give what the listing gives, see a message deleted behind our back after
the keeper's next pass, and list the queue themselves when no recent check
vouches for the rows."""

import os
import time

import pytest

from flushctl.heldmail import status as status_mod
from flushctl.heldmail import verify as verify_mod
from flushctl.heldmail.ledger.store import Ledger
from flushctl.mta.queuefiles import QueueLayout
from tests.unit.heldmail.test_status_listing import WANT, _figures, heldmail  # noqa: F401


@pytest.fixture
def listings(monkeypatch):
    """Counts the views' own listings of the hold queue (the keeper's go
    through ``QueueWatch``, which lists directories itself)."""
    calls = []
    real = QueueLayout.ids

    def counted(self, queue):
        calls.append(queue)
        return real(self, queue)
    monkeypatch.setattr(QueueLayout, "ids", counted)
    monkeypatch.setattr(status_mod, "LIST_FROM", 1)
    return calls


def keeper_pass(od):
    od.take_in(queues=("hold",))
    return od.verify_ledger()


def test_the_views_count_from_the_keepers_check_as_the_listing_does(heldmail, listings):
    assert keeper_pass(heldmail) == 1       # b.test's gone message, forgotten by the check
    at, outside = heldmail.ledger.verified()
    assert outside == {"a.test"} and time.time() - at < 5   # a.test: one in the deferred queue
    trusted = [s.as_json() for s in heldmail.status_all()]
    assert listings == []
    assert _figures(heldmail) == WANT
    assert trusted == [s.as_json() for s in heldmail.status_all(exact=True)]
    assert listings == ["hold"]             # exact: its own listing


def test_a_message_deleted_behind_our_back_is_gone_after_the_next_pass(heldmail, listings):
    keeper_pass(heldmail)
    os.unlink(heldmail.layout.path("hold", "4jfQW04Wb7zJ9WD"))   # postsuper -d
    assert _figures(heldmail, exact=True)[1] == ("b.test", 0, 0, {})
    keeper_pass(heldmail)
    assert _figures(heldmail)[1] == ("b.test", 0, 0, {})
    assert listings == ["hold"]             # the exact one only


def test_mail_a_release_moved_after_the_check_is_counted_where_it_is(heldmail, listings):
    keeper_pass(heldmail)
    # released: from the hold queue to the deferred one, the domain's release watched
    held, deferred = (heldmail.layout.path(q, "4jfQW04Wb7zJ9WD") for q in ("hold", "deferred"))
    os.makedirs(os.path.dirname(deferred), exist_ok=True)
    os.rename(held, deferred)
    heldmail.ledger.set_releasing_until("b.test", time.time() + 900)
    assert _figures(heldmail)[1] == ("b.test", 1, 400, {"deferred": 1})
    assert listings == []


@pytest.mark.parametrize("age", [verify_mod.VERIFIED_FOR + 1, -60.0])
def test_a_check_too_old_or_from_the_future_is_not_trusted(heldmail, listings, age):
    keeper_pass(heldmail)
    heldmail.ledger.set_verified(time.time() - age, [])
    assert _figures(heldmail) == WANT
    assert listings == ["hold"]


def test_a_new_ledger_file_carries_no_check(heldmail, listings):
    keeper_pass(heldmail)
    path = heldmail.ledger.path
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    heldmail.rebuild_if_needed()   # from the hold queue (no postcat here: nothing)
    heldmail.ledger.record("4jfQW04Wb7zJ9WD", "b.test", 400)
    assert heldmail.ledger.verified() is None
    assert _figures(heldmail)[1] == ("b.test", 1, 400, {"hold": 1})
    assert listings == ["hold"]


def test_a_check_with_too_many_domains_outside_the_hold_queue_is_not_written(
        heldmail, listings, monkeypatch):
    monkeypatch.setattr(verify_mod, "MAX_OUTSIDE", 0)
    keeper_pass(heldmail)
    assert heldmail.ledger.verified() is None
    assert _figures(heldmail) == WANT and listings == ["hold"]


def test_a_row_recorded_after_the_check_is_counted(heldmail, listings):
    keeper_pass(heldmail)
    path = heldmail.layout.path("hold", "4jfQW04Wb7zJ9X1")
    open(path, "w").close()
    Ledger(os.path.dirname(heldmail.ledger.path)).record("4jfQW04Wb7zJ9X1", "c.test", 10)
    assert _figures(heldmail)[2] == ("c.test", 1, 10, {"hold": 1})
    assert listings == []


def test_the_check_is_rewritten_only_as_its_listing_moves_on(heldmail, listings):
    hold = os.path.dirname(heldmail.layout.path("hold", "4jfQW04Wb7zJ9WD"))
    os.utime(hold, (time.time() - 100,) * 2)   # its last change long before the listing
    keeper_pass(heldmail)
    first, _ = heldmail.ledger.verified()
    keeper_pass(heldmail)                   # nothing changed: within REWRITE_EVERY
    assert heldmail.ledger.verified()[0] == first
    heldmail._verified_written -= verify_mod.REWRITE_EVERY
    keeper_pass(heldmail)
    assert heldmail.ledger.verified()[0] > first
