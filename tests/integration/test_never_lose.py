"""Never lose: every way a customer's mail could still bounce, expire or
vanish, attacked on a real Postfix with lifetimes of seconds.

Each test here failed on the code before it (issue 14): mail that never
passed smtpd expired, a customer's 5xx bounced everything, the poller
ignored Postfix's backoff, renewals piled up Received headers, a hashed
hold queue crashed the renewal, re-holding lived in the milter, the
release window was one process's memory, and a removed domain's mail was
held forever, unseen.
"""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import SHORT_LIFETIMES, Sink, free_port, wait_until


def one_customer(sink_port: int) -> str:
    """Only customer.test (no recipient lists: the admin's other relay domains
    need no relay_recipient_maps entries)."""
    return f'[domains."customer.test"]\nrelay = "[127.0.0.1]:{sink_port}"\n'


def customer_losses(stack, domain: str = "customer.test") -> list[str]:
    """Log lines of mail for ``domain`` that bounced, expired or was returned:
    every queue id that ever had a recipient there, and what became of it."""
    lines = stack.pf.log().splitlines()
    pattern = re.compile(r"\]: ([0-9A-Za-z]+): (?:to|orig_to)=<[^>]*@" + re.escape(domain) + ">")
    qids = {m.group(1) for line in lines for m in [pattern.search(line)] if m}
    lost = []
    for line in lines:
        m = re.search(r"\]: ([0-9A-Za-z]+): ", line)
        if m and m.group(1) in qids and any(
                s in line for s in ("status=expired", "status=bounced", "status=force-expired",
                                    "returned to sender")):
            lost.append(line)
    return lost


def hold_queue(stack, domain: str = "customer.test") -> list[dict]:
    return [m for m in stack.queue()
            if any(r["address"].endswith("@" + domain) for r in m["recipients"])]


def sendmail(stack, sender: str, rcpt: str, subject: str, *more: str) -> None:
    """A local submission: Postfix's sendmail, through pickup (no smtpd);
    ``more``: further recipients of the same message."""
    rcpts = [rcpt, *more]
    subprocess.run(["/usr/sbin/sendmail", "-C", str(stack.pf.config_directory), "-f", sender,
                    *rcpts],
                   input=f"From: {sender}\nTo: {', '.join(rcpts)}\nSubject: {subject}\n\nhello\n",
                   text=True, check=True, timeout=30)


def smtp(stack, sender: str, rcpt: str, subject: str, rcpt_options=()) -> None:
    msg = f"From: {sender}\nTo: {rcpt}\nSubject: {subject}\n\nhello\n"
    with smtplib.SMTP(stack.pf.address, stack.pf.smtpd_port, timeout=30) as s:
        s.sendmail(sender, [rcpt], msg, rcpt_options=list(rcpt_options))


def releases(stack) -> dict[str, int]:
    """Releases started so far by any process, per trigger (the ledger's counter)."""
    import sqlite3
    db = sqlite3.connect(stack.state_dir / "ledger.sqlite3")
    try:
        rows = db.execute("SELECT labels, value FROM counters WHERE name = 'releases'").fetchall()
    finally:
        db.close()
    return {json.loads(labels)[1]: value for labels, value in rows}


def release_events(stack) -> list[str]:
    """Every release started so far, one entry per release (its trigger)."""
    return [trigger for trigger, n in sorted(releases(stack).items()) for _ in range(n)]


# -- 2. every way into the queue --------------------------------------------------

def test_mail_that_never_passed_smtpd_is_held_counted_and_delivered(make_stack):
    """A local sendmail, an alias, a bcc, a canonical rewrite, and Postfix's
    own bounce, delay notice and success notice to customer addresses: held
    (never expiring) while the customer is offline for several lifetimes,
    counted, and all delivered when it comes back."""
    outside = Sink(free_port())
    refusing = Sink(free_port())         # bounce.test: its server refuses every recipient
    closed = free_port()
    main = {
        **SHORT_LIFETIMES,
        "virtual_alias_domains": "provider.test",
        "virtual_alias_maps": "inline:{info@provider.test=alice@customer.test}",
        "recipient_bcc_maps": "inline:{boss@outside.test=audit@customer.test}",
        "recipient_canonical_maps": "inline:{old@provider.test=carol@customer.test}",
        "relay_domains": "outside.test, bounce.test, slow.test",
        "transport_maps": (f"inline:{{outside.test=smtp:[127.0.0.1]:{outside.port}, "
                           f"bounce.test=smtp:[127.0.0.1]:{refusing.port}, "
                           f"slow.test=smtp:[127.0.0.1]:{closed}}}"),
        "delay_warning_time": "1s",
        # outside.test's server "lacks" DSN: Postfix itself reports the success
        "smtp_discard_ehlo_keywords": "dsn",
    }
    stack = make_stack(extra_main=main, domains=one_customer, poller_extra="interval = 2")
    outside.start()
    refusing.start(refuse="hard")
    try:
        stack.start_poller()
        sendmail(stack, "root@provider.test", "dave@customer.test", "local sendmail")
        # sendmail -t: the recipients come from the headers (cleanup keeps them
        # after the message, not among the envelope records)
        subprocess.run(["/usr/sbin/sendmail", "-C", str(stack.pf.config_directory), "-t",
                        "-f", "cron@provider.test"],
                       input="To: frank@customer.test\nSubject: sendmail -t\n\nhello\n",
                       text=True, check=True, timeout=30)
        smtp(stack, "x@sender.test", "info@provider.test", "through an alias")
        smtp(stack, "x@sender.test", "boss@outside.test", "bcc to a customer")
        sendmail(stack, "root@provider.test", "old@provider.test", "canonical rewrite")
        smtp(stack, "alice@customer.test", "nobody@bounce.test", "bounces: DSN to alice")
        smtp(stack, "bob@customer.test", "y@slow.test", "delayed, then expires: notices to bob")
        smtp(stack, "erin@customer.test", "ok@outside.test", "success notice to erin",
             rcpt_options=["NOTIFY=SUCCESS"])
        # dave, frank (-t), alice (alias), audit (bcc), carol (canonical), alice's
        # bounce, bob's delay warning and his expiry bounce, erin's success notice
        wait_until(lambda: stack.status("customer.test")[0]["messages"] == 9, 40, 0.5,
                   what="9 messages for customer.test held and counted")
        held_since = time.monotonic()
        # the customer stays offline for several lifetimes (4 s) of every message
        while time.monotonic() - held_since < 16:
            assert customer_losses(stack) == []
            time.sleep(2)
        queue = hold_queue(stack)
        assert len(queue) == 9 and {m["queue_name"] for m in queue} == {"hold"}, queue
        [row] = stack.status("customer.test")
        assert row["messages"] == 9 and row["queues"] == {"hold": 9}

        stack.sink.start()
        wait_until(lambda: len(stack.sink.messages()) == 9, 40, 0.5, what="9 delivered")
        texts = "\n".join(stack.sink.messages())
        for subject in ("local sendmail", "sendmail -t", "through an alias", "bcc to a customer",
                        "canonical rewrite", "Undelivered Mail Returned to Sender",
                        "Delayed Mail (still being retried)", "Successful Mail Delivery Report"):
            assert subject in texts, subject
        wait_until(lambda: stack.status("customer.test")[0]["messages"] == 0, 20,
                   what="nothing held")
        assert customer_losses(stack) == []
        # what went elsewhere went there: boss@ and ok@outside.test delivered once each
        assert len(outside.messages()) == 2
    finally:
        outside.cleanup()
        refusing.cleanup()


# -- 3. a customer's server that answers 5xx ---------------------------------------

RETURNING = {**SHORT_LIFETIMES, "minimal_backoff_time": "5s", "maximal_backoff_time": "10s"}


def returned_to(stack_main: dict) -> tuple[Sink, dict]:
    """A sink for the senders' own server: what is returned lands there."""
    senders = Sink(free_port())
    main = {**stack_main,
            "transport_maps": f"inline:{{sender.test=smtp:[127.0.0.1]:{senders.port}}}"}
    return senders, main


def test_refused_mail_stays_held_marked_refused_until_returned(make_stack):
    senders, main = returned_to(RETURNING)
    stack = make_stack(extra_main=main, poller_extra="interval = 1")
    senders.start()
    try:
        for i in range(3):
            stack.send([f"u{i}@customer.test"], sender=f"s{i}@sender.test", subject=f"m{i}")
        wait_until(lambda: len(stack.queue()) == 3, what="3 held")
        stack.sink.start(refuse="hard")    # half restored: greets, then 5xx for every RCPT
        stack.start_poller()
        wait_until(lambda: release_events(stack), 30, 0.2, what="the poller's release")
        wait_until(lambda: customer_losses(stack) or (
            len(hold_queue(stack)) == 3 and {m["queue_name"] for m in hold_queue(stack)} == {"hold"}),
            30, 0.5, what="back on hold, or lost")
        assert customer_losses(stack) == []        # nothing bounced
        wait_until(lambda: stack.status("customer.test")[0]["refused"] == 3, 30, 0.5,
                   what="3 refused, back on hold")
        [row] = stack.status("customer.test")
        assert row["messages"] == 3 and row["queues"] == {"hold": 3}
        assert "said: 500 5.3.0" in row["refused_reply"], row
        human = stack.flushctl("status", "customer.test").stdout
        assert "refused:3" in human and "500 5.3.0" in human, human
        wait_until(stack.metrics_up, 15, what="metrics")
        assert stack.scrape()[("flushctl_refused_messages",
                               frozenset({("domain", "customer.test")}))] == 3
        # the poller does not try refused mail again by itself: no loop
        time.sleep(6)
        assert len(release_events(stack)) == 1, release_events(stack)
        assert customer_losses(stack) == []
        assert senders.messages() == []

        # the customer's (here: the admin's) next explicit trigger tries again
        out = stack.flushctl("flush", "customer.test").stdout
        assert "released 3" in out, out
        wait_until(lambda: len(release_events(stack)) == 2, 10, what="second release")
        wait_until(lambda: (lambda r: r["refused"] == 3 and r["queues"] == {"hold": 3})(
            stack.status("customer.test")[0]), 30, 0.5, what="refused again, held again")
        assert customer_losses(stack) == []

        # the admin returns them: Postfix's DSN quotes the customer's reply
        out = stack.flushctl("return", "customer.test", "--refused").stdout
        assert "returned 3 refused message(s)" in out, out
        wait_until(lambda: len(senders.messages()) == 3, 30, 0.5, what="3 DSNs to the senders")
        for text in senders.messages():
            assert "Undelivered Mail Returned to Sender" in text
            assert "500 5.3.0 Error: command failed" in text   # the customer server's words
            assert "X-OnDemand-Domain: customer.test" in text   # the returned headers...
            assert "X-OnDemand-Hold" not in text   # ...and no mark that could hold anything
        wait_until(lambda: stack.queue() == [], 20, what="queue empty")
        assert stack.status("customer.test")[0]["messages"] == 0
    finally:
        senders.cleanup()


def test_refused_mail_returns_by_itself_after_refused_return_after(make_stack):
    senders, main = returned_to(RETURNING)

    def domains(sink_port):
        return f"""
[domains."customer.test"]
relay = "[127.0.0.1]:{sink_port}"
refused_return_after = 4
"""
    stack = make_stack(extra_main=main, domains=domains, poller_extra="interval = 1")
    senders.start()
    try:
        stack.send(["u@customer.test"], sender="s@sender.test")
        wait_until(lambda: len(stack.queue()) == 1, what="held")
        stack.sink.start(refuse="hard")
        stack.start_poller()
        wait_until(lambda: stack.status("customer.test")[0]["refused"] == 1, 30, 0.5,
                   what="refused")
        refused_at = time.monotonic()
        wait_until(lambda: len(senders.messages()) == 1, 30, 0.5, what="returned by itself")
        assert time.monotonic() - refused_at >= 3
        assert "500 5.3.0" in senders.messages()[0]
        wait_until(lambda: stack.queue() == [], 20, what="queue empty")
    finally:
        senders.cleanup()


# -- 4. the poller keeps Postfix's retry discipline --------------------------------

def test_poller_backs_off_after_tempfails_and_a_customer_trigger_does_not(make_stack):
    main = {**SHORT_LIFETIMES, "minimal_backoff_time": "300s", "maximal_backoff_time": "4000s"}
    stack = make_stack(extra_main=main, poller_extra="interval = 1", gateway=True,
                       gateway_extra="release_window = 1")   # this test is about backoff
    for i in range(5):
        stack.send([f"u{i}@customer.test"])
    wait_until(lambda: len(stack.queue()) == 5, what="5 held")
    stack.sink.start(refuse="soft")    # greets with 220, then 4xx for every RCPT
    stack.start_poller()
    wait_until(lambda: release_events(stack), 30, 0.2, what="the poller's release")
    time.sleep(20)                     # twenty poller intervals
    assert len(release_events(stack)) == 1, release_events(stack)
    attempts = [l for l in stack.pf.log().splitlines()
                if "status=deferred" in l and "said: 4" in l]
    assert len(attempts) == 5, attempts            # one attempt per message, no more
    [row] = stack.status("customer.test")
    assert row["backoff_until"] > time.time() + 250 and row["queues"] == {"hold": 5}
    assert "backing-off" in stack.flushctl("status").stdout
    once = json.loads(stack.flushctl("poller", "--once", "--json").stdout)
    assert once[0]["action"] == "backing off"
    # the customer asks: that release goes, backoff or not
    assert "Delivery started" in stack.finger("customer.test")
    assert len(release_events(stack)) == 2
    assert customer_losses(stack) == []


# -- 5. renewals never pile up Received headers -------------------------------------

def test_mail_renewed_60_times_is_delivered_with_one_received_header(make_stack):
    from flushctl import config as config_mod
    from flushctl.heldmail.library import HeldMail
    stack = make_stack()
    stack.send(["u@customer.test"], subject="renewed")
    wait_until(lambda: len(stack.queue()) == 1, what="held")
    od = HeldMail(config_mod.load(str(stack.config_path)))
    for _ in range(60):
        [entry] = od.ledger.entries("customer.test")
        assert od.refresh("customer.test", [entry.queue_id]) == 1
    [message] = stack.queue()
    assert message["queue_name"] == "hold"
    stack.sink.start()
    stack.flushctl("flush", "customer.test", "--wait", "--timeout", "60")
    [text] = stack.sink.messages()
    headers = text.split("\n\n", 1)[0]
    assert len(re.findall(r"^Received:", headers, re.M)) == 2, headers   # smtpd's, and the
    assert "from userid" not in headers                                 # sink's own
    assert customer_losses(stack) == []


# -- 6. every queue layout ------------------------------------------------------------

@pytest.mark.parametrize("depth", [1, 2])
def test_hashed_hold_queue(make_stack, depth):
    main = {**SHORT_LIFETIMES, "hash_queue_names": "deferred, defer, hold",
            "hash_queue_depth": str(depth)}
    stack = make_stack(extra_main=main)
    for i in range(3):
        stack.send([f"u{i}@customer.test"])
    wait_until(lambda: stack.status("customer.test")[0]["messages"] == 3, what="3 counted")
    hold = stack.pf.queue_directory / "hold"
    files = [p for p in hold.rglob("*") if p.is_file()]
    assert len(files) == 3 and all(len(p.relative_to(hold).parts) == depth + 1 for p in files)
    # a lost ledger is rebuilt from the hashed hold queue
    for suffix in ("", "-wal", "-shm"):
        (stack.state_dir / f"ledger.sqlite3{suffix}").unlink(missing_ok=True)
    assert stack.status("customer.test")[0]["messages"] == 3
    assert not [l for l in stack.flushctl("check", check=False).stdout.splitlines()
                if l.startswith("ledger:")]
    time.sleep(3)   # older than half the lifetime: renewed before the release
    stack.sink.start(refuse="soft")
    proc = stack.flushctl("flush", "customer.test", "--wait", "--timeout", "30", check=False)
    assert proc.returncode == 5 and "released 3" in proc.stdout, proc.stdout + proc.stderr
    assert stack.status("customer.test")[0]["queues"] == {"hold": 3}
    time.sleep(5)
    stack.sink.restart()
    stack.flushctl("flush", "customer.test", "--wait", "--timeout", "60")
    assert len(stack.sink.messages()) == 3
    assert customer_losses(stack) == []


# -- 7. a renewal does not wait on anybody's bookkeeping --------------------------------

def test_renewal_while_others_record_the_copies_does_not_wait(make_stack):
    stack = make_stack(extra_main=SHORT_LIFETIMES)
    for i in range(20):
        stack.send([f"u{i}@customer.test"])
    wait_until(lambda: len(stack.queue()) == 20, what="20 held")
    time.sleep(3)        # older than half the lifetime
    stack.start_poller()  # its keeper records requeued copies as soon as it sees them
    wait_until(lambda: stack.status("customer.test")[0]["reachable"] is False, 15,
               what="the poller's first probe (customer down): it releases nothing now")
    stop = threading.Event()

    def checking():       # and `flushctl check` does too, over and over
        while not stop.is_set():
            stack.flushctl("check", check=False)
    checker = threading.Thread(target=checking, daemon=True)
    checker.start()
    try:
        stack.sink.start()
        started = time.monotonic()
        out = stack.flushctl("flush", "customer.test").stdout
        took = time.monotonic() - started
    finally:
        stop.set()
        checker.join(60)
    assert "released 20" in out, out
    assert took < 20, took
    wait_until(lambda: len(stack.sink.messages()) == 20, 30, what="20 delivered")
    assert customer_losses(stack) == []


def test_a_renewal_right_after_a_release_brings_every_copy_back_held(make_stack):
    """A release asks qmgr for a scan that ignores defer_transports; Postfix
    keeps that override for the next incoming scan too, whenever it comes
    (up to qmgr's wakeup, 300 s later).
    Left pending, it let the first renewed copy of the next release go out
    on its own, before that release, and the renewal waited its quiet
    period for a copy that never came back (5 s a release, measured in P9)."""
    from flushctl import config as config_mod
    from flushctl.heldmail.library import HeldMail
    stack = make_stack(extra_main=SHORT_LIFETIMES)
    stack.send(["first@customer.test"])
    wait_until(lambda: len(stack.queue()) == 1, what="1 held")
    stack.sink.start()
    stack.flushctl("flush", "customer.test", "--wait", "--timeout", "60")
    assert len(stack.sink.messages()) == 1
    for i in range(3):
        stack.send([f"u{i}@customer.test"])
    wait_until(lambda: len(stack.queue()) == 3, what="3 more held")
    time.sleep(3)        # older than half the lifetime: a release renews them
    od = HeldMail(config_mod.load(str(stack.config_path)))
    ids = [e.queue_id for e in od.ledger.entries("customer.test")]
    assert len(ids) == 3
    assert od.refresh("customer.test", ids) == 3
    time.sleep(1)
    assert len(stack.sink.messages()) == 1, "a renewed copy went out before its release"
    assert [m["queue_name"] for m in stack.queue()] == ["hold"] * 3
    stack.flushctl("flush", "customer.test", "--wait", "--timeout", "60")
    assert len(stack.sink.messages()) == 4
    assert customer_losses(stack) == []


def test_after_a_release_a_paused_customers_local_mail_still_waits(make_stack):
    """The same leftover override, met by another path into the queue: mail
    the milter leaves to the keeper (a local submission for two customers,
    one of them paused: it waits under defer_transports until the keeper
    holds each part) arriving after another domain's release went straight
    to the customers' servers."""
    stack = make_stack()
    stack.sink.start()
    stack.flushctl("pause", "customer.test")
    stack.send(["alice@listed.test"], subject="listed")
    wait_until(lambda: len(stack.queue()) == 1, what="held")
    stack.flushctl("flush", "listed.test", "--wait", "--timeout", "60")
    assert len(stack.sink.messages()) == 1
    time.sleep(1)   # long after the release's own scans
    sendmail(stack, "someone@sender.test", "u@customer.test", "paused", "x@small.test")

    def settled():
        return len(stack.sink.messages()) > 1 or [
            m["queue_name"] for m in hold_queue(stack) if m["queue_name"] in ("deferred", "hold")]
    wait_until(settled, 30, what="the local mail deferred, held or delivered")
    time.sleep(2)
    assert len(stack.sink.messages()) == 1, "a paused customer's mail went out"
    assert [m["queue_name"] in ("deferred", "hold") for m in hold_queue(stack)] == [True]


def _two_held_due_for_renewal(make_stack, **extra_main):
    """A stack with short lifetimes holding two messages old enough that a
    release renews them first; and its config."""
    from flushctl import config as config_mod
    stack = make_stack(extra_main={**SHORT_LIFETIMES, **extra_main})
    for i in range(2):
        stack.send([f"u{i}@customer.test"])
    wait_until(lambda: len(stack.queue()) == 2, what="2 held")
    time.sleep(3)        # older than half the lifetime: renewed before the release
    return stack, config_mod.load(str(stack.config_path))


def test_renewed_copies_another_process_recorded_but_not_yet_held_are_released(make_stack):
    """The keeper records a requeued copy, then holds it: a renewal that
    counts the copies in between must still send them (it sent none, and
    the poller's release then shared that empty one)."""
    from flushctl.heldmail.library import HeldMail
    from flushctl.heldmail.outcome import RELEASED
    stack, cfg = _two_held_due_for_renewal(make_stack)

    class Keeper(HeldMail):     # stopped between recording a copy and holding it
        not_yet_held: list = []

        def _hold(self, queue_ids):
            Keeper.not_yet_held.extend(queue_ids)
    keeper = Keeper(cfg)

    class Releasing(HeldMail):  # whatever it would record, the keeper records first
        def take_in(self, queues=("deferred", "hold")):
            return keeper.take_in(queues)
    stack.sink.start()
    outcome = Releasing(cfg).flush("customer.test", trigger="admin")
    assert Keeper.not_yet_held, "the keeper recorded no copy: the race was not set up"
    assert (outcome.kind, outcome.released) == (RELEASED, 2), outcome
    wait_until(lambda: len(stack.sink.messages()) == 2, 30, what="2 delivered")
    assert customer_losses(stack) == []


def _qmgr_of(stack):
    import psutil
    master = int((stack.pf.queue_directory / "pid" / "master.pid").read_text().split()[0])
    [proc] = [p for p in psutil.Process(master).children() if p.name() == "qmgr"]
    return proc


def _qmgr_stopped_postfix(stack):
    """A Postfix whose ``release`` (-H) stops qmgr first, and which sends no
    kick (postkick would wait for the stopped qmgr): released mail waits in
    the deferred queue until the test resumes qmgr."""
    from flushctl.mta.commands import Postfix

    class QmgrStopped(Postfix):
        def release(self, ids):
            _qmgr_of(stack).suspend()
            return super().release(ids)

        def scan_deferred(self):
            pass
    return QmgrStopped(str(stack.pf.config_directory))


@pytest.mark.parametrize("paused", [False, True], ids=["released", "paused_meanwhile"])
def test_a_hold_of_a_copy_that_lands_after_the_release_is_undone(make_stack, paused):
    """The keeper records a renewed copy and asks Postfix to hold it; a
    release marks and releases the copy before that hold lands.  The copy
    was then kept back until the next trigger, the release having said it
    sent it.  qmgr is stopped from the release's ``postsuper -H`` until the
    late hold has landed, so the copy cannot go out in between.  And when
    the admin paused the domain meanwhile (review finding), the copies
    stay held: undoing the hold must not undo the pause."""
    from flushctl.heldmail.library import HeldMail
    from flushctl.heldmail.outcome import RELEASED
    from flushctl.mta.commands import Postfix
    # no periodic deferred scan: stopped, qmgr would run the one that fell
    # due meanwhile first when it resumes, before the kick below, and take
    # the released copies without it (defer_transports: deferred again,
    # expired 4 s later with nobody to hold them back)
    stack, cfg = _two_held_due_for_renewal(make_stack, queue_run_delay="300s")

    class Late(Postfix):         # the keeper's hold, not landed yet
        asked: list = []

        def hold(self, ids):
            Late.asked.extend(ids)
            return 0
    keeper = HeldMail(cfg, postfix=Late(cfg.config_directory))

    class Releasing(HeldMail):   # whatever it would record, the keeper records first
        def take_in(self, queues=("deferred", "hold")):
            return keeper.take_in(queues)
    stack.sink.start()
    try:
        outcome = Releasing(cfg, postfix=_qmgr_stopped_postfix(stack)).flush(
            "customer.test", trigger="admin")
        assert Late.asked, "the keeper recorded no copy: the race was not set up"
        assert (outcome.kind, outcome.released) == (RELEASED, 2), outcome
        if paused:
            HeldMail(cfg).pause("customer.test")
        # the keeper's hold lands now, after the release
        keeper.postfix = _qmgr_stopped_postfix(stack)
        keeper._hold_unless_released(list(Late.asked), dict.fromkeys(Late.asked))
    finally:
        _qmgr_of(stack).resume()
    Postfix(cfg.config_directory).scan_deferred()   # the kicks held back above
    if paused:
        time.sleep(3)
        assert stack.sink.started() == 0
        assert sorted(m["queue_name"] for m in stack.queue()) == ["hold", "hold"]
    else:
        wait_until(lambda: len(stack.sink.messages()) == 2, 30, what="2 delivered")
    assert customer_losses(stack) == []


def test_a_sweep_that_holds_mail_a_release_took_after_its_look_sends_it_again(make_stack):
    """Review finding: hold_back decides on a snapshot (and a second look
    at the marks of what it means to hold), then holds.  A release that
    marked and released a message in between had it taken back by that
    hold, to wait for the next trigger.  Here the message waits unreleased
    in the deferred queue; the release runs just before the sweep's hold
    lands (qmgr stopped from its -H on, so the message waits for the
    hold)."""
    from flushctl import config as config_mod
    from flushctl.heldmail.library import HeldMail
    from flushctl.heldmail.outcome import RELEASED
    from flushctl.mta.commands import Postfix
    stack = make_stack()
    stack.send(["u@customer.test"])
    wait_until(lambda: [m for m in stack.queue() if m["queue_name"] == "hold"], what="held")
    [queue_id] = [m["queue_id"] for m in stack.queue()]
    cfg = config_mod.load(str(stack.config_path))
    pf = Postfix(cfg.config_directory)
    pf.release([queue_id])    # out of hold by hand, unreleased: a sweep holds it back
    wait_until(lambda: [m for m in stack.queue() if m["queue_name"] == "deferred"],
               what="the message in the deferred queue")
    outcomes = []

    class Sweeper(HeldMail):
        def _hold(self, queue_ids):
            if not outcomes:   # the release comes between the look and the hold
                outcomes.append(HeldMail(cfg, postfix=_qmgr_stopped_postfix(stack)).flush(
                    "customer.test", trigger="admin"))
            super()._hold(queue_ids)
    sweeper = Sweeper(cfg, postfix=_qmgr_stopped_postfix(stack))
    snap = sweeper.snapshot("customer.test")
    assert [i.released for i in snap.present] == [None]
    stack.sink.start()
    try:
        sweeper.hold_back("customer.test", snap)
        assert [(o.kind, o.released) for o in outcomes] == [(RELEASED, 1)], outcomes
    finally:
        _qmgr_of(stack).resume()
    pf.scan_deferred()
    wait_until(lambda: len(stack.sink.messages()) == 1, 30, what="delivered")
    assert customer_losses(stack) == []


def test_held_mail_that_is_not_ours_is_read_once(make_stack):
    from flushctl import config as config_mod
    from flushctl.heldmail.library import HeldMail
    from flushctl.mta.commands import Postfix

    class Counting(Postfix):
        reads = 0

        def read_messages(self, ids, batch=200):
            Counting.reads += len(list(ids))
            return super().read_messages(ids, batch)

    closed = free_port()
    stack = make_stack(extra_main={"relay_domains": "elsewhere.test",
                                   "transport_maps": f"inline:{{elsewhere.test="
                                                     f"smtp:[127.0.0.1]:{closed}}}"},
                       domains=one_customer)
    for i in range(30):
        stack.send([f"x{i}@elsewhere.test"])      # not a customer: deferred, then held by hand
    wait_until(lambda: len(stack.queue()) == 30, what="30 deferred")
    stack.pf.run("postsuper", "-c", str(stack.pf.config_directory), "-h", "ALL")
    stack.send(["u@customer.test"])
    wait_until(lambda: len(stack.queue()) == 31, what="31 queued")
    cfg = config_mod.load(str(stack.config_path))
    od = HeldMail(cfg, postfix=Counting(cfg.config_directory))
    od.take_in()
    assert Counting.reads == 30
    for _ in range(5):
        od.take_in()
    assert Counting.reads == 30                   # not again in this process
    HeldMail(cfg, postfix=Counting(cfg.config_directory)).take_in()
    assert Counting.reads == 30                   # nor in another (the ledger remembers)
    assert stack.status("customer.test")[0]["messages"] == 1


# -- 8. re-holding does not depend on the milter ----------------------------------------

def test_failed_release_goes_back_on_hold_with_the_milter_dead(make_stack):
    stack = make_stack(extra_main=SHORT_LIFETIMES)
    for i in range(3):
        stack.send([f"u{i}@customer.test"])
    wait_until(lambda: len(stack.queue()) == 3, what="3 held")
    stack.start_poller()                       # the keeper runs there
    wait_until(lambda: stack.status("customer.test")[0]["reachable"] is False, 15,
               what="the poller's first probe (customer down)")
    stack.stop_milter(signal.SIGKILL)
    stack.sink.start(refuse="soft")
    out = stack.flushctl("flush", "customer.test").stdout   # no --wait: the CLI sweeps nothing
    assert "released 3" in out, out
    held_since = time.monotonic()
    while time.monotonic() - held_since < 14:    # several lifetimes of 4 s
        assert customer_losses(stack) == []
        time.sleep(1)
    queue = stack.queue()
    assert len(queue) == 3 and {m["queue_name"] for m in queue} == {"hold"}
    stack.sink.restart()
    stack.flushctl("flush", "customer.test", "--wait", "--timeout", "60")
    assert len(stack.sink.messages()) == 3
    assert customer_losses(stack) == []


# -- 9. one release window for every trigger ---------------------------------------------

def test_finger_right_after_a_poller_release_shares_it(make_stack):
    stack = make_stack(gateway=True, poller_extra="interval = 1")
    for i in range(10):
        stack.send([f"u{i}@customer.test"])
    wait_until(lambda: len(stack.queue()) == 10, what="10 held")
    stack.sink.start(refuse="soft")   # greylisting: every attempt tempfails
    stack.start_poller()
    wait_until(lambda: release_events(stack), 20, 0.05, what="the poller's release")
    time.sleep(0.4)
    out = stack.finger("customer.test")
    assert "Delivery started" in out, out
    time.sleep(2)
    events = release_events(stack)
    assert events == ["poller"], events
    assert "result=shared" in stack.gateway_log()
    # an ETRN within the window shares it too
    with smtplib.SMTP(stack.pf.address, stack.pf.smtpd_port, timeout=30) as s:
        s.ehlo("customer.test")
        assert s.docmd("ETRN", "customer.test")[0] == 250
    assert len(release_events(stack)) == 1
    # the admin's flush is deliberate: it releases, window or not
    out = stack.flushctl("flush", "customer.test").stdout
    assert "released 10" in out, out
    assert len(release_events(stack)) == 2


# -- 11. a domain removed from the config while its mail is held ---------------------------

def test_removing_a_domain_that_holds_mail(make_stack):
    stack = make_stack()
    stack.start_poller()
    for i in range(2):
        stack.send([f"u{i}@small.test"])
    wait_until(lambda: stack.status("small.test")[0]["messages"] == 2, what="2 held")
    size = stack.status("small.test")[0]["bytes"]
    text = stack.config_path.read_text()
    start = text.index('[domains."small.test"]')
    stack.config_path.write_text(text[:start])

    proc = stack.flushctl("apply", check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"small.test: 2 held message(s), {size} bytes" in proc.stderr, proc.stderr
    assert "--keep-removed" in proc.stderr
    # nothing changed
    assert "small.test" in (stack.pf.config_directory / "flushctl" / "relay_domains").read_text()

    stack.flushctl("apply", "--keep-removed")
    assert "small.test" not in (stack.pf.config_directory / "flushctl" /
                                "relay_domains").read_text()
    rows = {r["domain"]: r for r in stack.status()}
    assert rows["small.test"]["configured"] is False and rows["small.test"]["messages"] == 2
    assert "removed" in stack.flushctl("status").stdout
    check = stack.flushctl("check", check=False).stdout
    assert "small.test: 2 held message(s)" in check and "no longer configured" in check, check
    # a kept domain does not stop the next apply
    assert stack.flushctl("apply").returncode == 0
    stack.stop_poller()
    stack.start_poller()    # the poller reads the new config; its metrics show the domain
    wait_until(stack.metrics_up, 15, what="metrics")
    assert stack.scrape()[("flushctl_held_messages",
                           frozenset({("domain", "small.test")}))] == 2
    # after all, delete it: purge works on a removed domain
    out = stack.flushctl("purge", "small.test", "--yes").stdout
    assert "deleted 2" in out
    assert "small.test" not in {r["domain"] for r in stack.status()}


def test_apply_release_removed_sends_the_mail_as_ordinary_mail(make_stack):
    stack = make_stack()
    stack.send(["u@small.test"])
    wait_until(lambda: stack.status("small.test")[0]["messages"] == 1, what="held")
    text = stack.config_path.read_text()
    stack.config_path.write_text(text[:text.index('[domains."small.test"]')])
    out = stack.flushctl("apply", "--release-removed").stdout
    assert "small.test: released 1 held message(s) as ordinary mail" in out, out
    queue = stack.queue()
    assert [m["queue_name"] for m in queue] != ["hold"]
    assert "small.test" not in {r["domain"] for r in stack.status()}
    # ordinary mail now: the keeper leaves it alone
    stack.flushctl("sweep")
    assert all(m["queue_name"] != "hold" for m in stack.queue())


# -- more ways past the milter and the keeper -----------------------------------------

def test_odd_but_valid_recipients_are_held_and_counted(make_stack):
    """Postfix accepts a quoted local part with a space, and `_` in a host
    name; they are a customer's recipients all the same."""
    stack = make_stack(extra_main=SHORT_LIFETIMES)
    stack.start_poller()
    smtp(stack, "x@sender.test", '"john doe"@customer.test', "quoted")
    smtp(stack, "x@sender.test", "u@pc_1.customer.test", "underscore")
    wait_until(lambda: stack.status("customer.test")[0]["messages"] == 2, 20,
               what="2 held and counted")
    time.sleep(10)                            # more than two lifetimes
    assert customer_losses(stack) == []
    assert [m["queue_name"] for m in stack.queue()] == ["hold", "hold"]
    stack.sink.start()
    stack.flushctl("flush", "customer.test", "--wait", "--timeout", "60")
    assert len(stack.sink.messages()) == 2


def test_mail_returned_to_a_sender_at_another_customer_is_that_customers(make_stack):
    """A DSN quoting held mail (our mark among the quoted headers) to a
    sender at another customer: taken in for that customer, renewed (the
    quoted mark holds nothing) and delivered, the mark stripped."""
    other = Sink(free_port())

    def domains(sink_port):
        return (f'[domains."customer.test"]\nrelay = "[127.0.0.1]:{sink_port}"\n'
                f'[domains."other.test"]\nrelay = "[127.0.0.1]:{other.port}"\n')
    stack = make_stack(extra_main=RETURNING, domains=domains, poller_extra="interval = 1")
    try:
        stack.send(["u@customer.test"], sender="boss@other.test", subject="to be returned")
        wait_until(lambda: len(stack.queue()) == 1, what="held")
        stack.sink.start(refuse="hard")
        stack.start_poller()
        wait_until(lambda: stack.status("customer.test")[0]["refused"] == 1, 30, 0.5,
                   what="refused")
        stack.flushctl("return", "customer.test", "--refused")
        wait_until(lambda: stack.status("other.test")[0]["messages"] == 1, 30, 0.5,
                   what="the DSN held for other.test")
        time.sleep(3)                          # older than half its lifetime: renewed
        other.start()
        stack.flushctl("flush", "other.test", "--wait", "--timeout", "60")
        # a renewed copy qmgr sent early can still be on its way when --wait
        # returns (a known gap, see the issue notes): delivered, once
        [text] = wait_until(other.messages, 30, what="the DSN delivered")
        assert "Undelivered Mail Returned to Sender" in text and "500 5.3.0" in text
        assert "X-OnDemand-Hold" not in text
        assert stack.queue() == [] and customer_losses(stack, "other.test") == []
    finally:
        other.cleanup()


def test_a_lost_ledger_finds_the_mail_the_keeper_took_in(make_stack):
    stack = make_stack(extra_main=SHORT_LIFETIMES)
    stack.start_poller()
    sendmail(stack, "root@provider.test", "dave@customer.test", "local, untagged")
    wait_until(lambda: stack.status("customer.test")[0]["queues"] == {"hold": 1}, 20,
               what="taken in and held")
    stack.stop_poller()
    time.sleep(2)         # a few passes of the keeper: it has seen the message held
    for suffix in ("", "-wal", "-shm"):
        (stack.state_dir / f"ledger.sqlite3{suffix}").unlink(missing_ok=True)
    # the helper's keeper, still running, makes the new file on its next
    # pass; the message is in what it remembers of the queue, yet it must
    # look it up again in the new file, and no reader may trust that file
    # before someone rebuilt it
    wait_until((stack.state_dir / "ledger.sqlite3").exists, 20,
               what="the keeper made a new ledger")
    # rebuilt from the queue: no tag, but its defer log shows it waited as a
    # customer's mail in the deferred queue before the keeper held it
    assert stack.status("customer.test")[0]["messages"] == 1
    stack.sink.start()
    stack.flushctl("flush", "customer.test", "--wait", "--timeout", "60")
    assert len(stack.sink.messages()) == 1


def test_mail_qmgr_set_aside_in_incoming_is_not_left_there(make_stack):
    """qmgr puts a message back into the incoming queue when a delivery
    agent still has it locked (a flush or a short retry racing the end of
    a delivery: "skipped, still being delivered") and looks there again
    only when something wakes it, up to five minutes later.  The keeper
    wakes it: the message is held like any other, not left aside."""
    stack = make_stack(domains=one_customer)
    stack.stop_milter()            # untagged: it waits in the deferred queue
    sendmail(stack, "root@provider.test", "alice@customer.test", "set aside")
    [entry] = wait_until(lambda: [m for m in stack.queue() if m["queue_name"] == "deferred"],
                         20, what="deferred")
    queue_directory = Path(stack.pf.queue_directory)
    [path] = [p for p in (queue_directory / "deferred").rglob(entry["queue_id"])]
    # as qmgr does, with a message a flush took before its retry time: its
    # mtime (the retry time) is still to come, which qmgr's incoming scan
    # passes over
    assert os.stat(path).st_mtime > time.time() + 60
    os.rename(path, queue_directory / "incoming" / entry["queue_id"])
    time.sleep(3)
    assert [m["queue_name"] for m in stack.queue()] == ["incoming"]   # qmgr did not look

    def held():
        stack.flushctl("sweep")
        return stack.status("customer.test")[0]["queues"] == {"hold": 1}
    wait_until(held, 30, interval=1, what="held, not left in incoming")


def test_outside_recipients_go_their_own_way_once_the_customer_has_its_copy(make_stack):
    closed = free_port()
    main = {**SHORT_LIFETIMES, "maximal_queue_lifetime": "1d", "bounce_queue_lifetime": "1d",
            "virtual_alias_domains": "provider.test",
            "virtual_alias_maps": "inline:{{team@provider.test=alice@customer.test, "
                                  "y@slow.test}}",
            "relay_domains": "slow.test",
            "transport_maps": f"inline:{{slow.test=smtp:[127.0.0.1]:{closed}}}"}
    stack = make_stack(extra_main=main, domains=one_customer)
    stack.start_poller()
    smtp(stack, "x@sender.test", "team@provider.test", "to a team")
    wait_until(lambda: stack.status("customer.test")[0]["queues"] == {"hold": 1}, 20,
               what="held whole for the customer")
    stack.sink.start()
    stack.flushctl("flush", "customer.test", "--wait", "--timeout", "60")
    assert len(stack.sink.messages()) == 1      # alice has her copy
    # y@slow.test still fails: Postfix keeps trying it as any other mail
    time.sleep(3)
    [message] = stack.queue()
    assert message["queue_name"] == "deferred", message
    assert [r["address"] for r in message["recipients"]] == ["y@slow.test"]
    assert stack.status("customer.test")[0]["messages"] == 0
    assert stack.status("customer.test")[0]["backoff_until"] is None


def test_a_raw_8bit_header_anywhere_in_the_queue_stops_no_keeping(make_stack):
    """Legacy mailers send raw Latin-1 headers, and Postfix takes them.
    Before: one such message in the deferred queue (for anyone) made
    postcat's output unreadable, every keeper pass failed at its intake
    step and skipped the rest, so mail for a customer that reached the
    queue through an alias was never held.  Now the output is read with
    replacement characters, and each keeper step runs on its own."""
    closed = free_port()
    main = {
        "virtual_alias_domains": "provider.test",
        "virtual_alias_maps": "inline:{info@provider.test=alice@customer.test}",
        "relay_domains": "outside.test",
        "transport_maps": f"inline:{{outside.test=smtp:[127.0.0.1]:{closed}}}",
    }
    stack = make_stack(extra_main=main, domains=one_customer)
    stack.start_helper()   # the keeper
    raw = (b"From: someone@sender.test\r\nTo: x@outside.test\r\n"
           b"Subject: Caf\xe9 cr\xe8me\r\n\r\nhello\r\n")
    with smtplib.SMTP(stack.pf.address, stack.pf.smtpd_port, timeout=30) as s:
        s.sendmail("someone@sender.test", ["x@outside.test"], raw)
    wait_until(lambda: any(e["queue_name"] == "deferred" for e in stack.queue()), 30,
               what="the 8-bit message deferred")
    smtp(stack, "x@sender.test", "info@provider.test", "through an alias")
    wait_until(lambda: stack.status("customer.test")[0]["queues"] == {"hold": 1}, 30,
               what="the alias's customer mail held")
    assert "UnicodeDecodeError" not in stack.daemon_log("helper")
