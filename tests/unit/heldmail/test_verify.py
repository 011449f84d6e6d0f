"""The keeper's check of every ledger row (``heldmail.verify``), which the
all-domains views count from instead of listing the hold queue: they must
give what the listing gives, see a message deleted behind our back after
the keeper's next check, and list the queue themselves when no recent
check of this very ledger file vouches for the rows."""

import os
import socket
import sqlite3
import threading
import time

import pytest

from flushctl import config as config_mod
from flushctl.heldmail import status as status_mod
from flushctl.heldmail import verify as verify_mod
from flushctl.heldmail.ledger.store import Ledger
from flushctl.heldmail.library import HeldMail
from flushctl.mta.queuefiles import QueueLayout, relative_path
from flushctl.privsep import client as client_mod
from tests.unit.heldmail.test_status_listing import WANT, _figures, heldmail  # noqa: F401


@pytest.fixture
def listings(monkeypatch, heldmail):  # noqa: F811
    """Counts the views' own listings of the hold queue (the keeper's go
    through ``QueueWatch``, which lists directories itself); the views
    count from this process's own check (in the helper: the keeper's)."""
    calls = []
    real = QueueLayout.ids

    def counted(self, queue):
        calls.append(queue)
        return real(self, queue)
    monkeypatch.setattr(QueueLayout, "ids", counted)
    monkeypatch.setattr(status_mod, "LIST_FROM", 1)
    monkeypatch.setattr(verify_mod, "MIN_GAP", 0.0)
    monkeypatch.setattr(verify_mod, "COST_SHARE", 0)
    os.utime(hold_dir(heldmail), (time.time() - 100,) * 2)   # last changed long ago
    heldmail.check_source = heldmail.current_check
    return calls


def keeper_pass(od):
    # a pass a while after the last (QueueWatch lists a changed directory
    # again once 20 times its last listing's cost has passed)
    time.sleep(0.02)
    od.take_in(queues=("hold",))
    return od.verify_ledger()


def hold_dir(od):
    return os.path.dirname(od.layout.path("hold", "4jfQW04Wb7zJ9WD"))


def test_the_views_count_from_the_keepers_check_as_the_listing_does(heldmail, listings):  # noqa: F811
    assert keeper_pass(heldmail) == 1       # b.test's gone message, forgotten by the check
    check = heldmail.current_check()
    assert check.outside == {"a.test"} and time.time() - check.at < 5   # one in deferred
    trusted = [s.as_json() for s in heldmail.status_all()]
    assert listings == []
    assert _figures(heldmail) == WANT
    assert trusted == [s.as_json() for s in heldmail.status_all(exact=True)]
    assert listings == ["hold"]             # exact: its own listing


def test_a_message_deleted_behind_our_back_is_gone_after_the_next_check(heldmail, listings):  # noqa: F811,E501
    keeper_pass(heldmail)
    os.unlink(heldmail.layout.path("hold", "4jfQW04Wb7zJ9WD"))   # postsuper -d
    keeper_pass(heldmail)
    assert _figures(heldmail)[1] == ("b.test", 0, 0, {})
    assert listings == []


def test_mail_a_release_moved_or_sent_after_the_check_is_counted_where_it_is(
        heldmail, listings):  # noqa: F811
    keeper_pass(heldmail)
    # released: from the hold queue to the deferred one, the release watched
    held, deferred = (heldmail.layout.path(q, "4jfQW04Wb7zJ9WD") for q in ("hold", "deferred"))
    os.makedirs(os.path.dirname(deferred), exist_ok=True)
    os.rename(held, deferred)
    heldmail.ledger._update("b.test", last_flush=time.time(), releasing_until=time.time() + 900)
    assert _figures(heldmail)[1] == ("b.test", 1, 400, {"deferred": 1})
    # delivered, and the watch over before the next check (review finding)
    os.unlink(deferred)
    heldmail.ledger.set_releasing_until("b.test", None)
    assert _figures(heldmail)[1] == ("b.test", 0, 0, {})
    assert listings == []


@pytest.mark.parametrize("age", [verify_mod.VERIFIED_FOR + 1, -60.0])
def test_a_check_too_old_or_from_the_future_is_not_trusted(heldmail, listings, age):  # noqa: F811
    keeper_pass(heldmail)
    check = heldmail.current_check()
    heldmail.check_source = lambda: verify_mod.Check(time.time() - age, check.ledger,
                                                     check.outside)
    assert _figures(heldmail) == WANT
    assert listings == ["hold"]


def test_a_ledger_put_back_from_a_backup_is_not_vouched_for(heldmail, listings):  # noqa: F811
    """Review finding: the check lived in the ledger, so a backup put back
    under running processes came with the check it was made with."""
    keeper_pass(heldmail)
    path = heldmail.ledger.path
    backup = sqlite3.connect(path + ".bak")
    with sqlite3.connect(path) as source:
        source.backup(backup)
    backup.close()
    os.unlink(heldmail.layout.path("hold", "4jfQW04Wb7zJ9WD"))   # postsuper -d, then
    os.replace(path + ".bak", path)                               # the backup put back
    assert _figures(heldmail)[1] == ("b.test", 0, 0, {})
    assert "hold" in listings


def test_a_check_with_too_many_domains_outside_the_hold_queue_vouches_for_nothing(
        heldmail, listings, monkeypatch):  # noqa: F811
    """Review finding: a check too wide to write left the last one trusted."""
    keeper_pass(heldmail)
    assert heldmail.current_check() is not None
    monkeypatch.setattr(verify_mod, "MAX_OUTSIDE", 0)
    monkeypatch.setattr(verify_mod, "RECHECK_EVERY", 0.0)
    keeper_pass(heldmail)
    assert heldmail.current_check() is None
    assert _figures(heldmail) == WANT and listings == ["hold"]


def test_the_ledger_is_no_place_for_a_check(heldmail, listings):  # noqa: F811
    """Review finding: the milter may write the ledger; a check written
    there made phantom rows count.  The views ask the helper, and with no
    helper (this config's socket answers nothing) they list the queue."""
    keeper_pass(heldmail)
    assert heldmail.ledger._db.execute("SELECT COUNT(*) FROM meta WHERE key = 'verified'"
                                       ).fetchone()[0] == 0
    other = HeldMail(heldmail.config, layout=heldmail.layout,
                     ledger=Ledger(os.path.dirname(heldmail.ledger.path)))
    other.ledger.record("4jfQW04Wb7zJ9ZZ", "c.test", 10)   # a phantom: no such message
    assert _figures(other)[2] == ("c.test", 0, 0, {}) and listings == ["hold"]


def test_rows_recorded_after_the_check_count_until_the_next_one(heldmail, listings,
                                                                monkeypatch):  # noqa: F811
    """Rows recorded since the check are counted as recorded (the milter
    records mail as it holds it); one whose message is elsewhere (its hold
    failed) is put right by the next check, due every RECHECK_EVERY s."""
    keeper_pass(heldmail)
    path = heldmail.layout.path("hold", "4jfQW04Wb7zJ9X1")
    open(path, "w").close()
    Ledger(os.path.dirname(heldmail.ledger.path)).record("4jfQW04Wb7zJ9X1", "c.test", 10)
    assert _figures(heldmail)[2] == ("c.test", 1, 10, {"hold": 1})
    stray = heldmail.layout.path("deferred", "4jfQW04Wb7zJ9X2")
    os.makedirs(os.path.dirname(stray), exist_ok=True)
    open(stray, "w").close()
    heldmail.ledger.record("4jfQW04Wb7zJ9X2", "c.test", 20)
    keeper_pass(heldmail)                   # nothing changed in the hold queue: no check
    assert _figures(heldmail)[2] == ("c.test", 2, 30, {"hold": 2})
    monkeypatch.setattr(verify_mod, "RECHECK_EVERY", 0.0)
    keeper_pass(heldmail)
    assert _figures(heldmail)[2] == ("c.test", 2, 30, {"deferred": 1, "hold": 1})
    assert listings == []


def test_a_check_comes_after_a_change_but_not_sooner_than_its_gap(heldmail, listings,
                                                                  monkeypatch):  # noqa: F811
    keeper_pass(heldmail)
    first = heldmail.current_check().at
    monkeypatch.setattr(verify_mod, "MIN_GAP", 3600.0)
    open(heldmail.layout.path("hold", "4jfQW04Wb7zJ9X1"), "w").close()   # a change
    keeper_pass(heldmail)
    assert heldmail.current_check().at == first
    monkeypatch.setattr(verify_mod, "MIN_GAP", 0.0)
    keeper_pass(heldmail)
    assert heldmail.current_check().at > first


def test_a_hold_queue_hashed_under_the_keeper_loses_no_row(heldmail, listings, monkeypatch):  # noqa: F811,E501
    """Review finding: an admin adds hold to hash_queue_names and Postfix
    moves the held files into subdirectories; through its old layout the
    keeper saw them all gone and forgot every row."""
    keeper_pass(heldmail)
    monkeypatch.setattr(verify_mod, "RECHECK_EVERY", 0.0)
    queue = heldmail.layout.queue_directory
    hashed = frozenset({"deferred", "defer", "hold"})
    for queue_id in ("4jfQW04Wb7zJ9WA", "4jfQW04Wb7zJ9WB", "4jfQW04Wb7zJ9WD"):
        new = os.path.join(queue, relative_path("hold", queue_id, hashed, 1))
        os.makedirs(os.path.dirname(new), exist_ok=True)
        os.rename(heldmail.layout.path("hold", queue_id), new)
    heldmail.params = lambda: {"queue_directory": queue, "hash_queue_depth": "1",
                               "hash_queue_names": "deferred, defer, hold"}
    assert keeper_pass(heldmail) == 0
    assert len(heldmail.ledger.all_ids()) == 4
    keeper_pass(heldmail)
    assert _figures(heldmail) == WANT


def test_no_helper_no_check(tmp_path):
    cfg = config_mod.parse(f'[state]\ndirectory = "{tmp_path / "state"}"\n'
                           f'[helper]\nsocket = "{tmp_path / "run" / "helper.sock"}"\n'
                           '[domains."a.test"]\n', "test.toml")
    assert verify_mod.ask_helper(cfg) is None
    assert verify_mod.Check.from_json({"at": 1.0, "ledger": 2, "outside": ["a.test"]}) == \
        verify_mod.Check(1.0, 2, frozenset({"a.test"}))
    assert verify_mod.Check.from_json({"at": "x"}) is None


def _fake_helper(path, answer):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)
    conns = []

    def serve():
        conn, _ = srv.accept()
        conns.append(conn)
        f = conn.makefile("rwb")
        f.readline()
        f.write(b'{"role": "admin"}\n')
        f.flush()
        f.readline()                     # the check request
        if answer is not None:
            f.write(answer + b"\n")
            f.flush()
    threading.Thread(target=serve, daemon=True).start()
    return srv, conns


def _cfg(tmp_path):
    return config_mod.parse(f'[state]\ndirectory = "{tmp_path / "state"}"\n'
                            f'[helper]\nsocket = "{tmp_path / "h.sock"}"\n'
                            '[domains."a.test"]\n', "t.toml")


def test_ask_helper_gives_up_on_a_helper_that_never_answers(tmp_path, monkeypatch):
    """Review finding: once the role was granted, a helper that stalled
    left `flushctl status` waiting for ever; now it lists the queue."""
    monkeypatch.setattr(client_mod, "HELLO_TIMEOUT", 1.0)
    cfg = _cfg(tmp_path)
    srv, conns = _fake_helper(str(tmp_path / "h.sock"), None)   # grants, then silent
    result = []
    t = threading.Thread(target=lambda: result.append(verify_mod.ask_helper(cfg)), daemon=True)
    t.start()
    t.join(5.0)
    hung = t.is_alive()
    for c in conns:
        c.close()
    srv.close()
    t.join(5.0)
    assert not hung, "ask_helper (flushctl status) still waiting 5 s after the grant"


@pytest.mark.parametrize("answer", [b"[]", b'"x"', b"1"])
def test_ask_helper_survives_an_answer_that_is_not_an_object(tmp_path, answer):
    cfg = _cfg(tmp_path)
    srv, conns = _fake_helper(str(tmp_path / "h.sock"), answer)
    try:
        assert verify_mod.ask_helper(cfg) is None
    finally:
        for c in conns:
            c.close()
        srv.close()
