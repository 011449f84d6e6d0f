"""The poller releases held mail by itself once the customer's server answers."""

import json
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import SHORT_LIFETIMES, Sink, bounce_lines, free_port, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dnsserver import DNSServer  # noqa: E402

def held(stack, domain):
    return [m for m in stack.queue() if m["queue_name"] == "hold"
            and m["recipients"][0]["address"].endswith("@" + domain)]


def test_customer_back_online_gets_its_mail_within_an_interval(make_stack):
    down_port = free_port()

    def domains(sink_port):
        return f"""
[domains."customer.test"]
relay = "[127.0.0.1]:{sink_port}"

[domains."down.test"]
relay = "[127.0.0.1]:{down_port}"

[domains."idle.test"]
relay = "[127.0.0.1]:{down_port}"
"""
    stack = make_stack(extra_main=SHORT_LIFETIMES, domains=domains,
                       poller_extra="interval = 2")
    for i in range(2):
        stack.send([f"u{i}@customer.test"])
    stack.send(["x@down.test"])
    wait_until(lambda: len(stack.queue()) == 3, what="3 held")
    stack.start_poller()

    time.sleep(7)  # several intervals and lifetimes with both customers down
    assert len(held(stack, "customer.test")) == 2
    assert len(held(stack, "down.test")) == 1
    rows = {r["domain"]: r for r in stack.status()}
    assert rows["customer.test"]["reachable"] is False
    assert "refused" in rows["customer.test"]["last_error"]
    assert rows["idle.test"]["reachable"] is None  # holds nothing: never probed
    assert bounce_lines(stack) == []

    stack.sink.start()
    came_up = time.monotonic()
    wait_until(lambda: len(stack.sink.messages()) == 2, timeout=15, what="2 deliveries")
    assert time.monotonic() - came_up < 2 + 4  # one interval, plus delivery
    [row] = stack.status("customer.test")
    assert row["reachable"] is True
    assert row["last_flush_trigger"] == "poller"
    wait_until(lambda: stack.status("customer.test")[0]["messages"] == 0, timeout=10,
               what="nothing held")
    # the customer still offline keeps its mail, untouched
    time.sleep(3)
    assert len(held(stack, "down.test")) == 1
    assert bounce_lines(stack) == []
    assert stack.poller.poll() is None


@pytest.fixture
def dns_server():
    server = DNSServer().start()
    yield server
    server.stop()


def test_mx_records_lead_the_probe_and_ours_are_skipped(make_stack, dns_server):
    port = free_port()
    ours = Sink(port, host="127.0.0.2").start()  # our own MX would answer: never probe it
    try:
        dns_server.records.update({
            # the customer's server is the best MX, we are its backup
            ("mxcust.test", "MX"): [(10, "mail.mxcust.test"), (20, "mx.ours.test")],
            ("mx.ours.test", "A"): ["127.0.0.2"],
            ("mail.mxcust.test", "A"): ["127.0.0.3"],
            ("nullmx.test", "MX"): [(0, ".")],
        })

        def domains(_):
            return f"""
[domains."mxcust.test"]
relay = "mxcust.test:{port}"

[domains."nullmx.test"]

[domains."gone.test"]
"""
        stack = make_stack(domains=domains, poller_extra=(
            f'own_hosts = ["mx.ours.test"]\n'
            f'nameservers = ["{dns_server.host}:{dns_server.port}"]'))
        for domain in ("mxcust.test", "nullmx.test", "gone.test"):
            stack.send([f"someone@{domain}"])
        wait_until(lambda: len(stack.queue()) == 3, what="3 held")

        first = {e["domain"]: e for e in json.loads(
            stack.flushctl("poller", "--once", "--json").stdout)}
        assert first["mxcust.test"]["outcome"] == "refused"
        assert first["mxcust.test"]["target"] == f"mail.mxcust.test[127.0.0.3]:{port}"
        assert first["nullmx.test"]["outcome"] == "no address"
        assert "null MX" in first["nullmx.test"]["detail"]
        assert first["gone.test"]["outcome"] == "no address"
        assert "no such domain" in first["gone.test"]["detail"]
        assert {e["action"] for e in first.values()} == {"held"}
        assert len([m for m in stack.queue() if m["queue_name"] == "hold"]) == 3

        customer = Sink(port, host="127.0.0.3").start()
        try:
            second = {e["domain"]: e for e in json.loads(
                stack.flushctl("poller", "--once", "--json").stdout)}
        finally:
            customer.cleanup()
        assert second["mxcust.test"]["outcome"] == "reachable"
        assert second["mxcust.test"]["action"] == "released"
        assert second["mxcust.test"]["released"] == 1
        [row] = stack.status("mxcust.test")
        assert row["reachable"] is True and row["last_flush_trigger"] == "poller"
        rows = {r["domain"]: r for r in stack.status()}
        assert "null MX" in rows["nullmx.test"]["last_error"]
    finally:
        ours.cleanup()


# -- issue 15, item 4: the half that talks to customers runs unprivileged ---------------

def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as fh:
        return dict(line.rstrip("\n").split(":\t", 1) for line in fh if ":\t" in line)


def _unprivileged(stack):
    """The poller, once it has given up root."""
    import psutil
    log = stack.state_dir / "poller.log"
    wait_until(lambda: log.exists() and "event=unprivileged" in log.read_text(), 15,
               what="the poller unprivileged")
    return psutil.Process(stack.poller.pid)


def test_probes_and_metrics_run_unprivileged(make_stack):
    """Started as root (with the unit's capabilities), the poller probes
    customers' servers and answers scrapes as `[poller] user` (nobody here,
    the default), with no capability left; only the release helper keeps
    root, and it does the releasing and the keeper's work (postsuper is
    root's).  Releases, probes and scrapes all go through the helper."""
    import pwd

    import psutil

    stack = make_stack(poller_extra="interval = 1")
    stack.send(["u@customer.test"])
    wait_until(lambda: len(stack.queue()) == 1, what="held")
    stack.start_poller()
    poller_proc = _unprivileged(stack)
    nobody = pwd.getpwnam("nobody")
    status = _status(poller_proc.pid)
    assert status["Uid"].split() == [str(nobody.pw_uid)] * 4, status["Uid"]
    assert status["Gid"].split() == [str(nobody.pw_gid)] * 4, status["Gid"]
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0, status
    assert status["NoNewPrivs"] == "1"
    assert poller_proc.children() == []
    assert _status(stack.helper.pid)["Uid"].split()[0] == "0"
    port = stack.cfg.metrics_listen.port
    [listener] = [c for c in psutil.net_connections("tcp")
                  if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listener.pid == poller_proc.pid
    assert "event=unprivileged user=nobody" in (stack.state_dir / "poller.log").read_text()
    # a probe, a refused one recorded; then the customer answers: released
    wait_until(lambda: stack.status("customer.test")[0]["reachable"] is False, 15,
               what="a failed probe recorded")
    stack.sink.start()
    wait_until(lambda: len(stack.sink.messages()) == 1, 20, what="released by the poller")
    assert stack.status("customer.test")[0]["last_flush_trigger"] == "poller"
    helper_log = stack.daemon_log("helper")
    assert "event=connect role=poller uid=65534" in helper_log
    assert "event=connect role=scrape uid=65534" in helper_log
    # the keeper (in the helper) still takes in what the milter never saw
    stack.sink.stop()
    stack.stop_milter()
    import subprocess
    subprocess.run(["/usr/sbin/sendmail", "-C", str(stack.pf.config_directory),
                    "v@customer.test"], input="Subject: local\n\nhello\n", text=True,
                   check=True, timeout=30)
    try:
        wait_until(lambda: stack.status("customer.test")[0]["queues"] == {"hold": 1}, 30,
                   what="taken in by the keeper")
    except AssertionError as exc:   # say where it is
        raise AssertionError(f"{exc}: {stack.queue()} {stack.status('customer.test')}\n"
                             f"{stack.pf.log()[-3000:]}") from None
    scrape = stack.scrape()
    assert scrape[("flushctl_held_messages", frozenset({("domain", "customer.test")}))] == 1


def test_the_poller_ends_when_its_release_helper_does(make_stack):
    """The helper killed: the poller, idle between cycles, notices within
    seconds and ends with an error, its port free for the next start; the
    poller killed: the helper serves the next one."""
    stack = make_stack(poller_extra="interval = 60")   # no cycle to notice it by
    stack.start_poller()
    _unprivileged(stack)
    stack.stop_helper(signal.SIGKILL)
    assert stack.poller.wait(15) != 0
    assert "the release helper is gone" in (stack.state_dir / "poller.log").read_text()
    stack.start_poller()   # the helper first
    _unprivileged(stack)
    stack.poller.kill()
    stack.poller.wait(15)
    stack.start_poller()
    assert stack.helper.poll() is None
    wait_until(stack.metrics_up, 15, what="the endpoint back")
    stack.poller.terminate()
    assert stack.poller.wait(15) == 0     # a stop asked for: no error
    stack.poller = None


def test_the_release_helper_answers_only_what_the_poller_asks(make_stack):
    """A poller taken over by an attacker speaks the protocol to the real
    release helper on a real instance: a paused domain stays paused; a domain
    that is not configured, a request of another kind, a malformed probe
    result end the conversation; what it may ask is answered."""
    import json

    from flushctl.privsep import client

    stack = make_stack()
    stack.sink.start()
    stack.send(["u@customer.test"])
    stack.send(["v@small.test"])
    wait_until(lambda: len(stack.queue()) == 2, what="held")
    stack.flushctl("pause", "small.test")
    cfg = stack.cfg
    reachable = ["reachable", "[127.0.0.1]", "220 lie", time.time()]

    stack.start_helper()

    def conversation(*requests):
        """Requests on one connection to the real helper, as the poller's role."""
        replies = []
        with client.connect(cfg, "poller") as theirs, theirs.makefile("rb") as f:
            for request in requests:
                raw = request if isinstance(request, str) else json.dumps(request)
                try:
                    theirs.sendall(raw.encode() + b"\n")
                    line = f.readline()
                except (BrokenPipeError, ConnectionResetError):   # the helper hung up
                    line = b""
                replies.append(json.loads(line) if line else None)
        return replies

    # a customer's long greeting or DNS name is cut, not a reason to stop
    assert conversation({"op": "probe", "domain": "customer.test",
                         "result": ["refused", "x" * 5000, "y" * 5000, time.time()]}) == [{}]
    [candidates] = conversation({"op": "candidates"})
    assert set(candidates["candidates"]) == {"customer.test"}   # paused: not offered
    # asked anyway: paused stays paused
    [paused] = conversation({"op": "release", "domain": "small.test",
                             "results": {"small.test": reachable}})
    assert paused == {"action": "paused", "released": 0}
    for hostile in ({"op": "release", "domain": "elsewhere.test",
                     "results": {"elsewhere.test": reachable}},
                    {"op": "flush", "domain": "customer.test"},
                    {"op": "metrics"},
                    {"op": "probe", "domain": "customer.test",   # a new counter row each
                     "result": ["made up", "", "", 0]},
                    {"op": "probe", "domain": "customer.test",
                     "result": ["refused", "", "", float("nan")]},
                    "[" * 100_000,                              # deep enough to recurse
                    {"op": "release", "domain": "customer.test",
                     "results": {"customer.test\nX": reachable}}):
        # no answer, and the helper stops serving that connection
        assert conversation(hostile, {"op": "candidates"}) == [None, None], hostile
    # probes of a destination the mail does not go to: the helper probes
    # nothing itself, and releases nothing
    [elsewhere] = conversation({"op": "release", "domain": "customer.test",
                                "results": {"other.test": reachable}})
    assert elsewhere == {"action": "held", "released": 0}
    assert {m["queue_name"] for m in stack.queue()} == {"hold"}   # nothing released
    assert stack.sink.started() == 0
    # what the poller asks is served: the release goes out
    [released] = conversation({"op": "release", "domain": "customer.test",
                               "results": {"customer.test": reachable}})
    assert released == {"action": "released", "released": 1}
    wait_until(lambda: len(stack.sink.messages()) == 1, what="delivered")
