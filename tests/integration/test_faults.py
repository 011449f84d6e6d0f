"""Fault injection under load: whatever happens to our processes, every
message that got 250 is held and counted, every other one got a 4xx,
none a 5xx, none bounced."""

import signal
import smtplib
import threading
import time

from conftest import bounce_lines, wait_until

SENDERS = 6
KILLS = 3


def _send_loop(stack, n: int, stop: threading.Event, outcomes: list, lock: threading.Lock):
    i = 0
    while not stop.is_set():
        i += 1
        rcpt = f"user{n}x{i}@customer.test"
        try:
            with smtplib.SMTP("127.0.0.1", stack.pf.smtpd_port, timeout=30) as smtp:
                smtp.sendmail("load@sender.test", [rcpt], f"Subject: load {n}/{i}\n\nbody\n")
            code = 250
        except smtplib.SMTPRecipientsRefused as exc:
            code = exc.recipients[rcpt][0]
        except smtplib.SMTPResponseException as exc:
            code = exc.smtp_code
        except (smtplib.SMTPServerDisconnected, ConnectionError):
            code = 0   # the server hung up: nothing was accepted
        with lock:
            outcomes.append((rcpt, code))


def test_milter_killed_under_load_loses_nothing(stack):
    outcomes: list = []
    lock = threading.Lock()
    stop = threading.Event()
    senders = [threading.Thread(target=_send_loop, args=(stack, n, stop, outcomes, lock))
               for n in range(SENDERS)]
    for t in senders:
        t.start()
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

    def held_rcpts():
        return {m["recipients"][0]["address"] for m in stack.queue()
                if m["queue_name"] == "hold"}
    wait_until(lambda: held_rcpts() >= accepted, 30, what="every accepted message held")
    assert held_rcpts() == accepted            # nothing refused got in, nothing accepted is lost
    assert stack.status("customer.test")[0]["messages"] == len(accepted)   # and counted
    assert bounce_lines(stack) == []
