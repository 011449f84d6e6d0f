"""The poller's split (issue 15, item 4): what the root half believes of
the unprivileged half, and the channel between them."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from flushctl.poller import loop as poller

from flushctl.privsep import wire
from flushctl.privsep.errors import Malformed, PrivsepError
from flushctl.poller.prober import ProbeResult
from flushctl.mta.queuefiles import QueueLayout


def test_a_probe_result_is_taken_only_in_the_prober_own_words():
    ok = poller.decode_probe(["refused", "mx.customer.test[192.0.2.1]:25", "refused", 1.5e9])
    assert ok == ProbeResult("refused", "mx.customer.test[192.0.2.1]:25", "refused", 1.5e9)
    # what a customer's DNS or greeting says is cut, not a reason to stop
    long = poller.decode_probe(["bad greeting", "t" * 5000, "d" * 5000, 0])
    assert len(long.target) == len(long.detail) == poller.MAX_TEXT
    for bad in (["made up", "", "", 0],           # a new counter row per invented outcome
                ["refused", "", "", float("nan")], ["refused", "", "", float("inf")],
                ["refused", "", "", 1e308], ["refused", "", "", True], ["refused", "", ""],
                ["refused", 5, "", 0], {"outcome": "refused"}, "reachable"):
        with pytest.raises(Malformed):
            poller.decode_probe(bad)


def test_the_scrape_channel_serves_scrapes_only():
    assert poller.answer_scrape(lambda: b"# figures\n", {"op": "metrics"}) == \
        {"body": "# figures\n"}
    for bad in ({"op": "candidates"}, {"op": "metrics", "domain": "x"}, {}):
        with pytest.raises(Malformed):
            poller.answer_scrape(lambda: b"", bad)


def _talk(handle, lines, limit=wire.MAX_MESSAGE):
    ours, theirs = socket.socketpair()
    result = {}
    server = threading.Thread(target=lambda: result.setdefault(
        "served", wire.serve_channel(ours, handle, "test", limit)))
    server.start()
    replies = []
    with theirs, theirs.makefile("rb") as f:
        for line in lines:
            try:
                theirs.sendall(line + b"\n")
                answer = f.readline()
            except (BrokenPipeError, ConnectionResetError):
                answer = b""
            replies.append(json.loads(answer) if answer else None)
    server.join(10)
    return replies, result["served"]


def test_every_request_is_answered_and_an_alien_one_ends_the_channel():
    def handle(request):
        if request.get("op") == "fail":
            raise OSError("database or disk is full")
        if request.get("op") == "alien":
            raise Malformed("alien")
        return {"echo": request["op"]}
    replies, served = _talk(handle, [b'{"op": "a"}', b'{"op": "fail"}', b'{"op": "b"}'])
    assert replies == [{"echo": "a"}, {"error": "database or disk is full"}, {"echo": "b"}]
    assert served is True                      # the worker hung up
    for alien in (b'{"op": "alien"}', b"not json", b"[" * 100_000, b"[1, 2]",
                  b'{"op": "' + b"x" * 200 + b'"}'):
        replies, served = _talk(handle, [alien, b'{"op": "a"}'], limit=100)
        assert replies == [None, None] and served is False, alien


def test_a_channel_call_raises_once_the_root_half_is_gone():
    ours, theirs = socket.socketpair()
    channel = wire.Channel(theirs)
    ours.close()
    with pytest.raises(PrivsepError):
        channel.call({"op": "candidates"})
    assert channel.gone.is_set()


def test_set_aside_finds_complete_messages_left_in_incoming(tmp_path):
    (tmp_path / "incoming").mkdir()
    layout = QueueLayout(str(tmp_path), frozenset({"deferred"}), 1)
    complete = tmp_path / "incoming" / "4jfQW04Wb7zJ9WZ"
    complete.write_text("x")
    os.chmod(complete, 0o700)                 # cleanup is done with it
    written = tmp_path / "incoming" / "4jfQW04Wb7zJ9WY"
    written.write_text("x")
    os.chmod(written, 0o600)                  # cleanup still writing
    now = time.time()
    assert layout.set_aside(now) == []        # just arrived: qmgr has it in hand
    assert layout.set_aside(now + 10) == ["4jfQW04Wb7zJ9WZ"]
