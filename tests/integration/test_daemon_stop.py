"""Each daemon, stopped with SIGTERM while it is busy (a client in the
middle of something), logs exactly one event=stop line, no traceback, and
exits 0 (README: each runs "until SIGTERM"; a stop asked for is not an
error, unlike a release helper gone, which the gateway and the poller
report with a non-zero exit so that their supervisor restarts them).

The daemons run as their units run them (tests/stack.py), on a private
Postfix instance, with the real clients: smtplib through Postfix's smtpd
for the milter and for ETRN, a raw finger query, a raw helper client.
"""

import json
import re
import signal
import smtplib
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import free_port, wait_until
from test_odmr import odmr_domains, odmr_section

STOP_LINE = re.compile(r"(?:^|\s)event=stop(?:\s|$)")
NOT_QUIET = ("Traceback", "traceback=", "Task was destroyed", "Exception ignored",
             "Fatal Python error", "Segmentation fault")


def stop(proc: subprocess.Popen) -> int:
    """SIGTERM; the exit status (the daemon is killed after 30 s without one)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("still running 30 s after SIGTERM") from None


def assert_stopped_quietly(log: str, status: int) -> None:
    assert status == 0, f"exit status {status}:\n{log}"
    stops = [line for line in log.splitlines() if STOP_LINE.search(line)]
    assert len(stops) == 1, log
    for text in NOT_QUIET:
        assert text not in log, log


def test_the_milter_stops_quietly_in_the_middle_of_an_smtp_session(make_stack):
    """Postfix's smtpd holds a milter connection for the whole session; the
    milter has seen this one's envelope when it is told to stop."""
    stack = make_stack()
    smtp = smtplib.SMTP(stack.pf.address, stack.pf.smtpd_port, timeout=30)
    try:
        smtp.ehlo("client.test")
        smtp.mail("someone@sender.test")
        assert smtp.rcpt("alice@customer.test")[0] == 250   # the milter's envrcpt answered
        status = stop(stack.milter)
        stack.milter = None
    finally:
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            pass
    log = stack.daemon_log("milter")
    assert "event=start " in log
    assert_stopped_quietly(log, status)


def test_the_gateway_stops_quietly_with_an_etrn_session_and_a_finger_query_open(make_stack):
    """An SMTP client that sent ETRN keeps its session (and smtpd its
    connection to the gateway's policy service, reused between ETRNs);
    a finger client has sent half its query."""
    stack = make_stack(gateway=True)
    listen = stack.cfg.finger_listen
    smtp = smtplib.SMTP(stack.pf.address, stack.pf.smtpd_port, timeout=30)
    finger = socket.create_connection((listen.host, listen.port), timeout=10)
    try:
        smtp.ehlo("client.test")
        code, reply = smtp.docmd("ETRN", "customer.test")
        assert code < 500, reply   # the gateway answered smtpd's policy request
        wait_until(lambda: any("etrn" in line and "domain=customer.test" in line
                               for line in stack.daemon_log("gateway").splitlines()), 10,
                   what="the gateway's answer to smtpd's policy request")
        finger.sendall(b"custom")
        status = stop(stack.gateway)
        stack.gateway = None
    finally:
        finger.close()
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            pass
    assert_stopped_quietly(stack.daemon_log("gateway"), status)


def test_the_helper_stops_quietly_with_an_admin_in_the_middle_of_a_request(make_stack):
    """An admin's connection (root) has said its role and half a request;
    another connection has not finished saying its role."""
    stack = make_stack()
    stack.start_helper()
    path = stack.cfg.helper_socket
    admin = socket.socket(socket.AF_UNIX)
    unsaid = socket.socket(socket.AF_UNIX)
    try:
        admin.settimeout(10)
        admin.connect(path)
        admin.sendall(b'{"role": "admin"}\n')
        with admin.makefile("rb") as answer:
            assert json.loads(answer.readline()) == {"role": "admin"}
        admin.sendall(b'{"op": "status", "dom')
        unsaid.connect(path)
        unsaid.sendall(b'{"ro')
        wait_until(lambda: "event=connect role=admin" in stack.daemon_log("helper"), 10,
                   what="the admin's connection served")
        status = stop(stack.helper)
        stack.helper = None
    finally:
        admin.close()
        unsaid.close()
    assert_stopped_quietly(stack.daemon_log("helper"), status)


def test_the_poller_stops_quietly_in_the_middle_of_a_probe(make_stack):
    """The customer's server takes the poller's connection and says
    nothing: the poller is waiting for a greeting (up to probe_timeout)
    when it is told to stop."""
    silent = socket.create_server(("127.0.0.1", 0))
    silent.settimeout(30)
    port = silent.getsockname()[1]

    def domains(_sink_port):
        return f'[domains."customer.test"]\nrelay = "[127.0.0.1]:{port}"\n'
    try:
        stack = make_stack(domains=domains, poller_extra="interval = 60")
        stack.send(["alice@customer.test"])
        wait_until(lambda: len(stack.queue()) == 1, what="held")
        stack.start_poller()
        knock, _ = silent.accept()   # the poller's probe: it waits for our greeting
        try:
            status = stop(stack.poller)
            stack.poller = None
        finally:
            knock.close()
    finally:
        silent.close()
    log = stack.daemon_log("poller")
    assert "event=unprivileged" in log   # the daemon as it runs in production
    assert_stopped_quietly(log, status)


# -- a stop asked for while a daemon starts ----------------------------------
# A supervisor may stop a daemon at any moment of its start: while it waits
# for the release helper, or the instant its port answers.  Each must then
# exit 0, not die by the signal (a failure to the supervisor; CI saw it as a
# flaky poller test).

def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def _stack(make_stack, daemon):
    if daemon == "odmr":
        return make_stack(domains=odmr_domains, extra=odmr_section(free_port()))
    return make_stack()


@pytest.mark.parametrize("daemon", ["poller", "gateway", "odmr"])
def test_stopped_while_waiting_for_the_helper(make_stack, daemon):
    """No helper yet: the daemon has bound what it binds, dropped root and
    waits for it (up to half a minute).  SIGTERM then ends it at once with
    status 0 (before: killed by the signal, -15)."""
    stack = _stack(make_stack, daemon)
    proc = stack._daemon(daemon)
    try:
        # past binding and dropping root: it runs as its unprivileged user now
        wait_until(lambda: proc.poll() is not None or _uid(proc.pid) != 0, 20,
                   what=f"{daemon} unprivileged")
        assert proc.poll() is None, stack.daemon_log(daemon)
        time.sleep(0.3)   # into the wait for the helper
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, stack.daemon_log(daemon)
        assert "Traceback" not in stack.daemon_log(daemon)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("daemon", ["poller", "gateway", "odmr", "helper"])
def test_stopped_the_moment_it_serves(make_stack, daemon):
    """Stopped as soon as it is up, three times over: status 0 each time."""
    stack = _stack(make_stack, daemon)
    for _ in range(3):
        getattr(stack, f"start_{daemon}")()
        if daemon == "poller":
            wait_until(stack.metrics_up, 15, interval=0.01, what="the metrics endpoint")
        proc = getattr(stack, daemon)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, stack.daemon_log(daemon)
        setattr(stack, daemon, None)
