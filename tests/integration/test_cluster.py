"""Three backup MX hosts on one machine (each its own Postfix, milter and
gateway on its own loopback address, same ports, as real peers would be):
one trigger releases the customer's mail on all of them."""

import json
import re
import subprocess
import time

import pytest

from conftest import bounce_lines, free_port, wait_until
from instance import port_free_on
from stack import Ports

ADDRESSES = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
PER_HOST = 3


def _build_cluster(make_stack, sources=ADDRESSES, helo="mx{n}.provider.test", more=None):
    """Three hosts; each names its peers by the addresses they listen on,
    and sends its ETRNs from ``sources[n]`` with EHLO ``helo``; ``more``:
    {n: more config} for some of them."""
    smtp, finger_port = port_free_on(ADDRESSES), port_free_on(ADDRESSES)
    stacks = []
    for n, address in enumerate(ADDRESSES, 1):
        peers = [f"{a}:{smtp}" for a in ADDRESSES if a != address]
        extra = (f"[cluster]\npeers = {json.dumps(peers)}\nfinger_port = {finger_port}\n"
                 f'source = "{sources[n - 1]}"\nhelo = "{helo.format(n=n)}"\n'
                 + (more or {}).get(n, ""))
        stacks.append(make_stack(gateway=True, address=address, smtpd_port=smtp,
                                 ports=Ports(finger_port), extra=extra))
    return stacks


@pytest.fixture
def cluster(make_stack):
    return _build_cluster(make_stack)


def _hold_everywhere(stacks):
    for n, stack in enumerate(stacks, 1):
        for i in range(PER_HOST):
            stack.send([f"user{i}@customer.test"], subject=f"via mx{n} #{i}")
    for stack in stacks:
        wait_until(lambda: len(stack.queue()) == PER_HOST, what="mail held")


def _delivered_all(stacks) -> bool:
    return all(len(s.sink.messages()) == PER_HOST and not s.queue() for s in stacks)


def _events(stack, pattern: str) -> list[str]:
    return [line for line in stack.gateway_log().splitlines() if re.search(pattern, line)]



def _cluster_status(stack):
    return json.loads(stack.flushctl("status", "--cluster", "--json", "customer.test").stdout)


def test_one_finger_releases_on_every_mx_without_ping_pong(cluster):
    first, second, third = cluster
    _hold_everywhere(cluster)
    before = _cluster_status(first)
    assert [(r["host"], r["messages"]) for r in before] == \
        [("(here)", PER_HOST)] + [(f"{a}:{second.pf.smtpd_port}", PER_HOST)
                                  for a in ADDRESSES[1:]]
    for stack in cluster:
        stack.sink.start()

    out = first.finger("customer.test")
    assert "Delivery started" in out, out
    wait_until(lambda: _delivered_all(cluster), 30, 0.2, what="mail of all three delivered")
    for n, stack in enumerate(cluster, 1):
        subjects = sorted(re.search(r"^Subject: (.*)$", m, re.M).group(1)
                          for m in stack.sink.messages())
        assert subjects == [f"via mx{n} #{i}" for i in range(PER_HOST)]

    time.sleep(3)   # room for any echo to show
    # the first sent one ETRN to each peer; the peers released and sent nothing on
    assert len(_events(first, r"event=forward_acked")) == 2
    assert _events(first, r"trigger=peer") == []
    for peer in (second, third):
        triggers = _events(peer, r"event=request trigger=(?!report)")
        assert len(triggers) == 1 and f"trigger=peer client={ADDRESSES[0]}" in triggers[0], triggers
        assert _events(peer, r"event=forward_") == []
        assert peer.status("customer.test")[0]["last_flush_trigger"] == "peer"
    # the metrics (each host's poller serves them) count it under its trigger
    for stack, trigger in ((first, "finger"), (second, "peer")):
        stack.start_poller()
        wait_until(stack.metrics_up, 15, what="metrics")
        key = ("flushctl_releases_total",
               frozenset({"domain": "customer.test", "trigger": trigger}.items()))
        assert stack.scrape().get(key) == 1, trigger
    acked = {dict(labels)["peer"]: value for (name, labels), value in first.scrape().items()
             if name == "flushctl_forwards_total" and dict(labels)["result"] == "acked"}
    assert acked == {f"{a}:{second.pf.smtpd_port}": 1 for a in ADDRESSES[1:]}
    after = _cluster_status(first)
    assert [r["messages"] for r in after] == [0, 0, 0]
    assert all(r["pending"] is None and r["error"] is None for r in after)
    print(f"finger at mx1: {3 * PER_HOST} messages delivered from 3 hosts; "
          "ETRN mx1->mx2, mx1->mx3 acknowledged, none sent back")
    assert all(bounce_lines(s) == [] for s in cluster)


def test_peers_that_do_not_recognise_each_other_never_pass_a_release_back(make_stack):
    """Issue 15, item 6: each host names its peers by the addresses they
    listen on, but sends from another address, with an EHLO name nobody
    lists: no peer can tell a forwarded ETRN by where it comes from.  It
    must tell by the ETRN itself, or each would send it on around the
    cluster (as before: the first host's ETRN came back from both)."""
    cluster = _build_cluster(make_stack, sources=["127.0.0.21", "127.0.0.22", "127.0.0.23"],
                             helo="relay{n}.elsewhere.test")
    first, second, third = cluster
    _hold_everywhere(cluster)
    for stack in cluster:
        stack.sink.start()
    out = first.finger("customer.test")
    assert "Delivery started" in out, out
    wait_until(lambda: _delivered_all(cluster), 30, 0.2, what="mail of all three delivered")
    time.sleep(4)   # room for any echo to show
    assert len(_events(first, r"event=forward_acked")) == 2
    assert _events(first, r"event=request trigger=(?!finger)") == []   # nothing came back
    for peer in (second, third):
        triggers = _events(peer, r"event=request trigger=(?!report)")
        assert len(triggers) == 1 and "trigger=peer client=127.0.0.21 " in triggers[0], triggers
        assert _events(peer, r"event=forward_") == []
        assert peer.status("customer.test")[0]["last_flush_trigger"] == "peer"
    assert all(bounce_lines(s) == [] for s in cluster)


def test_a_forwarded_etrn_gets_no_more_rights_than_its_sender(make_stack):
    """The mark only says "do not send it on": it releases here, is never
    sent on, and from outside a domain's flush_from it is refused like any
    other ETRN (so a customer who writes it gains nothing)."""
    def domains(sink_port):
        return (f'[domains."customer.test"]\nrelay = "[127.0.0.1]:{sink_port}"\n'
                f'[domains."restricted.test"]\nrelay = "[127.0.0.1]:{sink_port}"\n'
                f'flush_from = ["192.0.2.0/24"]\n'
                f'[domains."third.test"]\nrelay = "[127.0.0.1]:{sink_port}"\n')
    # one peer, which never answers: what is sent on stays pending for it
    stack = make_stack(gateway=True, domains=domains,
                       extra=f'[cluster]\npeers = ["127.0.0.99:{free_port()}"]\n')
    stack.send(["alice@customer.test"])
    wait_until(lambda: stack.status("customer.test")[0]["messages"] == 1, what="held")
    stack.sink.start()
    assert _smtp_etrn(stack, "_forwarded.customer.test")[0] == 250
    wait_until(lambda: len(stack.sink.messages()) == 1, 30, what="released here")
    assert _smtp_etrn(stack, "#_forwarded.customer.test")[0] == 250
    code, text = _smtp_etrn(stack, "_forwarded.restricted.test")
    assert code == 459 and b"not served here" in text, (code, text)
    time.sleep(2)
    assert _events(stack, r"event=forward_") == []
    assert json.loads(stack.flushctl("status", "--cluster", "--json", "customer.test").stdout
                      )[1]["pending"] is None          # nothing sent on for the peer
    assert len(_events(stack, r"event=request trigger=peer client=127\.0\.0\.1 ")) == 3
    # unmarked, it is a customer's: sent on (nothing is held here, the peer may hold some)
    assert _smtp_etrn(stack, "_forwarded.third.test")[0] == 250
    assert _smtp_etrn(stack, "third.test")[0] == 250
    wait_until(lambda: json.loads(stack.flushctl("status", "--cluster", "--json",
                                                 "third.test").stdout)[1]["pending"],
               10, what="sent on for the peer")
    assert len(_events(stack, r"event=request trigger=peer client=127\.0\.0\.1 ")) == 4


def _smtp_etrn(stack, argument: str) -> tuple[int, bytes]:
    import smtplib
    with smtplib.SMTP(stack.pf.address, stack.pf.smtpd_port, timeout=30) as smtp:
        smtp.ehlo("customer-pc.example")
        return smtp.docmd("ETRN", argument)


def test_a_peer_down_gets_its_release_when_it_returns(cluster):
    first, second, third = cluster
    _hold_everywhere(cluster)
    for stack in cluster:
        stack.sink.start()
    third.stop_gateway()
    third.pf.postfix("stop")          # the whole third MX is down

    assert "Delivery started" in second.finger("customer.test")
    wait_until(lambda: _delivered_all(cluster[:2]), 30, 0.2, what="two hosts delivered")
    wait_until(lambda: len(_events(second, r"event=forward_retry .*peer=127\.0\.0\.13")) >= 2,
               15, what="the down peer retried")
    [here, to_first, to_third] = _cluster_status(second)
    assert to_third["error"] and to_third["pending"]["attempts"] >= 2, to_third
    assert to_first["pending"] is None and to_first["messages"] == 0
    assert len(third.queue()) == PER_HOST            # still held there, untouched
    problems = json.loads(second.flushctl("check", "--json", check=False).stdout)["problems"]
    assert any(p.startswith(f"cluster: peer {ADDRESSES[2]}:") and "no SMTP connection" in p
               for p in problems), problems

    third.pf.postfix("start")
    third.start_gateway()
    returned = time.monotonic()
    wait_until(lambda: _delivered_all(cluster), 70, 0.2, what="the returned host delivered")
    took = time.monotonic() - returned
    assert _events(second, r"event=forward_acked .*peer=127\.0\.0\.13")
    assert _cluster_status(second)[2]["pending"] is None
    # and the third sent nothing on: the release came from a peer
    assert _events(third, r"event=forward_") == []
    retries = len(_events(second, r"event=forward_retry .*peer=127\.0\.0\.13"))
    print(f"third MX down: released on two at once; after {retries} retries the third "
          f"released {took:.1f} s after it returned")
    assert all(bounce_lines(s) == [] for s in cluster)


@pytest.mark.parametrize("trigger", ["admin", "etrn", "portal"])
def test_every_trigger_on_one_mx_releases_on_all(make_stack, trigger):
    portal = f'[portal]\nlisten = "127.0.0.1:{free_port()}"\nadmins = ["ops"]\n' \
        'secure_cookie = false\n'
    cluster = _build_cluster(make_stack, more={2: portal} if trigger == "portal" else None)
    first, second, third = cluster
    _hold_everywhere(cluster)
    for stack in cluster:
        stack.sink.start()
    if trigger == "admin":
        out = second.flushctl("flush", "customer.test").stdout
        assert "sent on to 2 peer(s)" in out and f"released {PER_HOST}" in out, out
    elif trigger == "portal":   # "deliver now" in the portal of mx2
        from test_portal import call
        second.flushctl("user", "add", "ops", input="ops password\n")
        second.start_portal()
        status, body = call(second, "POST", "/api/v1/login",
                            {"user": "ops", "password": "ops password"})
        status, body = call(second, "POST", "/api/v1/domains/customer.test/release",
                            token=body["token"])
        assert status == 200 and body["outcome"]["forwarded"] == 2, body
    else:   # the customer's fetchmail, from outside the cluster
        proc = subprocess.run(
            ["fetchmail", "-f", "/dev/null", "-p", "ETRN", "--fetchdomains", "customer.test",
             "-P", str(second.pf.smtpd_port), second.pf.address],
            capture_output=True, text=True, timeout=120)
        assert "Queuing for customer.test started" in proc.stdout + proc.stderr, proc.stderr
    wait_until(lambda: _delivered_all(cluster), 30, 0.2, what="mail of all three delivered")
    assert [s.status("customer.test")[0]["last_flush_trigger"] for s in cluster] == \
        ["peer", trigger, "peer"]
    print(f"{trigger} on mx2: all three delivered (mx1 and mx3 by ETRN from mx2)")


def test_each_mx_has_its_own_poller_whose_releases_stay_home(cluster):
    """The poller's releases are not sent on: each host's own poller watches
    the customer with its own backoff, and never retries refused mail (a
    peer's ETRN, like a customer's, would)."""
    first, second, third = cluster
    _hold_everywhere(cluster)
    for stack in cluster:
        stack.sink.start()
    second.start_poller()       # its first cycle finds the customer's server up
    wait_until(lambda: _delivered_all([second]), 30, 0.2, what="mx2 delivered")
    time.sleep(2)
    assert _events(second, r"event=forward_") == []
    assert [len(s.queue()) for s in (first, third)] == [PER_HOST, PER_HOST]
    for stack in (first, third):
        stack.start_poller()
    wait_until(lambda: _delivered_all(cluster), 30, 0.2, what="every host delivered")
    assert [s.status("customer.test")[0]["last_flush_trigger"] for s in cluster] == \
        ["poller"] * 3
    assert all(bounce_lines(s) == [] for s in cluster)
