"""flushctl.gateway.replies: the finger reply lines and the ETRN policy action (pure)."""

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flushctl.protocols import smtpd_policy
from flushctl.gateway.replies import etrn_action, finger_reply
from flushctl.heldmail.outcome import (FAILED, NOTHING, NOWHERE, PAUSED, RELEASED, UNREACHABLE,
                                       Outcome)
from flushctl.heldmail.status import Status

DOM = "customer.example"
AGE = 2 * 3600 + 5 * 60 + 30          # "2h 5m", far from a minute boundary


def status(messages=3, size=12345, oldest=None, last_flush=None, trigger=None):
    return Status(
        domain=DOM, messages=messages, bytes=size,
        oldest_arrival=oldest, reachable=True, last_probe=None, last_error=None,
        last_flush=last_flush, last_flush_trigger=trigger, last_flush_result=None,
        last_flush_client=None, paused=False, queues={"hold": messages} if messages else {},
    )


def held(**kw):
    return status(oldest=time.time() - AGE, **kw)


HELD_LINE = f"{DOM}: 3 message(s), 12345 bytes held; oldest 2h 5m."


# -- finger_reply --------------------------------------------------------------

def test_finger_released():
    out = Outcome(RELEASED, 3, "mail.customer.example[192.0.2.25]:25", "", held())
    assert finger_reply(DOM, out, False) == [
        HELD_LINE,
        "Delivery started to your mail server (mail.customer.example[192.0.2.25]:25).",
    ]


def test_finger_unreachable():
    out = Outcome(UNREACHABLE, 0, "", "connect timed out", held())
    assert finger_reply(DOM, out, False) == [
        HELD_LINE,
        "Delivery not started: your mail server does not answer; your mail stays held.",
    ]


def test_finger_nowhere_to_deliver():
    out = Outcome(NOWHERE, 0, "", "this host is its best MX", held())
    assert finger_reply(DOM, out, False) == [
        HELD_LINE,
        "Delivery not started: there is nowhere to deliver it from here (check your "
        "domain's MX records); your mail stays held.",
    ]


def test_etrn_nowhere_to_deliver():
    action = etrn_action(DOM, Outcome(NOWHERE, 0, "", "best MX", held()))
    assert action == ("458 4.4.4 <customer.example>: unable to queue messages: nowhere to "
                      "deliver from here (check your MX records)")


def test_finger_shared_release_without_target():
    out = Outcome(RELEASED, 0, "", "", held(), shared=True)
    assert finger_reply(DOM, out, False)[1] == "Delivery started to your mail server."


def test_finger_paused():
    out = Outcome(PAUSED, 0, "", "paused", held())
    assert finger_reply(DOM, out, False) == [
        HELD_LINE,
        "Delivery not started: releases for this domain are paused here.",
    ]


def test_finger_failed():
    out = Outcome(FAILED, 0, "", "postsuper failed", held())
    assert finger_reply(DOM, out, False) == [
        HELD_LINE,
        "Delivery not started: temporary problem here; try again later.",
    ]


def test_finger_failed_before_status():
    # status() itself failed: nothing is known about what is held
    out = Outcome(FAILED, 0, "", "status failed", None)
    assert finger_reply(DOM, out, True) == [
        f"{DOM}: no mail held.",
        "Delivery not started: temporary problem here; try again later.",
    ]


def test_finger_nothing():
    out = Outcome(NOTHING, 0, "", "", status(messages=0, size=0))
    assert finger_reply(DOM, out, False) == [f"{DOM}: no mail held."]


@pytest.mark.parametrize("kind", [NOTHING, RELEASED, UNREACHABLE, PAUSED, FAILED])
def test_finger_zero_messages_says_no_mail_held(kind):
    out = Outcome(kind, 0, "mail.customer.example", "", status(messages=0, size=0))
    lines = finger_reply(DOM, out, False)
    assert lines[0] == f"{DOM}: no mail held."
    assert not any("message(s)" in line for line in lines)


def test_finger_oldest_unknown():
    out = Outcome(NOTHING, 0, "", "", status(messages=1, size=10, oldest=None))
    assert finger_reply(DOM, out, False) == [f"{DOM}: 1 message(s), 10 bytes held; oldest -."]


@pytest.mark.parametrize("age, text", [(5, "5s"), (125, "2m 5s"), (3 * 86400 + 7200 + 30, "3d 2h")])
def test_finger_oldest_age(age, text):
    out = Outcome(NOTHING, 0, "", "", status(messages=2, size=99, oldest=time.time() - age))
    assert finger_reply(DOM, out, False) == [f"{DOM}: 2 message(s), 99 bytes held; oldest {text}."]


def test_finger_verbose_previous_release():
    last = time.time() - 86400
    out = Outcome(RELEASED, 3, "mail.customer.example", "", held(last_flush=last, trigger="etrn"))
    lines = finger_reply(DOM, out, True)
    assert len(lines) == 3
    assert lines[:2] == [HELD_LINE, "Delivery started to your mail server (mail.customer.example)."]
    expected = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(last))
    assert lines[2] == f"Previous release: {expected} (etrn)."
    assert re.fullmatch(r"Previous release: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d .*\(etrn\)\.", lines[2])


def test_finger_verbose_previous_release_with_nothing_held():
    out = Outcome(NOTHING, 0, "", "", status(messages=0, size=0, last_flush=1_700_000_000.0,
                                                trigger="finger"))
    lines = finger_reply(DOM, out, True)
    assert lines[0] == f"{DOM}: no mail held."
    assert len(lines) == 2
    assert lines[1].startswith("Previous release: 2023-11-1")
    assert lines[1].endswith(" (finger).")


def test_finger_not_verbose_hides_previous_release():
    out = Outcome(RELEASED, 3, "t", "", held(last_flush=time.time() - 60, trigger="etrn"))
    lines = finger_reply(DOM, out, False)
    assert len(lines) == 2
    assert not any(line.startswith("Previous release") for line in lines)


@pytest.mark.parametrize("kind", [RELEASED, UNREACHABLE, PAUSED, FAILED, NOTHING])
def test_finger_verbose_without_last_flush_adds_nothing(kind):
    out = Outcome(kind, 0, "t", "", held(last_flush=None))
    assert finger_reply(DOM, out, True) == finger_reply(DOM, out, False)
    assert not any(line.startswith("Previous release") for line in finger_reply(DOM, out, True))


def test_finger_shared_outcome_reads_the_same():
    before = held()
    out = Outcome(RELEASED, 3, "t", "", before)
    shared = Outcome(RELEASED, 3, "t", "", before, shared=True)
    assert finger_reply(DOM, shared, False) == finger_reply(DOM, out, False)


# -- etrn_action ---------------------------------------------------------------

@pytest.mark.parametrize("kind", [RELEASED, NOTHING])
def test_etrn_ok(kind):
    assert etrn_action(DOM, Outcome(kind, 0, "", "", None)) == "OK"


def test_etrn_unreachable():
    action = etrn_action(DOM, Outcome(UNREACHABLE, 0, "", "timed out", held()))
    assert action == ("458 4.4.1 <customer.example>: unable to queue messages: "
                      "your mail server does not answer")


def test_etrn_paused():
    action = etrn_action(DOM, Outcome(PAUSED, 0, "", "paused", held()))
    assert action == "458 4.7.1 <customer.example>: releases for this domain are paused here"


def test_etrn_failed():
    action = etrn_action(DOM, Outcome(FAILED, 0, "", "boom", None))
    assert action == "451 4.3.0 temporary problem here; try again later"


@pytest.mark.parametrize("kind, code", [
    (RELEASED, None), (NOTHING, None), (UNREACHABLE, "458"), (PAUSED, "458"), (FAILED, "451"),
    (NOWHERE, "458"),
])
def test_etrn_codes_and_one_line(kind, code):
    action = etrn_action(DOM, Outcome(kind, 0, "", "detail\nwith newline", held()))
    assert "\n" not in action and "\r" not in action
    if code is None:
        assert action == "OK"
    else:
        assert action.split()[0] == code
        assert re.match(r"^4\d\d 4\.\d\.\d ", action)
    # and it goes out as exactly one attribute
    wire = smtpd_policy.answer(action)
    assert wire == f"action={action}\n\n".encode()


_label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=20)


@settings(max_examples=500, deadline=None)
@given(st.lists(_label, min_size=2, max_size=5).map(".".join),
       st.sampled_from([RELEASED, NOTHING, UNREACHABLE, PAUSED, FAILED]),
       st.text(max_size=50))
def test_etrn_action_single_line_property(domain, kind, detail):
    action = etrn_action(domain, Outcome(kind, 0, "", detail, None))
    assert "\n" not in action and "\r" not in action
    # the detail (an internal error text) is never echoed to the client
    expected = {
        RELEASED: "OK",
        NOTHING: "OK",
        UNREACHABLE: f"458 4.4.1 <{domain}>: unable to queue messages: "
                     "your mail server does not answer",
        PAUSED: f"458 4.7.1 <{domain}>: releases for this domain are paused here",
        FAILED: "451 4.3.0 temporary problem here; try again later",
    }[kind]
    assert action == expected


# -- the outcome between processes ------------------------------------------------------

def test_an_outcome_with_a_thousand_silent_servers_still_fits_one_wire_line():
    """A release to one destination while a thousand others do not answer:
    the helper's answer to the gateway stays one line the gateway may read."""
    import json

    from flushctl.privsep.wire import MAX_MESSAGE
    routes = tuple((f"pc{i}.customer.example", "timeout: " + "x" * 500) for i in range(1000))
    status = Status(domain="customer.example", messages=1000, bytes=10**6, oldest_arrival=1.0,
                reachable=True, last_probe=None, last_error="e" * 5000, last_flush=None,
                last_flush_trigger=None, last_flush_result=None, last_flush_client=None,
                paused=False, queues={"hold": 1000},
                hosts={name: 1 for name, _ in routes})
    outcome = Outcome(RELEASED, 3, "[192.0.2.1]:25", "d" * 100_000, status, unreachable=routes)
    line = json.dumps(outcome.as_json())
    assert len(line) + 1 < MAX_MESSAGE
    back = Outcome.from_json(json.loads(line))
    assert (back.kind, back.released, back.target) == (RELEASED, 3, "[192.0.2.1]:25")
    assert len(back.unreachable) + back.unreachable_more == 1000
    assert back.before.messages == 1000


def test_a_small_outcome_goes_and_comes_back_as_it_was():
    outcome = Outcome(RELEASED, 2, "[192.0.2.1]:25", unreachable=(("b.example", "refused"),),
                      forwarded=2, since=5.0, by="finger")
    assert Outcome.from_json(outcome.as_json()) == outcome


@pytest.mark.parametrize("data", [
    {},                                               # no kind
    {"kind": "released", "released": 1, "unreachable": [["a"]]},
    {"kind": "released", "before": {"domain": "x"}},  # a status without its fields
    {"kind": "released", "unreachable": 5},
])
def test_what_is_not_an_outcome_is_a_value_error(data):
    with pytest.raises(ValueError, match="not a release outcome"):
        Outcome.from_json(data)


def test_a_key_a_newer_helper_adds_is_ignored():
    assert Outcome.from_json({"kind": NOTHING, "something_new": 1}) == Outcome(NOTHING)
