"""status, pause, resume, purge and domains against a real queue."""

from conftest import wait_until


def hold_ids(stack):
    return sorted(m["queue_id"] for m in stack.queue() if m["queue_name"] == "hold")


def test_status_is_exact_after_manual_delete(stack):
    for i in range(4):
        stack.send([f"u{i}@customer.test"])
    stack.send(["alice@listed.test"])
    wait_until(lambda: len(hold_ids(stack)) == 5, what="5 held")
    rows = {r["domain"]: r for r in stack.status()}
    assert rows["customer.test"]["messages"] == 4
    assert rows["listed.test"]["messages"] == 1
    assert rows["small.test"]["messages"] == 0
    assert rows["small.test"]["oldest_arrival"] is None

    ids = [m["queue_id"] for m in stack.queue()
           if m["recipients"][0]["address"].endswith("@customer.test")]
    stack.pf.run("postsuper", "-c", str(stack.pf.config_directory), "-d", ids[0])
    [row] = stack.status("customer.test")
    assert row["messages"] == 3
    before = rows["customer.test"]["bytes"]
    assert 0 < row["bytes"] < before


def test_pause_blocks_flush_and_resume_allows_it(stack):
    stack.send(["a@customer.test"])
    wait_until(lambda: len(hold_ids(stack)) == 1, what="held")
    stack.sink.start()
    stack.flushctl("pause", "customer.test")
    proc = stack.flushctl("flush", "customer.test", check=False)
    assert proc.returncode == 4
    assert "paused" in proc.stderr
    assert len(hold_ids(stack)) == 1
    [row] = stack.status("customer.test")
    assert row["paused"] is True
    stack.flushctl("resume", "customer.test")
    stack.flushctl("flush", "customer.test", "--wait", "--timeout", "30")
    assert len(stack.sink.messages()) == 1


def test_purge_needs_yes_and_deletes_only_that_domain(stack):
    stack.send(["a@customer.test"])
    stack.send(["alice@listed.test"])
    wait_until(lambda: len(hold_ids(stack)) == 2, what="2 held")
    proc = stack.flushctl("purge", "customer.test", check=False)
    assert proc.returncode == 2
    assert len(hold_ids(stack)) == 2
    out = stack.flushctl("purge", "customer.test", "--yes").stdout
    assert "deleted 1" in out
    [msg] = stack.queue()
    assert msg["recipients"][0]["address"] == "alice@listed.test"
    assert stack.status("customer.test")[0]["messages"] == 0


def test_unknown_domain_and_bad_arguments_are_errors(stack):
    for args in (["flush", "nothere.test"], ["status", "nothere.test"],
                 ["flush", "-x"], ["flush", "--", "-rf"], ["pause", "a;b.test"]):
        proc = stack.flushctl(*args, check=False)
        assert proc.returncode != 0, args
        assert proc.stdout == ""
        assert proc.stderr.startswith(("Error:", "Usage:")), proc.stderr


def test_domains_json(stack):
    import json
    rows = json.loads(stack.flushctl("domains", "--json").stdout)
    assert [r["domain"] for r in rows] == ["customer.test", "listed.test", "small.test"]
    listed = rows[1]
    assert listed["recipients"] == ["alice@listed.test", "bob@listed.test"]


def test_commands_print_data_and_one_outcome_not_the_daemons_log(stack):
    """Issue 16, item 9: `flushctl flush` prints its outcome, not the
    library's key=value log lines (those are the daemons'), unless
    --log-level asks for them."""
    stack.send(["a@customer.test"])
    wait_until(lambda: len(hold_ids(stack)) == 1, what="held")
    stack.sink.start()
    proc = stack.flushctl("flush", "customer.test", "--wait", "--timeout", "30")
    assert "released 1" in proc.stdout, proc.stdout
    assert proc.stderr == "", proc.stderr
    stack.send(["b@customer.test"])
    wait_until(lambda: len(hold_ids(stack)) == 1, what="held again")
    proc = stack.flushctl("--log-level", "info", "flush", "customer.test", "--wait",
                          "--timeout", "30")
    assert "event=release" in proc.stderr, proc.stderr
