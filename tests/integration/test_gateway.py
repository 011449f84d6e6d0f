"""finger and ETRN release held mail through the gateway, with real clients."""

import os
import pwd
import re
import signal
import stat
import sys
import smtplib
import socket
import subprocess
import threading
import time

import pytest

from conftest import free_port, wait_until
from stack import daemon_command


def domains(sink_port):
    return f"""
[domains."customer.test"]
relay = "[127.0.0.1]:{sink_port}"

[domains."guarded.test"]
relay = "[127.0.0.1]:{sink_port}"
flush_from = ["192.0.2.0/24"]
"""


@pytest.fixture
def gw(make_stack):
    stack = make_stack(gateway=True, gateway_extra="release_window = 0.5")
    stack.cfg  # noqa: B018 - config must load
    return stack


def finger_addr(stack):
    listen = stack.cfg.finger_listen
    return listen.host, listen.port


def run_finger(stack, query, *options):
    return stack.finger(query, *options)


def hold(stack, n, domain="customer.test"):
    before = len(stack.queue())
    for i in range(n):
        stack.send([f"user{i}@{domain}"])
    wait_until(lambda: len(stack.queue()) == before + n, what=f"{n} held")


def raw_finger(stack, payload: bytes, timeout=10) -> bytes:
    with socket.create_connection(finger_addr(stack), timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return data


def test_finger_releases_and_reports(gw):
    hold(gw, 2)
    gw.sink.start()
    out = run_finger(gw, "customer.test")
    assert "customer.test: 2 message(s)" in out, out
    assert "Delivery started" in out, out
    wait_until(lambda: len(gw.sink.messages()) == 2, what="2 deliveries")
    [row] = gw.status("customer.test")
    assert row["last_flush_trigger"] == "finger"
    assert row["last_flush_client"].startswith("127.")
    assert "trigger=finger" in gw.gateway_log() and "result=released" in gw.gateway_log()


def test_finger_verbose_and_unreachable(gw):
    hold(gw, 1)
    out = run_finger(gw, "customer.test", "-l")  # the Debian client sends /W for -l
    assert "customer.test: 1 message(s)" in out, out
    assert "does not answer" in out, out
    assert len(gw.queue()) == 1 and gw.queue()[0]["queue_name"] == "hold"


def test_finger_never_lists_customers(gw):
    assert "not served here" in run_finger(gw, "nothere.test")
    empty = run_finger(gw, "")
    assert "SMTP-on-demand" in empty and "customer.test" not in empty
    forward = raw_finger(gw, b"someone@elsewhere.test\r\n").decode()
    assert "forwarding service denied" in forward


def test_unauthorised_client_is_refused_on_both_paths(make_stack):
    stack = make_stack(gateway=True, domains=domains)
    hold(stack, 1, "guarded.test")
    stack.sink.start()
    out = run_finger(stack, "guarded.test")
    assert "guarded.test: not served here." in out, out
    assert "1 message" not in out
    with smtplib.SMTP("127.0.0.1", stack.pf.smtpd_port, timeout=60) as smtp:
        smtp.ehlo("client.test")
        code, msg = smtp.docmd("ETRN", "guarded.test")
    assert code == 459, (code, msg)
    time.sleep(1)
    assert stack.sink.started() == 0
    assert stack.queue()[0]["queue_name"] == "hold"
    # the same answer as for a domain we do not serve: nothing leaks
    assert run_finger(stack, "nothere.test").replace("nothere", "guarded") == out


@pytest.mark.parametrize("form", ["customer.test", "#customer.test", "@customer.test"])
def test_etrn_forms_release(gw, form):
    hold(gw, 1)
    gw.sink.start()
    with smtplib.SMTP("127.0.0.1", gw.pf.smtpd_port, timeout=60) as smtp:
        smtp.ehlo("client.test")
        code, msg = smtp.docmd("ETRN", form)
    assert code == 250, (code, msg)
    wait_until(lambda: len(gw.sink.messages()) == 1, what="delivery after ETRN")
    assert gw.status("customer.test")[0]["last_flush_trigger"] == "etrn"


def test_etrn_with_customer_offline_says_so(gw):
    hold(gw, 1)
    with smtplib.SMTP("127.0.0.1", gw.pf.smtpd_port, timeout=60) as smtp:
        smtp.ehlo("client.test")
        code, msg = smtp.docmd("ETRN", "customer.test")
    assert code == 458, (code, msg)
    assert gw.queue()[0]["queue_name"] == "hold"


def test_fetchmail_etrn(gw):
    hold(gw, 2)
    gw.sink.start()
    proc = subprocess.run(
        ["fetchmail", "-f", "/dev/null", "-p", "ETRN", "--fetchdomains", "customer.test",
         "-P", str(gw.pf.smtpd_port), "127.0.0.1"],
        capture_output=True, text=True, timeout=120)
    assert "Queuing for customer.test started" in proc.stdout + proc.stderr, proc.stderr
    wait_until(lambda: len(gw.sink.messages()) == 2, what="2 deliveries after fetchmail")
    assert "trigger=etrn" in gw.gateway_log()
    assert gw.status("customer.test")[0]["last_flush_trigger"] == "etrn"


def test_many_triggers_one_release(make_stack):
    stack = make_stack(gateway=True, gateway_extra="release_window = 30")
    hold(stack, 3)
    stack.sink.start()
    results = []

    def one():
        results.append(raw_finger(stack, b"customer.test\r\n", timeout=60).decode())

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert len(results) == 12
    assert all("Delivery started" in r for r in results), results
    log = stack.gateway_log()
    assert len(re.findall(r"result=released_3", log)) == 1, log
    wait_until(lambda: len(stack.sink.messages()) == 3, what="3 deliveries")


def test_rate_limit_stops_a_flood_but_not_ordinary_use(make_stack):
    stack = make_stack(gateway=True, gateway_extra="rate_burst = 12\nrate_per_minute = 12")
    answers = [raw_finger(stack, b"customer.test\r\n").decode() for _ in range(12)]
    assert not any("Too many" in a for a in answers)
    flood = [raw_finger(stack, b"customer.test\r\n").decode() for _ in range(5)]
    assert any("Too many requests" in a for a in flood)


def test_hostile_input_gets_nowhere(gw):
    hold(gw, 1)
    # 100 KB line, binary, no newline, forwarding
    assert b"Invalid query" in raw_finger(gw, b"a" * 100_000 + b"\r\n")
    assert b"Invalid query" in raw_finger(gw, bytes(range(256)) + b"\r\n")
    assert b"Invalid query" in raw_finger(gw, b"\x00customer.test\r\n")
    assert b"customer.test" in raw_finger(gw, b"customer.test")  # no newline, then EOF
    assert b"forwarding" in raw_finger(gw, b"a@b@c\r\n")
    # 200 idle connections do not keep another client waiting
    idle = []
    try:
        for _ in range(200):
            idle.append(socket.create_connection(finger_addr(gw), 5))
        start = time.monotonic()
        answer = raw_finger(gw, b"\r\n", timeout=5)
        assert b"SMTP-on-demand" in answer
        assert time.monotonic() - start < 3
    finally:
        for sock in idle:
            sock.close()
    # policy socket: garbage closes that connection only
    path = gw.cfg.policy_listen.path
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(b"\xff\xfe garbage\n\n")
        assert sock.recv(100) == b""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(b"request=smtpd_access_policy\nprotocol_state=RCPT\n\n")
        assert sock.recv(100) == b"action=DUNNO\n\n"
    assert gw.gateway.poll() is None  # still serving
    assert gw.queue()[0]["queue_name"] == "hold"


def test_new_mail_is_released_by_the_next_trigger_inside_the_window(make_stack):
    stack = make_stack(gateway=True, gateway_extra="release_window = 60")
    stack.sink.start()
    assert "no mail held" in run_finger(stack, "customer.test")
    hold(stack, 1)
    out = run_finger(stack, "customer.test")
    assert "Delivery started" in out, out
    wait_until(lambda: len(stack.sink.messages()) == 1, what="first delivery")
    hold(stack, 1)
    out = run_finger(stack, "customer.test")
    assert "customer.test: 1 message(s)" in out and "Delivery started" in out, out
    wait_until(lambda: len(stack.sink.messages()) == 2, what="second delivery")


# -- privilege separation ------------------------------------------------------

def _listeners(port):
    """The processes that hold the TCP socket listening on ``port``."""
    import psutil
    return {proc.pid for proc in psutil.process_iter()
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                   for c in _connections(proc, "tcp"))}


def _unix_listeners(path):
    import psutil
    return {proc.pid for proc in psutil.process_iter()
            if any(c.laddr == path for c in _connections(proc, "unix"))}


def _connections(proc, kind):
    import psutil
    try:
        return proc.net_connections(kind)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


ATTACK = """
import socket, sys
kind, target = sys.argv[1], sys.argv[2]
try:
    if kind == "unix":
        s = socket.socket(socket.AF_UNIX)
        s.connect(target)
    else:
        host, port = target.rsplit(":", 1)
        s = socket.create_connection((host, int(port)), 5)
    s.settimeout(10)
    s.sendall(b"request=smtpd_access_policy\\nprotocol_state=ETRN\\n"
              b"etrn_domain=customer.test\\nclient_address=192.0.2.7\\n\\n")
    print(s.recv(100).decode() or "no answer")
except OSError as exc:
    print(type(exc).__name__)
"""


def _as_nobody(gw):
    """A local user's attempt to release customer.test through the ETRN
    policy service, claiming an address in its flush_from."""
    where = gw.cfg.policy_listen
    kind = getattr(where, "kind", "inet")
    target = where.path if kind == "unix" else f"{where.host}:{where.port}"
    proc = subprocess.run(["setpriv", "--reuid", "nobody", "--regid", "nogroup",
                           "--clear-groups", sys.executable, "-c", ATTACK, kind, target],
                          capture_output=True, text=True, timeout=30)
    return proc.stdout.strip() or proc.stderr


def test_policy_service_is_for_postfix_only(make_stack):
    """The ETRN policy service believes the client_address it is sent, so only
    Postfix may reach it: a local user can neither connect nor, with the
    way opened, get an answer; Postfix's smtpd still asks it."""
    import os
    import stat

    def domains(port):
        return (f'[domains."customer.test"]\nrelay = "[127.0.0.1]:{port}"\n'
                'flush_from = ["192.0.2.0/24"]\n')
    gw = make_stack(gateway=True, domains=domains)
    gw.sink.start()
    hold(gw, 1)
    answer = _as_nobody(gw)
    assert "action=OK" not in answer and answer == "PermissionError", answer
    assert gw.queue()[0]["queue_name"] == "hold"        # nothing released
    # what makes it so: a socket in Postfix's private/ directory, postfix's, 0660
    path = gw.cfg.policy_listen.path
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_uid == __import__("pwd").getpwnam("postfix").pw_uid
    assert "check_policy_service unix:private/flushctl-policy, reject" in \
        gw.pf.postconf("-h", "smtpd_etrn_restrictions")
    # even with the way opened, a process that is not Postfix gets no answer
    os.chmod(os.path.dirname(path), 0o711)
    os.chmod(path, 0o666)
    try:
        answer = _as_nobody(gw)
    finally:
        os.chmod(path, 0o660)
        os.chmod(os.path.dirname(path), 0o700)
    # the gateway hangs up at once: the attacker sees that as it reads, or
    # already as it writes the rest of its request
    assert answer in ("no answer", "ConnectionResetError", "BrokenPipeError"), answer
    assert "reason=not_postfix" in gw.gateway_log()
    assert gw.queue()[0]["queue_name"] == "hold"
    # Postfix's smtpd asks it: an ETRN from outside flush_from is refused, the
    # service answers
    with smtplib.SMTP("127.0.0.1", gw.pf.smtpd_port, timeout=30) as smtp:
        smtp.ehlo("customer.test")
        assert smtp.docmd("ETRN", "customer.test")[0] == 459


def test_network_side_runs_unprivileged(gw):
    """Issue 15, item 4: the gateway is `nobody` for good, no capability
    left, started as its unit starts it (User=, no capability: here root
    with only what it takes to become that user at once). It binds nothing
    itself: the release helper (root) binds port 79's socket and the policy
    socket in Postfix's private/ and hands them over; only the gateway
    reads from them. The helper releases what it asks for."""
    import psutil
    proc = psutil.Process(gw.gateway.pid)
    assert proc.username() == "nobody"
    assert set(proc.uids()) == {65534} and set(proc.gids()) == {65534}, proc.uids()
    status = _proc_status(gw.gateway.pid)
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0, status
    assert proc.children() == []
    assert psutil.Process(gw.helper.pid).uids().effective == 0
    assert _listeners(gw.cfg.finger_listen.port) == {gw.helper.pid, gw.gateway.pid}
    assert _unix_listeners(gw.cfg.policy_listen.path) == {gw.helper.pid, gw.gateway.pid}
    st = os.stat(gw.cfg.policy_listen.path)
    assert pwd.getpwuid(st.st_uid).pw_name == "postfix" and stat.S_IMODE(st.st_mode) == 0o660
    assert "user=nobody" in gw.gateway_log()
    assert "event=listen for=gateway" in gw.daemon_log("helper")
    # releases still work, through the helper
    hold(gw, 1)
    gw.sink.start()
    assert "Delivery started" in run_finger(gw, "customer.test")
    wait_until(lambda: len(gw.sink.messages()) == 1, what="delivery")
    assert "event=connect role=gateway uid=65534" in gw.daemon_log("helper")


def test_a_restarted_gateway_answers_what_came_in_meanwhile(gw):
    """The listeners stay open in the helper while the gateway is down
    (restarted, upgraded, crashed): a finger query that arrives then waits
    in the backlog and is answered by the next gateway, not refused."""
    hold(gw, 1)
    gw.stop_gateway()
    with socket.create_connection(finger_addr(gw), timeout=30) as sock:
        sock.sendall(b"customer.test\r\n")
        gw.start_gateway()
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert b"customer.test: 1 message(s)" in answer, answer


def test_the_gateway_says_why_it_has_no_listeners(make_stack):
    """The helper cannot bind (the port is taken): the gateway exits with
    the reason, and the helper binds again for the next gateway once the
    port is free. A gateway whose config names other listeners than the
    helper's is refused at start with what to do."""
    stack = make_stack(gateway=False)
    cfg = stack.cfg
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind((cfg.finger_listen.host, cfg.finger_listen.port))
    squatter.listen(1)
    stack.start_helper()
    env = dict(os.environ, FLUSHCTL_CONFIG=str(stack.config_path))
    failed = subprocess.run(daemon_command("gateway"), env=env, capture_output=True,
                            text=True, timeout=60)
    assert failed.returncode == 1
    assert "cannot listen for the gateway" in failed.stderr and "in use" in failed.stderr, \
        failed.stderr
    squatter.close()
    stack.start_gateway()
    stack.sink.start()
    hold(stack, 1)
    assert "Delivery started" in run_finger(stack, "customer.test")
    # another config: another finger port than the helper's
    other = stack.state_dir / "other.toml"
    other.write_text(stack.config_path.read_text().replace(
        f":{cfg.finger_listen.port}\"", f":{free_port()}\""))
    env["FLUSHCTL_CONFIG"] = str(other)
    refused = subprocess.run(daemon_command("gateway"), env=env, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 1 and "restart the helper" in refused.stderr, refused.stderr
    assert stack.gateway.poll() is None


def _proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as fh:
        return dict(line.rstrip("\n").split(":\t", 1) for line in fh if ":\t" in line)


def test_the_gateway_ends_when_its_release_helper_does(gw):
    """The helper killed: nobody can release, so the gateway ends by itself
    with an error (the supervisor restarts both); the gateway killed: the
    helper serves the next one."""
    gw.stop_helper(signal.SIGKILL)
    assert gw.gateway.wait(15) != 0
    assert "the release helper is gone" in gw.daemon_log("gateway")
    gw.start_gateway()          # starts the helper first
    gw.gateway.kill()
    gw.gateway.wait(15)
    gw.start_gateway()
    assert gw.helper.poll() is None
    hold(gw, 1)
    gw.sink.start()
    assert "Delivery started" in run_finger(gw, "customer.test")
    gw.gateway.terminate()
    assert gw.gateway.wait(15) == 0     # a stop asked for: no error
    gw.gateway = None


def test_gateway_user_must_exist(make_stack):
    stack = make_stack(gateway=False, gateway_extra='user = "no-such-user-here"')
    proc = stack.flushctl("gateway", check=False, timeout=30)
    assert proc.returncode == 1
    assert "user 'no-such-user-here' does not exist" in proc.stderr


def test_the_release_helper_decides_again_whatever_the_gateway_asks(make_stack):
    """A gateway taken over by an attacker speaks the protocol to the real
    release helper (on a real instance): it
    cannot release a domain for a client outside its flush_from, nor claim
    a peer's rights, nor flood it; every request is answered."""
    import asyncio
    import json

    from flushctl.privsep import client

    def domains(port):
        return (f'[domains."customer.test"]\nrelay = "[127.0.0.1]:{port}"\n'
                'flush_from = ["192.0.2.0/24"]\n')
    stack = make_stack(domains=domains, gateway_extra="rate_burst = 5")
    stack.sink.start()
    stack.send(["u@customer.test"])
    wait_until(lambda: len(stack.queue()) == 1, what="held")
    cfg = stack.cfg
    stack.start_helper()
    child_end = client.connect(cfg, "gateway")

    async def hostile():
        reader, writer = await asyncio.open_unix_connection(sock=child_end)
        asks = [{"id": 1, "domain": "customer.test", "trigger": "finger", "client": "203.0.113.9"},
                {"id": 2, "domain": "customer.test", "trigger": "peer", "client": "203.0.113.9"}] \
            + [{"id": i, "domain": "customer.test", "trigger": "report", "client": "203.0.113.9"}
               for i in range(3, 13)]
        for ask in asks:
            writer.write(json.dumps(ask).encode() + b"\n")
        await writer.drain()
        answers = {}
        while len(answers) < len(asks):
            reply = json.loads(await asyncio.wait_for(reader.readline(), 30))
            answers[reply["id"]] = reply["outcome"]
        writer.close()
        return answers
    answers = asyncio.run(hostile())
    assert len(answers) == 12
    assert answers[1]["kind"] == answers[2]["kind"] == "failed"
    assert "not allowed" in answers[1]["detail"] and "not allowed" in answers[2]["detail"]
    # the 5-request burst was spent on the refusals and reports; the rest: rate limited
    assert sum("rate limited" in a["detail"] for a in answers.values()) >= 5

    # a new connection does not bring a new burst: the helper's gate is one;
    # a domain the helper does not serve (a gateway with a newer config) is
    # refused and answered, and the conversation goes on
    again = client.connect(cfg, "gateway")

    async def more():
        reader, writer = await asyncio.open_unix_connection(sock=again)
        answers = {}
        for rid, domain in ((1, "customer.test"), (2, "added.test"), (3, "customer.test")):
            writer.write(json.dumps({"id": rid, "domain": domain, "trigger": "finger",
                                     "client": "203.0.113.9"}).encode() + b"\n")
            await writer.drain()
            reply = json.loads(await asyncio.wait_for(reader.readline(), 30))
            answers[reply["id"]] = reply["outcome"]
        writer.close()
        return answers
    answers = asyncio.run(more())
    assert "rate limited" in answers[1]["detail"] and "rate limited" in answers[3]["detail"]
    assert answers[2]["kind"] == "failed" and "refused" in answers[2]["detail"]
    assert stack.queue()[0]["queue_name"] == "hold"      # nothing was released
    assert stack.sink.started() == 0


def test_a_domain_the_helper_does_not_know_yet_leaves_the_gateway_up(make_stack):
    """One config edited and only the gateway restarted: a finger for the
    new domain is answered (not released: the helper does not serve it
    yet), and the gateway stays up for everyone else."""
    stack = make_stack()
    stack.start_helper()
    with open(stack.config_path, "a") as fh:
        fh.write(f'\n[domains."added.test"]\nrelay = "[127.0.0.1]:{stack.sink.port}"\n')
    stack.start_gateway()
    out = stack.finger("added.test")
    assert "added.test" in out and "Delivery started" not in out, out
    time.sleep(1)
    assert stack.gateway.poll() is None, stack.gateway_log()
    hold(stack, 1)
    stack.sink.start()
    assert "Delivery started" in run_finger(stack, "customer.test")


def test_sigterm_with_a_policy_connection_open_stops_quietly(gw):
    """Issue 16, item 9: the gateway stopped while Postfix holds a policy
    connection open (as it does between ETRNs) logs one event=stop line,
    no traceback, and exits 0."""
    with socket.socket(socket.AF_UNIX) as policy, \
            socket.create_connection(finger_addr(gw), timeout=10) as finger:
        policy.connect(gw.cfg.policy_listen.path)
        policy.sendall(b"request=smtpd_access_policy\nprotocol_state=ETRN\n")  # half a request
        finger.sendall(b"custom")                                            # half a query
        time.sleep(0.5)
        before = gw.gateway_log().count("event=stop")
        gw.gateway.terminate()
        assert gw.gateway.wait(15) == 0
    gw.gateway = None
    log = gw.daemon_log("gateway")
    assert log.count("event=stop") == before + 1, log
    assert "traceback" not in log.lower() and "Task was destroyed" not in log, log
