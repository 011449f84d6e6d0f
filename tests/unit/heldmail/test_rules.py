"""flushctl.heldmail.rules: every hold/release decision, by name, over snapshots."""

import pytest

from flushctl.heldmail import rules as rules
from flushctl.heldmail.rules import Item, Snapshot

NOW = 1_000_000.0


def item(qid="AAAAAAAAAA", queue="hold", mtime=NOW - 10, released=None, refused=None,
         refused_since=None, forced=False, ctime=NOW - 100, route="customer.example",
         size=100, arrival=None):
    return Item(qid, "customer.example", route, size, arrival or ctime, ctime, queue, mtime,
                forced, released, refused, refused_since)


# -- what a message is doing --------------------------------------------------

@pytest.mark.parametrize("name, entry, expected", [
    ("held", item(queue="hold"), rules.HELD),
    ("held with a retry time ahead is still held", item(queue="hold", mtime=NOW + 300),
     rules.HELD),
    ("incoming", item(queue="incoming"), rules.IN_FLIGHT),
    ("active", item(queue="active"), rules.IN_FLIGHT),
    ("on its way back through pickup (renewed)", item(queue="maildrop"), rules.IN_FLIGHT),
    ("failed: deferred, retry time ahead", item(queue="deferred", mtime=NOW + 300,
                                                released=NOW - 5), rules.FAILED),
    ("failed although never released (taken in from the deferred queue)",
     item(queue="deferred", mtime=NOW + 300), rules.FAILED),
    ("released and due: qmgr takes it next", item(queue="deferred", released=NOW - 5),
     rules.WAITING),
    ("due in the deferred queue, never released: stray",
     item(queue="deferred", released=None), rules.STRAY),
    ("due, released longer ago than the watch: stray",
     item(queue="deferred", released=NOW - rules.RELEASE_WATCH - 1), rules.STRAY),
    ("forced expiry in the deferred queue: Postfix returns it",
     item(queue="deferred", mtime=NOW + 300, forced=True), rules.RETURNING),
    ("an admin's postsuper -e on held mail: held; returned once released",
     item(queue="hold", forced=True), rules.HELD),
    ("gone", item(queue=None), rules.GONE),
])
def test_kind(name, entry, expected):
    assert rules.kind(entry, NOW) == expected, name


def test_released_mail_waits_while_the_release_is_watched():
    old = item(queue="deferred", released=NOW - rules.RELEASE_WATCH - 600)
    assert rules.kind(old, NOW) == rules.STRAY
    # Postfix still at work on the release (qmgr's active queue is full): it waits
    assert rules.kind(old, NOW, releasing_until=NOW + 30) == rules.WAITING
    assert Snapshot((old,), NOW, releasing_until=NOW + 30).to_rehold() == []
    assert rules.kind(old, NOW, releasing_until=NOW - 1) == rules.STRAY


def test_to_rehold_is_failed_and_stray_only():
    snap = Snapshot((
        item("H000000001", "hold"),
        item("F000000001", "deferred", mtime=NOW + 60, released=NOW - 5),
        item("S000000001", "deferred"),
        item("W000000001", "deferred", released=NOW - 5),
        item("A000000001", "active"),
        item("R000000001", "deferred", mtime=NOW + 60, forced=True),
        item("G000000001", None),
    ), NOW)
    assert [i.queue_id for i in snap.to_rehold()] == ["F000000001", "S000000001"]
    assert snap.busy()
    assert snap.gone == ["G000000001"]
    assert snap.figures()[0] == 6
    assert snap.per_queue() == {"active": 1, "deferred": 4, "hold": 1}


def test_not_busy_when_only_held():
    assert not Snapshot((item(), item("BBBBBBBBBB", "deferred", mtime=NOW + 9)), NOW).busy()


# -- what a release sends -------------------------------------------------------

def test_poller_never_sends_refused_mail():
    snap = Snapshot((item("AAAAAAAAAA"), item("BBBBBBBBBB", refused="550 no such user")), NOW)
    assert [i.queue_id for i in rules.releasable(snap, "poller")] == ["AAAAAAAAAA"]


@pytest.mark.parametrize("trigger", sorted(rules.EXPLICIT_TRIGGERS))
def test_customer_and_admin_triggers_send_refused_mail_again(trigger):
    snap = Snapshot((item("AAAAAAAAAA"), item("BBBBBBBBBB", refused="550 no such user")), NOW)
    assert len(rules.releasable(snap, trigger)) == 2


def test_release_only_the_routes_that_answered():
    snap = Snapshot((item("AAAAAAAAAA", route="pc1.customer.example"),
                     item("BBBBBBBBBB", route="pc2.customer.example")), NOW)
    chosen = rules.releasable(snap, "admin", {"pc2.customer.example"})
    assert [i.queue_id for i in chosen] == ["BBBBBBBBBB"]


def test_release_sends_only_held_mail():
    snap = Snapshot((item("AAAAAAAAAA", "deferred", released=NOW - 1),
                     item("BBBBBBBBBB", "active")), NOW)
    assert rules.releasable(snap, "admin") == []


def test_stale_is_older_than_half_the_shortest_lifetime():
    after = rules.stale_after([5 * 86400, 4 * 86400])
    assert after == 2 * 86400
    fresh = item("AAAAAAAAAA", ctime=NOW - after + 1)
    old = item("BBBBBBBBBB", ctime=NOW - after - 1)
    assert rules.stale([fresh, old], NOW, after) == [old]


def test_not_due_is_a_retry_time_ahead():
    later = item("AAAAAAAAAA", mtime=NOW + 1)
    due = item("BBBBBBBBBB", mtime=NOW)
    assert rules.not_due([later, due], NOW) == [later]


# -- what a failed attempt means --------------------------------------------------

@pytest.mark.parametrize("name, reasons, expected", [
    ("remote 5xx (soft-bounced)", ["host mail.customer.example[192.0.2.7] said: 550 5.1.1 "
                                   "<bob@customer.example>: user unknown (in reply to RCPT "
                                   "TO command)"], rules.REFUSED),
    ("smtp-sink's hard reject", ["host 127.0.0.1[127.0.0.1] said: 500 5.3.0 Error: command "
                                 "failed (in reply to RCPT TO command)"], rules.REFUSED),
    ("loop to this host", ["mail for customer.example loops back to myself"], rules.REFUSED),
    ("no such domain", ["Host or domain name not found. Name service error for "
                        "name=gone.example type=MX: Host not found"], rules.REFUSED),
    ("a DNS failure of the moment", ["Host or domain name not found. Name service error for "
                                     "name=cust.example type=MX: Host not found, try again"],
     rules.TEMPFAIL),
    ("a 5xx greeting", ["host mail.cust.example[192.0.2.7] refused to talk to me: 554 5.7.1 "
                        "go away"], rules.REFUSED),
    ("a 4xx greeting", ["host mail.cust.example[192.0.2.7] refused to talk to me: 421 4.3.2 "
                        "busy"], rules.TEMPFAIL),
    ("remote 4xx", ["host 127.0.0.1[127.0.0.1] said: 451 4.3.0 Error: command failed "
                    "(in reply to RCPT TO command)"], rules.TEMPFAIL),
    ("connection refused", ["connect to 127.0.0.1[127.0.0.1]:2525: Connection refused"],
     rules.TEMPFAIL),
    ("deferred transport only", ["deferred transport", "deferred transport"],
     rules.NOT_ATTEMPTED),
    ("one tried, one not", ["deferred transport", "connect to x: Connection timed out"],
     rules.TEMPFAIL),
    ("one refused among tempfails", ["said: 451 later", "said: 550 no"], rules.REFUSED),
    ("nothing known", [], rules.TEMPFAIL),
    ("a 5 in the text is not a 5xx", ["host said: 421 5 minutes please"], rules.TEMPFAIL),
])
def test_attempt_outcome(name, reasons, expected):
    assert rules.attempt_outcome(reasons) == expected, name


def test_refusal_text_is_the_permanent_reply():
    assert rules.refusal_text(["said: 451 later", "said: 550 5.1.1 no such user"]) == \
        "said: 550 5.1.1 no such user"


# -- the poller's retry discipline -------------------------------------------------

def test_backoff_starts_at_minimal_doubles_and_stops_at_maximal():
    steps, step = [], None
    for _ in range(6):
        step = rules.next_backoff(step, 300, 4000)
        steps.append(step)
    assert steps == [300, 600, 1200, 2400, 4000, 4000]


def test_backoff_never_below_minimal_after_a_smaller_step():
    assert rules.next_backoff(10, 300, 4000) == 300


def test_poller_waits_out_the_backoff():
    assert not rules.poller_may_release(NOW + 1, NOW)
    assert rules.poller_may_release(NOW, NOW)
    assert rules.poller_may_release(None, NOW)


# -- one release window for every trigger --------------------------------------------

@pytest.mark.parametrize("name, args, expected", [
    ("a finger 0.4 s after the poller's release shares it",
     dict(last_release=NOW - 0.4, trigger="finger"), True),
    ("the poller shares an admin's release", dict(last_release=NOW - 5, trigger="poller"), True),
    ("an ETRN shares the poller's release", dict(last_release=NOW - 5, trigger="etrn"), True),
    ("outside the window", dict(last_release=NOW - 60, trigger="finger"), False),
    ("no release yet", dict(last_release=None, trigger="finger"), False),
    ("new mail since: release again", dict(last_release=NOW - 1, arrived_since=True), False),
    ("refused mail the poller left out: a customer's trigger sends it",
     dict(last_release=NOW - 1, trigger="etrn", refused_held=True), False),
    ("refused mail already included: shared",
     dict(last_release=NOW - 1, trigger="etrn", refused_held=True,
          last_included_refused=True), True),
    ("the poller never wants refused mail",
     dict(last_release=NOW - 1, trigger="poller", refused_held=True), True),
    ("a clock that went back does not share", dict(last_release=NOW + 10), False),
    ("the admin's flush always releases", dict(last_release=NOW - 1, trigger="admin"), False),
    ("a peer's ETRN shares", dict(last_release=NOW - 1, trigger="peer"), True),
])
def test_shares_window(name, args, expected):
    full = dict(last_release=None, now=NOW, window=60.0, arrived_since=False,
                trigger="finger", last_included_refused=False, refused_held=False)
    full.update(args)
    assert rules.shares_window(**full) == expected, name
