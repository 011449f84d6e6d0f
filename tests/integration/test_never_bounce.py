"""Held mail neither expires nor bounces, whatever maximal_queue_lifetime says."""

import subprocess
import time

from conftest import SHORT_LIFETIMES, bounce_lines, wait_until

def test_offline_customer_keeps_mail_far_past_the_lifetime(make_stack):
    stack = make_stack(extra_main=SHORT_LIFETIMES)
    for i in range(3):
        stack.send(["user@customer.test"], subject=f"keep {i}")
    wait_until(lambda: len(stack.queue()) == 3, what="3 held")

    # The customer stays offline for several lifetimes while releases are
    # tried (by the admin here; finger, ETRN and the poller use the same path).
    deadline = time.monotonic() + 16
    attempts = 0
    while time.monotonic() < deadline:
        proc = stack.flushctl("flush", "customer.test", check=False)
        assert proc.returncode == 3, proc.stdout + proc.stderr
        attempts += 1
        time.sleep(2)
    assert attempts >= 5
    queue = stack.queue()
    assert len(queue) == 3
    assert {m["queue_name"] for m in queue} == {"hold"}
    assert bounce_lines(stack) == []

    stack.sink.start()
    stack.flushctl("flush", "customer.test", "--wait", "--timeout", "60")
    wait_until(lambda: len(stack.sink.messages()) == 3, what="3 deliveries")
    assert stack.queue() == []
    assert bounce_lines(stack) == []
    [row] = stack.status("customer.test")
    assert row["messages"] == 0


def refusing_sink(stack):
    """A customer server that answers, then refuses every recipient with 4xx."""
    stack.sink.proc = subprocess.Popen(
        ["smtp-sink", "-u", "nobody", "-r", "rcpt", f"127.0.0.1:{stack.sink.port}", "16"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(stack.sink._listening, 10, what="refusing sink")


def test_old_mail_that_fails_after_a_release_goes_back_on_hold(make_stack):
    """The trap: mail older than the lifetime whose first attempt after a release fails.

    Released as it is, Postfix would return it at once; flushctl gives it a
    new lifetime clock first (new queue id) and puts it back on hold.
    """
    stack = make_stack(extra_main=SHORT_LIFETIMES)
    for i in range(2):
        stack.send(["user@customer.test"], subject=f"old {i}")
    wait_until(lambda: len(stack.queue()) == 2, what="held")
    first_ids = {m["queue_id"] for m in stack.queue()}
    time.sleep(6)  # older than maximal_queue_lifetime now

    refusing_sink(stack)
    proc = stack.flushctl("flush", "customer.test", "--wait", "--timeout", "30", check=False)
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "released 2" in proc.stdout
    queue = stack.queue()
    assert len(queue) == 2
    assert {m["queue_name"] for m in queue} == {"hold"}
    assert {m["queue_id"] for m in queue}.isdisjoint(first_ids)  # refreshed: new ids
    [row] = stack.status("customer.test")
    assert row["messages"] == 2
    assert bounce_lines(stack) == []

    time.sleep(6)  # past the lifetime again, back on hold
    assert len(stack.queue()) == 2
    assert bounce_lines(stack) == []

    stack.sink.stop()
    stack.sink.start()
    stack.flushctl("flush", "customer.test", "--wait", "--timeout", "60")
    wait_until(lambda: len(stack.sink.messages()) == 2, what="2 deliveries")
    for text in stack.sink.messages():
        assert "X-OnDemand-Domain: customer.test" in text
        assert "X-OnDemand-Hold" not in text  # no mark that holds: renewals keep only the tag
    assert stack.queue() == []
    assert bounce_lines(stack) == []
    assert stack.status("customer.test")[0]["messages"] == 0
