"""Fault injection under load: whatever happens to our processes, every
message that got 250 is held and counted, every other one got a 4xx,
none a 5xx, none bounced."""

import os
import re
import signal
import smtplib
import subprocess
import threading
import time

import pytest

from conftest import bounce_lines, wait_until

SENDERS = 6
KILLS = 3


def _send_loop(stack, n: int, stop: threading.Event, outcomes: list, lock: threading.Lock,
               body: str = "body\n", prefix: str = ""):
    i = 0
    while not stop.is_set():
        i += 1
        rcpt = f"{prefix}user{n}x{i}@customer.test"
        try:
            with smtplib.SMTP("127.0.0.1", stack.pf.smtpd_port, timeout=30) as smtp:
                smtp.sendmail("load@sender.test", [rcpt], f"Subject: load {n}/{i}\n\n{body}")
            code = 250
        except smtplib.SMTPRecipientsRefused as exc:
            code = exc.recipients[rcpt][0]
        except smtplib.SMTPResponseException as exc:
            code = exc.smtp_code
        except (smtplib.SMTPServerDisconnected, ConnectionError):
            code = 0   # the server hung up: nothing was accepted
        with lock:
            outcomes.append((rcpt, code))
        if code != 250:
            time.sleep(0.05)  # a real client would not hammer a tempfailing server


def _senders(stack, outcomes: list, body: str = "body\n", prefix: str = ""):
    """Start SENDERS parallel SMTP clients; returns their stop event and threads."""
    lock = threading.Lock()
    stop = threading.Event()
    senders = [threading.Thread(target=_send_loop,
                                args=(stack, n, stop, outcomes, lock, body, prefix))
               for n in range(SENDERS)]
    for t in senders:
        t.start()
    return stop, senders


def _held_rcpts(stack) -> set[str]:
    return {m["recipients"][0]["address"] for m in stack.queue() if m["queue_name"] == "hold"}


def test_milter_killed_under_load_loses_nothing(stack):
    outcomes: list = []
    stop, senders = _senders(stack, outcomes)
    try:
        for _ in range(KILLS):
            time.sleep(1.5)
            stack.stop_milter(signal.SIGKILL)  # mid-transaction, no goodbye
            time.sleep(0.5)
            stack.start_milter()
        time.sleep(1.5)
    finally:
        stop.set()
        for t in senders:
            t.join(60)

    accepted = {rcpt for rcpt, code in outcomes if code == 250}
    others = [code for _, code in outcomes if code != 250]
    print(f"sent {len(outcomes)}: {len(accepted)} accepted (250), {len(others)} refused "
          f"({sorted(set(others))}), milter killed {KILLS} times")
    assert len(accepted) > 50 and others, "the load and the kills must both have happened"
    assert all(code == 0 or 400 <= code < 500 for code in others), sorted(set(others))

    wait_until(lambda: _held_rcpts(stack) >= accepted, 30, what="every accepted message held")
    assert _held_rcpts(stack) == accepted   # nothing refused got in, nothing accepted is lost
    assert stack.status("customer.test")[0]["messages"] == len(accepted)   # and counted
    assert bounce_lines(stack) == []


HELD = 2000


def _hold_many(stack, n: int) -> None:
    subprocess.run(["smtp-source", "-s", "10", "-m", str(n), "-f", "load@sender.test",
                    "-t", "user@customer.test", f"127.0.0.1:{stack.pf.smtpd_port}"],
                   check=True, capture_output=True, timeout=300)
    wait_until(lambda: stack.status("customer.test")[0]["messages"] == n, 60,
               what=f"{n} held")


def _delivered_ids(stack) -> list[str]:
    ids = []
    for text in stack.sink.messages():
        match = re.search(r"^Message-Id: (\S+)", text, re.M | re.I)
        ids.append(match.group(1) if match else "?")
    return ids


def _held(stack) -> int:
    return sum(1 for m in stack.queue() if m["queue_name"] == "hold")


def test_gateway_killed_mid_release_then_postfix_restarted(make_stack):
    # the release helper's keeper puts what the restart left undelivered back on hold
    stack = make_stack(gateway=True)
    _hold_many(stack, HELD)
    stack.sink.start()
    out = stack.finger("customer.test")
    assert "Delivery started" in out, out
    # deliveries under way: kill the gateway and the release helper (with
    # whatever they run), and bounce Postfix
    wait_until(lambda: len(stack.sink.messages()) > 0, 30, 0.02, what="first deliveries")
    for proc in (stack.gateway, stack.helper):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    stack.gateway = stack.helper = None
    stack.pf.postfix("stop")
    stack.pf.postfix("start")
    stack.start_gateway()

    # quiet again: each message is delivered or still held, none elsewhere
    def settled():
        queue = stack.queue()
        return all(m["queue_name"] == "hold" for m in queue) and \
            len(stack.sink.messages()) + len(queue) >= HELD
    wait_until(settled, 120, 0.5, what="deliveries settled")
    first = _delivered_ids(stack)
    # nothing lost; a delivery the Postfix stop cut off after the customer's
    # 250 stays queued, and goes back on hold: it will be delivered again
    assert len(set(first)) + _held(stack) >= HELD
    assert stack.status("customer.test")[0]["messages"] == _held(stack)   # exact

    # whatever is left goes out with the next trigger; nothing is lost
    if _held(stack):
        assert "Delivery started" in stack.finger("customer.test")
    wait_until(lambda: len(set(_delivered_ids(stack))) == HELD, 120, 0.5,
               what="all delivered")
    ids = _delivered_ids(stack)
    duplicates = len(ids) - len(set(ids))
    print(f"{HELD} held; gateway and helper killed, Postfix restarted mid-release after "
          f"{len(first)} deliveries; all {HELD} delivered, {duplicates} twice "
          "(a delivery cut off by the Postfix stop is retried: SMTP is at-least-once)")
    assert stack.status("customer.test")[0]["messages"] == 0
    assert bounce_lines(stack) == []


def _kill_mid_release(stack, proc, total: int) -> int:
    """SIGKILL PROC's whole process group (its postsuper too) as soon as the
    hold queue starts to empty; returns how many were still held then."""
    hold = stack.pf.queue_directory / "hold"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        left = sum(1 for _ in os.scandir(hold))
        if left < total:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    return left


@pytest.mark.parametrize("trigger", ["poller", "gateway"])
def test_our_daemon_killed_mid_release_loses_and_duplicates_nothing(make_stack, trigger):
    """Only our process that releases dies (the release helper, with the
    postsuper it runs; the daemon that asked it ends by itself), Postfix
    stays up: after a restart and the next trigger every message is
    delivered exactly once."""
    stack = make_stack(gateway=trigger == "gateway",
                       poller_extra="interval = 1" if trigger == "poller" else "")
    _hold_many(stack, HELD)
    if trigger == "poller":
        stack.start_poller()        # probes, finds the customer down
        time.sleep(1.5)
        stack.sink.start()          # the next probe answers: release
        victim = stack.poller
    else:
        stack.sink.start()
        threading.Thread(target=stack.finger, args=("customer.test",), daemon=True).start()
        victim = stack.gateway
    left = _kill_mid_release(stack, stack.helper, HELD)
    stack.helper = None
    assert victim.wait(15) != 0      # nobody can release: it ends, for a restart
    if trigger == "poller":
        stack.poller = None
        stack.start_poller()        # it releases again by itself
    else:
        stack.gateway = None
        stack.start_gateway()
        time.sleep(1)
        assert "Delivery started" in stack.finger("customer.test")

    try:
        wait_until(lambda: len(stack.sink.messages()) >= HELD and not stack.queue(), 120, 0.5,
                   what="all delivered")
    finally:
        queues = {}
        for m in stack.queue():
            queues[m["queue_name"]] = queues.get(m["queue_name"], 0) + 1
        print(f"{trigger}: {len(stack.sink.messages())} delivered, still queued: {queues}")
    ids = _delivered_ids(stack)
    print(f"{trigger}: killed with {left} of {HELD} still held; after restart all "
          f"{len(set(ids))} delivered, {len(ids) - len(set(ids))} twice")
    assert len(ids) == len(set(ids)) == HELD          # each exactly once
    assert stack.status("customer.test")[0]["messages"] == 0
    assert bounce_lines(stack) == []


def _ledger_files(stack):
    return [stack.state_dir / f"ledger.sqlite3{s}" for s in ("", "-wal", "-shm")]


def test_ledger_removed_or_corrupted_is_rebuilt_from_the_queue(stack):
    for i in range(5):
        stack.send([f"user{i}@customer.test"])
    stack.send(["alice@listed.test"])
    wait_until(lambda: len(stack.queue()) == 6, what="6 held")

    # removed while the milter runs: the next reader opens a new file and
    # rebuilds it from the tag headers in the hold queue
    for path in _ledger_files(stack):
        path.unlink(missing_ok=True)
    assert stack.status("customer.test")[0]["messages"] == 5
    assert stack.status("listed.test")[0]["messages"] == 1
    # the milter noticed too (within 5 s): new mail is recorded
    wait_until(lambda: "event=ledger_replaced" in (stack.state_dir / "milter.log").read_text(),
               15, what="the milter reopened the ledger")
    stack.send(["user9@customer.test"])
    wait_until(lambda: stack.status("customer.test")[0]["messages"] == 6, 15,
               what="new mail counted")

    # corrupted: kept aside, started afresh, rebuilt
    for path in _ledger_files(stack):
        path.unlink(missing_ok=True)
    (stack.state_dir / "ledger.sqlite3").write_bytes(b"this is not a database\n" * 100)
    assert stack.status("customer.test")[0]["messages"] == 6
    assert list(stack.state_dir.glob("ledger.sqlite3.corrupt-*"))
    held = sum(1 for m in stack.queue() if m["queue_name"] == "hold")
    print(f"ledger removed, then corrupted, with {held} messages held: rebuilt both times, "
          "status exact")
    assert held == 7


def test_a_ledger_the_milter_made_anew_is_rebuilt_before_it_is_trusted(stack):
    """The milter makes a new ledger file on its next message when the old
    one is gone; it cannot read the queue, so the file holds that message
    only.  The first reader that can read the queue rebuilds it: status
    counts the mail held before."""
    for i in range(3):
        stack.send([f"user{i}@customer.test"])
    wait_until(lambda: len(stack.queue()) == 3, what="3 held")
    for path in _ledger_files(stack):
        path.unlink(missing_ok=True)
    wait_until(lambda: "event=ledger_replaced" in (stack.state_dir / "milter.log").read_text(),
               15, what="the milter noticed the ledger gone")
    stack.send(["user9@customer.test"])
    wait_until(lambda: len(stack.queue()) == 4, what="4 held")
    assert (stack.state_dir / "ledger.sqlite3").exists()
    assert stack.status("customer.test")[0]["messages"] == 4


def _fill(path, leave: int) -> int:
    """Fill PATH's file system until about LEAVE bytes are free; returns the bytes written."""
    chunk = b"\0" * (1 << 20)
    written = 0
    with open(path / "filler", "ab") as fh:
        while True:
            st = os.statvfs(path)
            free = st.f_bavail * st.f_frsize - leave
            if free <= 0:
                break
            try:
                fh.write(chunk[:min(free, len(chunk))])
                fh.flush()
            except OSError:   # full already
                break
            written += min(free, len(chunk))
    return written


def _load_until_refused(stack, outcomes: list, body: str, prefix: str, refusals: int,
                        seconds: float):
    stop, senders = _senders(stack, outcomes, body, prefix)
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and \
                sum(1 for _, code in list(outcomes) if code != 250) < refusals:
            time.sleep(0.2)
    finally:
        stop.set()
        for t in senders:
            t.join(120)


def test_full_file_systems_tempfail_and_never_half_accept(make_stack):
    """The queue file system, then the state file system (the ledger), filled
    under parallel load: every 250 is held and counted, everything else got a
    4xx, nothing sits half-written in the queue, and once space is back mail
    flows again with the counts exact."""
    def small_disks(pf):
        pf.mount_small_filesystem(pf.queue_directory, 48)
        pf.mount_small_filesystem(pf.root / "state", 8)
    # smtpd wants 1.5 x message_size_limit free at MAIL FROM: 1.5 MB, less than
    # what 6 parallel 600 KB messages need, so some queue file writes fail too
    stack = make_stack(prepare=small_disks, extra_main={"message_size_limit": "1000000"})
    state, spool = stack.state_dir, stack.pf.queue_directory
    report = []

    # the ledger's file system full: the milter cannot record, so it tempfails
    outcomes_state: list = []
    _fill(state, 0)
    _load_until_refused(stack, outcomes_state, "small\n", "s", refusals=20, seconds=20)
    report.append(("state full", outcomes_state))
    status = stack.flushctl("status", "--json", check=False)   # a reader meets a full disk
    assert not list(state.glob("ledger.sqlite3.corrupt-*")), "a full disk is not corruption"
    (state / "filler").unlink()

    # the queue's file system near full, messages of 600 KB: smtpd refuses
    # MAIL FROM (452) or cleanup cannot write the queue file (451)
    outcomes_queue: list = []
    _fill(spool, 6 << 20)
    big = ("x" * 75 + "\n") * 8000
    _load_until_refused(stack, outcomes_queue, big, "q", refusals=20, seconds=60)
    report.append(("queue full", outcomes_queue))
    (spool / "filler").unlink()

    # space back: mail flows again
    outcomes_after: list = []
    stop, senders = _senders(stack, outcomes_after, prefix="a")
    time.sleep(2)
    stop.set()
    for t in senders:
        t.join(60)
    report.append(("space back", outcomes_after))

    for name, outcomes in report:
        codes = sorted({code for _, code in outcomes})
        print(f"{name}: {len(outcomes)} sent, "
              f"{sum(1 for _, c in outcomes if c == 250)} accepted, replies {codes}")
    for name, outcomes in report[:2]:
        refused = [code for _, code in outcomes if code != 250]
        assert len(refused) >= 20, f"{name}: the disk never filled"
        assert all(code == 0 or 400 <= code < 500 for code in refused), (name, sorted(set(refused)))
    assert any(code == 250 for _, code in outcomes_after), "mail does not flow again"

    accepted = {rcpt for outcomes in (o for _, o in report) for rcpt, code in outcomes
                if code == 250}
    wait_until(lambda: _held_rcpts(stack) >= accepted, 60, what="every accepted message held")
    # outside the hold queue at most Postfix's notices of the full disk to the postmaster
    elsewhere = [(m["queue_name"], m["sender"], [r["address"] for r in m["recipients"]])
                 for m in stack.queue() if m["queue_name"] != "hold"]
    assert all(r.startswith("postmaster@") for _, _, rcpts in elsewhere for r in rcpts), \
        elsewhere
    assert _held_rcpts(stack) == accepted            # nothing refused got in, nothing lost
    assert stack.status("customer.test")[0]["messages"] == len(accepted)
    half = [p for sub in ("incoming", "active", "maildrop") for p in (spool / sub).rglob("*")
            if p.is_file()]
    assert half == [], half                          # no half-written queue file left
    assert bounce_lines(stack) == []
    print(f"status with the state disk full: exit {status.returncode} {status.stderr.strip()}")
    print(f"{len(accepted)} accepted in all, every one held and counted; nothing bounced")
