"""flushctl.mta.queuefiles: where Postfix keeps a queue file."""

import os

import pytest

from flushctl.mta.queuefiles import QueueLayout, hash_key, relative_path

DEFAULT_HASHED = frozenset({"deferred", "defer"})


# Real data from a Postfix 3.7 instance (enable_long_queue_ids = yes,
# hash_queue_names = deferred, defer; hash_queue_depth = 1).
REAL_LONG_IDS = [
    ("4jcczJ2wnFzJ9C2", "64DE1"),
    ("4jcczJ2xwpzJ9C3", "659FA"),
    ("4jcczJ2v7dzJ9C1", "63C7D"),
]


@pytest.mark.parametrize("queue_id, key", REAL_LONG_IDS)
def test_hash_key_long_ids_real_postfix(queue_id, key):
    assert hash_key(queue_id) == key


@pytest.mark.parametrize("queue_id, _key", REAL_LONG_IDS)
def test_relative_path_long_ids_real_postfix(queue_id, _key):
    assert relative_path("deferred", queue_id, DEFAULT_HASHED, 1) == f"deferred/6/{queue_id}"


@pytest.mark.parametrize("queue_id", ["3F2A81C0B", "A1B2C3D4E5", "0F1E2D3C4B"])
def test_hash_key_short_id_is_the_id(queue_id):
    assert hash_key(queue_id) == queue_id


def test_relative_path_short_id_uses_own_leading_chars():
    assert relative_path("deferred", "3F2A81C0B", DEFAULT_HASHED, 1) == "deferred/3/3F2A81C0B"
    assert relative_path("defer", "3F2A81C0B", DEFAULT_HASHED, 2) == "defer/3/F/3F2A81C0B"


@pytest.mark.parametrize("queue", ["hold", "incoming", "active", "maildrop"])
def test_unhashed_queue(queue):
    assert relative_path(queue, "4jcczJ2wnFzJ9C2", DEFAULT_HASHED, 1) == f"{queue}/4jcczJ2wnFzJ9C2"
    assert relative_path(queue, "3F2A81C0B", DEFAULT_HASHED, 2) == f"{queue}/3F2A81C0B"


def test_depth_two_gives_two_levels():
    assert relative_path("deferred", "4jcczJ2wnFzJ9C2", DEFAULT_HASHED, 2) == \
        "deferred/6/4/4jcczJ2wnFzJ9C2"
    assert relative_path("deferred", "4jcczJ2xwpzJ9C3", DEFAULT_HASHED, 2) == \
        "deferred/6/5/4jcczJ2xwpzJ9C3"
    assert relative_path("deferred", "4jcczJ2v7dzJ9C1", DEFAULT_HASHED, 3) == \
        "deferred/6/3/C/4jcczJ2v7dzJ9C1"


def test_depth_zero_hashed_queue_is_flat():
    assert relative_path("deferred", "4jcczJ2wnFzJ9C2", DEFAULT_HASHED, 0) == \
        "deferred/4jcczJ2wnFzJ9C2"


def test_hold_hashed_when_listed():
    hashed = frozenset({"hold", "deferred"})
    assert relative_path("hold", "4jcczJ2wnFzJ9C2", hashed, 1) == "hold/6/4jcczJ2wnFzJ9C2"


def test_usec_decoding_by_hand():
    # 4 usec chars before the last 'z': "0001" -> 1, "0010" -> 52
    assert hash_key("BBBBBB0001zB") == "00001"
    assert hash_key("BBBBBB0010zB") == f"{52:05X}"
    # 999999 usec, the largest Postfix writes, is "75pl" in base 52 -> F423F
    assert hash_key("BBBBBB75plzB") == "F423F"


def test_seconds_may_contain_z():
    # 'z' is in the 52-letter alphabet for seconds and usec; the separator is
    # the last 'z' (inode numbers use base 51, without 'z').
    assert hash_key("4jzczJ2wnFzJ9C2") == hash_key("4jcczJ2wnFzJ9C2")


def test_short_separator_position_is_not_long_id():
    # a 'z' before position 10 cannot be the time/inode separator
    assert hash_key("BBBBBzCD") == "BBBBBzCD"


def test_layout_from_params_defaults():
    layout = QueueLayout.from_params({"queue_directory": "/var/spool/postfix"})
    assert layout == QueueLayout("/var/spool/postfix", DEFAULT_HASHED, 1)


def test_layout_from_params_parses_list():
    layout = QueueLayout.from_params({"queue_directory": "/q", "hash_queue_names":
                                      "Deferred,defer  hold", "hash_queue_depth": "2"})
    assert layout.hashed == frozenset({"deferred", "defer", "hold"})
    assert layout.depth == 2
    assert layout.path("deferred", "4jcczJ2wnFzJ9C2") == "/q/deferred/6/4/4jcczJ2wnFzJ9C2"
    assert layout.path("hold", "4jcczJ2wnFzJ9C2") == "/q/hold/6/4/4jcczJ2wnFzJ9C2"
    assert layout.path("active", "4jcczJ2wnFzJ9C2") == "/q/active/4jcczJ2wnFzJ9C2"


def test_locate_finds_file_in_queue(tmp_path):
    layout = QueueLayout(str(tmp_path), DEFAULT_HASHED, 1)
    qid = "4jcczJ2wnFzJ9C2"
    path = tmp_path / "deferred" / "6" / qid
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x" * 10)
    found = layout.locate(qid)
    assert found is not None
    queue, st = found
    assert queue == "deferred"
    assert st.st_size == 10

    os.makedirs(tmp_path / "hold")
    (tmp_path / "hold" / qid).write_bytes(b"")
    path.unlink()
    assert layout.locate(qid)[0] == "hold"


def test_locate_gone(tmp_path):
    layout = QueueLayout(str(tmp_path), DEFAULT_HASHED, 1)
    assert layout.locate("4jcczJ2wnFzJ9C2") is None


# -- postcat -e -h, defer logs, listings (real output of Postfix 3.7.11) ------

from flushctl.mta.queuefiles import QueueWatch, parse_defer_log, parse_postcat  # noqa: E402

SENDMAIL_T = """*** ENVELOPE RECORDS hold/0/08AF720C0A7 ***
message_size:             313             190               2               0             313               0
message_arrival_time: Tue Dec  1 23:46:14 2026
create_time: Tue Dec  1 23:46:14 2026
named_attribute: rewrite_context=local
sender_fullname: root
sender: root@provider.test
*** MESSAGE CONTENTS hold/0/08AF720C0A7 ***
Received: by mx.provider.test (Postfix, from userid 0)
\tid 08AF720C0A7; Tue,  1 Dec 2026 23:46:14 +0000 (UTC)
To: alice@cust.test
Cc: Bob <bob@cust.test>
Subject: t
*** HEADER EXTRACTED hold/0/08AF720C0A7 ***
named_attribute: dsn_orig_rcpt=rfc822;alice@cust.test
original_recipient: alice@cust.test
recipient: alice@cust.test
original_recipient: bob@cust.test
recipient: bob@cust.test
*** MESSAGE FILE END hold/0/08AF720C0A7 ***
"""

PARTLY_DELIVERED = """*** ENVELOPE RECORDS hold/A/7/A75D920C861 ***
message_size:             294             794               3               0             294               0
message_arrival_time: Tue Dec  1 22:24:48 2026
create_time: Tue Dec  1 22:24:48 2026
sender: a@sender.test
original_recipient: bob@cust.test
recipient: bob@cust.test
original_recipient: x@other.test
done_recipient: x@other.test
original_recipient: info@provider.test
recipient: alice@cust.test
*** MESSAGE CONTENTS hold/A/7/A75D920C861 ***
Received: from [127.0.0.1] (localhost [127.0.0.1])
\tby mx.provider.test (Postfix) with ESMTP id A75D920C861;
\tTue,  1 Dec 2026 22:24:48 +0000 (UTC)
Subject: x
*** HEADER EXTRACTED hold/A/7/A75D920C861 ***
*** MESSAGE FILE END hold/A/7/A75D920C861 ***
"""


def test_postcat_recipients_taken_from_the_headers():
    [msg] = parse_postcat(SENDMAIL_T)
    assert (msg.queue, msg.queue_id) == ("hold", "08AF720C0A7")   # hashed: hold/0/ID
    assert msg.recipients == ("alice@cust.test", "bob@cust.test")
    assert msg.sender == "root@provider.test" and msg.size == 313
    assert msg.header("received")[0].startswith("by mx.provider.test (Postfix, from userid 0)")


def test_postcat_pending_recipients_only_and_two_level_hash():
    [msg] = parse_postcat(PARTLY_DELIVERED + SENDMAIL_T)[:1]
    assert (msg.queue, msg.queue_id) == ("hold", "A75D920C861")
    # x@other.test was delivered (done_recipient); the alias expansion's result counts
    assert msg.recipients == ("bob@cust.test", "alice@cust.test")
    assert len(parse_postcat(PARTLY_DELIVERED + SENDMAIL_T)) == 2


DEFER_LOG = ("\n<alice@cust.test>: deferred transport\nrecipient=alice@cust.test\noffset=560\n"
             "dsn_orig_rcpt=rfc822;alice@cust.test\nstatus=4.3.2\naction=delayed\n"
             "reason=deferred transport\n\n\n<bob@cust.test>: host x said: 550 no\n"
             "recipient=bob@cust.test\noffset=628\ndsn_orig_rcpt=rfc822;bob@cust.test\n"
             "status=4.0.0\naction=delayed\nreason=host x said: 550 no\n\n")


def test_defer_log_records():
    records = parse_defer_log(DEFER_LOG)
    assert [(r.recipient, r.status, r.reason) for r in records] == [
        ("alice@cust.test", "4.3.2", "deferred transport"),
        ("bob@cust.test", "4.0.0", "host x said: 550 no")]
    assert parse_defer_log("") == []


def test_queue_watch_lists_again_only_what_changed(tmp_path):
    layout = QueueLayout(str(tmp_path), frozenset({"deferred"}), 1)
    (tmp_path / "deferred" / "6").mkdir(parents=True)
    (tmp_path / "deferred" / "6" / "4jcczJ2wnFzJ9C2").write_bytes(b"")
    watch = QueueWatch(layout, "deferred", full_every=3600)
    assert watch.ids(0.0) == {"4jcczJ2wnFzJ9C2"}
    (tmp_path / "deferred" / "6" / "4jcczJ2xwpzJ9C3").write_bytes(b"")
    os.utime(tmp_path / "deferred" / "6", ns=(1, 1))    # a change the watch must see
    assert watch.ids(1.0) == {"4jcczJ2wnFzJ9C2", "4jcczJ2xwpzJ9C3"}
    assert len(layout.leaf_directories("deferred")) == 16
    assert layout.leaf_directories("hold") == [str(tmp_path / "hold")]


def test_queue_watch_lists_a_big_changed_directory_again_only_now_and_then(tmp_path):
    """A directory whose listing is costly (the hold queue with a million
    messages: about a second, and it changes with every message held) is
    listed again after a change only once 1/share times that cost has
    passed; before, the keeper listed it at every pass (measured by P7)."""
    layout = QueueLayout(str(tmp_path), frozenset(), 1)
    (tmp_path / "hold").mkdir()
    (tmp_path / "hold" / "4jcczJ2wnFzJ9C2").write_bytes(b"")
    watch = QueueWatch(layout, "hold", full_every=3600, share=1e-6)  # every listing "costly"
    assert watch.ids(0.0) == {"4jcczJ2wnFzJ9C2"}
    took = watch._dirs[str(tmp_path / "hold")][3]
    (tmp_path / "hold" / "4jcczJ2xwpzJ9C3").write_bytes(b"")
    os.utime(tmp_path / "hold", ns=(1, 1))
    assert watch.ids(took / 2e-6) == {"4jcczJ2wnFzJ9C2"}      # changed, not listed yet
    assert watch.ids(took / 1e-6 + 1) == {"4jcczJ2wnFzJ9C2", "4jcczJ2xwpzJ9C3"}
    small = QueueWatch(layout, "hold", full_every=3600)       # cheap to list: at once
    assert small.ids(0.0) == {"4jcczJ2wnFzJ9C2", "4jcczJ2xwpzJ9C3"}
    (tmp_path / "hold" / "4jcczJ2xwpzJ9C4").write_bytes(b"")
    os.utime(tmp_path / "hold", ns=(2, 2))
    assert len(small.ids(0.5)) == 3


def test_queue_watch_sees_a_change_after_the_clock_stepped_back(tmp_path):
    """Review finding: with the clock stepped back, every changed directory
    waited out the step before being listed again."""
    layout = QueueLayout(str(tmp_path), frozenset(), 1)
    (tmp_path / "hold").mkdir()
    watch = QueueWatch(layout, "hold", full_every=3600)
    assert watch.ids(10_000.0) == set()
    (tmp_path / "hold" / "4jcczJ2wnFzJ9C2").write_bytes(b"")
    os.utime(tmp_path / "hold", ns=(1, 1))
    assert watch.ids(6_400.0) == {"4jcczJ2wnFzJ9C2"}     # an hour earlier


def test_queue_watch_says_as_of_when_its_answer_holds(tmp_path):
    """The keeper's check of the ledger (``heldmail.verify``) is as good as
    the listing it used: as of now while no directory changed since its
    listing, as of that listing once one did and was not listed again, and
    never "now" for a directory changed within a tick of its listing."""
    layout = QueueLayout(str(tmp_path), frozenset(), 1)
    hold = tmp_path / "hold"
    hold.mkdir()
    (hold / "4jcczJ2wnFzJ9C2").write_bytes(b"")
    os.utime(hold, (100.0, 100.0))
    watch = QueueWatch(layout, "hold", full_every=3600, share=1e-12)   # each listing "costly"
    watch.ids(1000.0)
    assert (watch.current_at, watch.version) == (1000.0, 1)
    watch.ids(1500.0)                      # unchanged: holds now, same listing
    assert (watch.current_at, watch.version) == (1500.0, 1)
    os.utime(hold, (1600.0, 1600.0))       # changed: not listed again yet (costly)
    watch.ids(1601.0)
    assert (watch.current_at, watch.version) == (1000.0, 1)
    watch.full_every = 0                   # listed again, all of it
    watch.ids(10**9)
    assert (watch.current_at, watch.version) == (10**9, 2)
    watch.full_every = 3600
    os.utime(hold, (10**9 - 0.5, 10**9 - 0.5))
    watch.ids(10**9 + 1.0)                 # changed, not listed again: as of the listing
    assert (watch.current_at, watch.version) == (10**9, 2)
    fresh = QueueWatch(layout, "hold", full_every=3600)
    fresh.ids(10**9)                       # its listing within a tick of the change
    fresh.ids(10**9 + 30.0)
    assert fresh.current_at == 10**9 and fresh.version == 1
    (hold / "4jcczJ2wnFzJ9C2").unlink()
    hold.rmdir()
    fresh.ids(10**9 + 31.0)                # the directory went away: a new answer
    assert fresh.version == 2


def test_queue_watch_lists_everything_again_after_the_clock_stepped_back(tmp_path):
    """Review finding: after a step back of S seconds no full listing came
    for S + full_every seconds (a change within one tick went unseen that
    long, and the keeper's check of the ledger trusted it)."""
    layout = QueueLayout(str(tmp_path), frozenset(), 1)
    (tmp_path / "hold").mkdir()
    watch = QueueWatch(layout, "hold", full_every=60)
    watch.ids(10_000.0)
    assert watch.last_full == 10_000.0
    watch.ids(6_400.0)                                   # an hour earlier
    assert watch.last_full == 6_400.0
