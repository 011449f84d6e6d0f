"""Mail for an offline customer is held, counted, and released by `flushctl flush`."""

from conftest import wait_until


def held_ids(stack, domain=None):
    return [m["queue_id"] for m in stack.queue() if m["queue_name"] == "hold"]


def test_held_counted_released_delivered_with_tag(stack):
    for i in range(3):
        stack.send(["user@customer.test"], subject=f"held {i}")
    wait_until(lambda: len(held_ids(stack)) == 3, what="3 held messages")

    [row] = stack.status("customer.test")
    assert row["messages"] == 3
    assert row["bytes"] > 0
    assert row["oldest_arrival"] is not None
    assert row["last_flush"] is None

    # customer offline: nothing is released, the mail stays on hold
    proc = stack.flushctl("flush", "customer.test", check=False)
    assert proc.returncode == 3, proc.stderr
    assert "not reachable" in proc.stderr
    assert len(held_ids(stack)) == 3
    [row] = stack.status("customer.test")
    assert row["last_flush"] is None  # nothing was released
    assert row["reachable"] is False and "refused" in row["last_error"]

    stack.sink.start()
    proc = stack.flushctl("flush", "customer.test", "--wait", "--timeout", "60")
    assert "released 3" in proc.stdout
    wait_until(lambda: len(stack.sink.messages()) == 3, what="3 deliveries")
    for text in stack.sink.messages():
        assert "X-OnDemand-Domain: customer.test" in text
    assert stack.queue() == []
    [row] = stack.status("customer.test")
    assert row["messages"] == 0
    assert row["last_flush"] is not None
    assert row["reachable"] is True


def test_mail_that_failed_once_is_released_again_at_once(stack):
    """After a failed release the retry time lies minutes ahead; the next release ignores it."""
    import subprocess

    stack.send(["user@customer.test"])
    wait_until(lambda: len(held_ids(stack)) == 1, what="held")
    stack.sink.proc = subprocess.Popen(
        ["smtp-sink", "-u", "nobody", "-r", "rcpt", f"127.0.0.1:{stack.sink.port}", "16"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(stack.sink._listening, 10, what="refusing sink")
    proc = stack.flushctl("flush", "customer.test", "--wait", "--timeout", "30", check=False)
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert len(held_ids(stack)) == 1  # back on hold, retry time 300 s ahead

    stack.sink.stop()
    stack.sink.start()
    stack.flushctl("flush", "customer.test", "--wait", "--timeout", "20")
    assert len(stack.sink.messages()) == 1
    assert stack.queue() == []
