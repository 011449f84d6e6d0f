"""ODMR (RFC 2645) against a real Postfix, with fetchmail as the customer's client.

The customer's MTA (smtp-sink, or a small aiosmtpd server where a test
needs per-recipient answers) listens on a port this host's Postfix is
never told about: the ODMR domains have no relay, so the only way their
mail reaches it is over the customer's own connection, turned around.
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import tempfile
import threading
import time

import pytest

from conftest import bounce_lines, free_port, wait_until
from instance import port_free_on
from netns import in_netns

PASSWORD = "s3cret-Pass"
TAG = "X-OnDemand-Domain: odmr.test"


def odmr_domains(sink_port: int) -> str:
    return """
[domains."odmr.test"]
odmr = true
users = ["cust1"]

[domains."second.test"]
odmr = true
users = ["cust1"]

[domains."other.test"]
odmr = true
users = ["cust2"]

[domains."customer.test"]
relay = "[127.0.0.1]:%d"
users = ["cust1"]
""" % sink_port


def relay_port() -> int:
    """A privileged port free on the loopback addresses of our test domains."""
    from flushctl.mta.routing import odmr_address
    addresses = [odmr_address(d) for d in ("odmr.test", "second.test", "other.test")]
    return port_free_on(addresses, range(900, 1000))


def odmr_section(port: int, extra: str = "") -> str:
    return f"""
[odmr]
listen = "127.0.0.1:{port}"
user = "nobody"
relay_port = {relay_port()}
auth_delay = 0.2
{extra}
"""


@pytest.fixture
def odmr_stack(make_stack):
    return start(make_stack)


def start(make_stack, odmr_extra: str = "", extra_main=None):
    port = free_port()
    stack = make_stack(domains=odmr_domains, extra=odmr_section(port, odmr_extra),
                       extra_main=extra_main)
    stack.odmr_port = port
    for user in ("cust1", "cust2"):
        stack.flushctl("user", "add", user, input=PASSWORD + "\n")
    stack.start_odmr()
    return stack


def fetchmail(stack, port: int, user="cust1", password=PASSWORD, domains="odmr.test",
              timeout=120, background=False):
    """fetchmail -p ODMR as a customer runs it: the password in its rc file,
    its MTA at 127.0.0.1:``port``."""
    home = tempfile.mkdtemp(prefix="fetchmail-", dir=stack.pf.root)   # goes with it
    rc = f'poll 127.0.0.1 user "{user}" password "{password}"\n'
    argv = ["fetchmail", "-f", "-", "--nosyslog", "-v", "-p", "ODMR",
            "--pidfile", os.path.join(home, "pid"),
            "-P", str(stack.odmr_port), "--smtphost", f"127.0.0.1/{port}"]
    if domains:
        argv += ["--fetchdomains", domains]
    env = dict(os.environ, HOME=home, FETCHMAILHOME=home)
    if background:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        proc.stdin.write(rc)
        proc.stdin.close()
        return proc
    return subprocess.run(argv, input=rc, capture_output=True, text=True, timeout=timeout,
                          env=env)


def logs(stack) -> str:
    return "\n".join(line for name in ("odmr", "helper")
                     for line in stack.daemon_log(name).splitlines()[-15:])


def held(stack, domain):
    return [m for m in stack.pf.queue() if m["queue_name"] == "hold"
            and any(r["address"].endswith("@" + domain) for r in m["recipients"])]


def queued(stack, domain):
    return [m for m in stack.pf.queue()
            if any(r["address"].endswith("@" + domain) for r in m["recipients"])]


def subjects(texts) -> list[str]:
    """The subjects of whole messages (with our tag)."""
    return [line.split(": ", 1)[1] for t in texts if TAG in t
            for line in t.splitlines() if line.startswith("Subject: ")]


def domain_status(stack, domain) -> dict:
    return stack.status(domain)[0]


def sessions(stack) -> list[str]:
    return [line for line in stack.daemon_log("odmr").splitlines() if "event=session " in line]


def hold(stack, count, domain="odmr.test", prefix="user"):
    for i in range(count):
        stack.send([f"{prefix}{i}@{domain}"], subject=f"odmr {prefix}{i}")
    wait_until(lambda: len(held(stack, domain)) >= count, 20, what=f"{count} held")


# -- the whole path ------------------------------------------------------------------

def test_fetchmail_takes_all_held_mail(odmr_stack):
    stack = odmr_stack
    hold(stack, 3)
    hold(stack, 1, "second.test")
    stack.send(["x@other.test"], subject="not cust1's")
    stack.sink.start()
    proc = fetchmail(stack, stack.sink.port, domains="odmr.test,second.test")
    assert proc.returncode == 0, proc.stdout + logs(stack)
    wait_until(lambda: len(stack.sink.messages()) == 4, 30, what="delivered")
    texts = stack.sink.messages()
    assert sum(TAG in t for t in texts) == 3
    assert not queued(stack, "odmr.test") and not queued(stack, "second.test")
    assert len(held(stack, "other.test")) == 1     # another customer's: untouched
    wait_until(lambda: sessions(stack), 10, what="session logged")
    line = sessions(stack)[-1]
    assert "user=cust1" in line and "result=delivered" in line and "delivered=4" in line
    assert domain_status(stack, "odmr.test")["last_flush_trigger"] == "odmr"
    time.sleep(2)
    assert len(stack.sink.messages()) == 4          # once each
    stack.start_poller()                            # it serves the metrics
    wait_until(stack.metrics_up, 20, what="metrics")
    scraped = stack.scrape()
    assert scraped[("flushctl_odmr_sessions_total", frozenset({("result", "delivered")}))] == 1
    assert scraped[("flushctl_odmr_delivered_messages_total", frozenset())] == 4
    assert scraped[("flushctl_releases_total",
                    frozenset({("domain", "odmr.test"), ("trigger", "odmr")}))] == 1


def test_without_domains_atrn_takes_all_of_the_logins(odmr_stack):
    stack = odmr_stack
    hold(stack, 1)
    hold(stack, 1, "second.test")
    stack.sink.start()
    # fetchmail sends ATRN with its own host name unless told: the customer's
    # client may also send ATRN alone, which RFC 2645 says means all its domains
    client = RawClient(stack.odmr_port)
    client.login_cram("cust1", PASSWORD)
    assert client.command("ATRN").startswith("250")
    client.turn_around(stack.sink.port)
    wait_until(lambda: len(stack.sink.messages()) == 2, 30, what="delivered")


# -- refusals ----------------------------------------------------------------------

def test_wrong_password_is_refused_and_mail_stays(odmr_stack):
    stack = odmr_stack
    hold(stack, 1)
    stack.sink.start()
    proc = fetchmail(stack, stack.sink.port, password="wrong")
    assert proc.returncode == 128, proc.stdout   # fetchmail's code for a failed login
    assert "535" in proc.stdout
    assert len(held(stack, "odmr.test")) == 1 and stack.sink.started() == 0


def test_another_customers_domain_is_refused_with_450_revealing_nothing(odmr_stack):
    stack = odmr_stack
    hold(stack, 1)
    hold(stack, 1, "other.test")
    stack.sink.start()
    # one of the two is not cust1's: all are refused, the same words as for
    # a domain that holds nothing or does not exist
    proc = fetchmail(stack, stack.sink.port, domains="odmr.test,other.test")
    assert proc.returncode == 4, proc.stdout
    replies = [line for line in proc.stdout.splitlines() if "ODMR< 450" in line]
    assert replies
    unknown = fetchmail(stack, stack.sink.port, domains="nosuch.test")
    assert unknown.returncode == 4
    assert [line for line in unknown.stdout.splitlines() if "ODMR< 450" in line] == replies
    # a domain of cust1's that is not delivered over ODMR: the same
    not_odmr = fetchmail(stack, stack.sink.port, domains="customer.test")
    assert not_odmr.returncode == 4
    time.sleep(1)
    assert stack.sink.started() == 0
    assert len(held(stack, "odmr.test")) == 1 and len(held(stack, "other.test")) == 1


def test_no_mail_is_453(odmr_stack):
    stack = odmr_stack
    stack.sink.start()
    proc = fetchmail(stack, stack.sink.port)
    assert proc.returncode == 0, proc.stdout     # fetchmail takes 453 for "nothing to do"
    assert "ODMR< 453" in proc.stdout


def test_out_of_order_and_unauthenticated_commands(odmr_stack):
    client = RawClient(odmr_stack.odmr_port)
    assert client.command("ATRN odmr.test").startswith("530")
    assert client.command("MAIL FROM:<a@b.test>").startswith("502")
    assert client.command("AUTH PLAIN AGN1c3QxAHMzY3JldC1QYXNz").startswith("538")  # not over TLS
    client.login_cram("cust1", PASSWORD)
    assert client.command("AUTH CRAM-MD5").startswith("503")


def test_failed_logins_end_with_421(odmr_stack):
    client = RawClient(odmr_stack.odmr_port)
    replies = [client.cram("cust1", "wrong") for _ in range(3)]
    assert replies[0].startswith("535") and replies[1].startswith("535")
    assert replies[2].startswith("421")
    # the address is locked out for a while, even with the right password
    again = RawClient(odmr_stack.odmr_port)
    assert again.command("AUTH CRAM-MD5").startswith("421")


def test_flush_finger_and_poller_leave_odmr_mail_held(odmr_stack):
    stack = odmr_stack
    hold(stack, 1)
    stack.sink.start()
    out = stack.flushctl("flush", "odmr.test", check=False)
    assert "ODMR only" in out.stdout + out.stderr
    assert len(held(stack, "odmr.test")) == 1


# -- what goes wrong on the customer's side ------------------------------------------

def test_session_killed_mid_data_keeps_the_rest_for_next_time(odmr_stack):
    stack = odmr_stack
    hold(stack, 3)
    stack.sink.start(options=("-w", "30"))      # every DATA waits: we kill meanwhile
    proc = fetchmail(stack, stack.sink.port, background=True)
    wait_until(lambda: "result=" not in "".join(sessions(stack))
               and len(held(stack, "odmr.test")) < 3, 30, what="release under way")
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    wait_until(lambda: sessions(stack), 30, what="session over")
    assert "result=lost" in sessions(stack)[-1]
    # nothing bounced, nothing lost: all of it back on hold
    wait_until(lambda: len(held(stack, "odmr.test")) == 3, 90, what="held again")
    assert not bounce_lines(stack)
    stack.sink.restart()
    proc = fetchmail(stack, stack.sink.port)
    assert proc.returncode == 0, proc.stdout
    # (smtp-sink leaves a file of the envelope of the transaction cut short)
    wait_until(lambda: sorted(subjects(stack.sink.messages())) ==
               ["odmr user0", "odmr user1", "odmr user2"], 60, what="delivered next time")
    assert not queued(stack, "odmr.test")


def test_customer_tempfails_some_recipients(odmr_stack):
    stack = odmr_stack
    hold(stack, 2, prefix="ok")
    hold(stack, 2, prefix="later")
    mta = CustomerMTA(refuse=lambda rcpt: rcpt.startswith("later"))
    try:
        proc = fetchmail(stack, mta.port)
        assert proc.returncode == 0, proc.stdout + logs(stack)
        wait_until(lambda: len(mta.messages) == 2, 30, what="two delivered")
        # the tempfailed ones are held again, not bounced, and go next time
        wait_until(lambda: len(held(stack, "odmr.test")) == 2, 90, what="held again")
        assert not bounce_lines(stack)
        mta.refuse = lambda rcpt: False
        proc = fetchmail(stack, mta.port)
        wait_until(lambda: len(mta.messages) == 4, 30, what="the rest delivered")
    finally:
        mta.stop()


def test_customer_refuses_with_5xx_keeps_mail_held_marked_refused(odmr_stack):
    stack = odmr_stack
    hold(stack, 1)
    stack.sink.start(refuse="hard")
    proc = fetchmail(stack, stack.sink.port)
    assert proc.returncode == 0, proc.stdout
    wait_until(lambda: domain_status(stack, "odmr.test")["refused"] == 1, 90, what="marked refused")
    assert len(held(stack, "odmr.test")) == 1 and not bounce_lines(stack)


def test_one_session_per_domain(odmr_stack):
    stack = odmr_stack
    hold(stack, 2)
    stack.sink.start(options=("-w", "10"))
    first = fetchmail(stack, stack.sink.port, background=True)
    try:
        wait_until(lambda: len(held(stack, "odmr.test")) < 2, 30, what="first session")
        second = fetchmail(stack, stack.sink.port)
        assert "ODMR< 451" in second.stdout, second.stdout
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)


# -- attacks on the turned-around session ----------------------------------------------

def transport_of(stack, domain) -> tuple[str, int]:
    out = stack.pf.run("postmap", "-q", domain,
                       f"hash:{stack.pf.config_directory}/flushctl/transport").stdout.strip()
    assert out.startswith("odmr:["), out
    host, port = out[len("odmr:["):].split("]:")
    return host, int(port)


def test_a_local_user_cannot_talk_through_a_session(odmr_stack):
    """The domain's relay is on loopback, where any local user can connect,
    even from the address Postfix connects from: only Postfix's delivery
    agents (mail_owner) get the customer."""
    stack = odmr_stack
    hold(stack, 2)
    stack.sink.start(options=("-w", "10"))
    proc = fetchmail(stack, stack.sink.port, background=True)
    try:
        wait_until(lambda: "event=release " in stack.daemon_log("helper"), 30,
                   what="session under way")
        relay = transport_of(stack, "odmr.test")
        for source in ("127.0.0.1", "127.0.0.77"):
            with socket.socket() as sock:   # we are root here, not postfix
                sock.bind((source, 0))
                sock.settimeout(5)
                sock.connect(relay)
                assert sock.recv(100) == b""      # closed, the customer's 220 never shown
        assert "reason=not_postfix" in stack.daemon_log("odmr")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_with_the_daemon_down_odmr_mail_is_still_taken_and_held(odmr_stack):
    stack = odmr_stack
    stack.stop_odmr()
    hold(stack, 1)
    stack.send(["a@customer.test"])
    wait_until(lambda: len(held(stack, "customer.test")) == 1, 20, what="held")


def test_mail_for_an_odmr_domain_never_leaves_another_way(odmr_stack):
    """A message for two customers' ODMR domains, released by one
    customer's session, and a forced flush of the whole queue: the other
    customer's copy goes only to its own relay address, which has no
    session (421): deferred, held again, never to its MX or address."""
    stack = odmr_stack
    # a local submission (smtpd would take one domain per message)
    subprocess.run(["/usr/sbin/sendmail", "-C", str(stack.pf.config_directory),
                    "-f", "someone@sender.test", "x@odmr.test", "y@other.test"],
                   input="Subject: for two\n\nhello\n", text=True, check=True, timeout=30)
    wait_until(lambda: len(held(stack, "odmr.test")) == 1, 30, what="held")
    stack.sink.start()
    assert fetchmail(stack, stack.sink.port).returncode == 0
    # (mail for two customers is not tagged: neither tag would be true)
    wait_until(lambda: [m for m in stack.sink.messages() if "Subject: for two" in m], 30,
               what="x's copy")
    stack.pf.run("postqueue", "-c", str(stack.pf.config_directory), "-f")
    wait_until(lambda: len(held(stack, "other.test")) == 1, 90, what="y's copy held again")
    relay = transport_of(stack, "other.test")
    sent = [line for line in stack.pf.log().splitlines()
            if "to=<y@other.test>" in line and "status=" in line]
    assert sent and not any("status=sent" in line for line in sent), sent
    assert all(f"relay={relay[0]}" in line or "relay=none" in line for line in sent), sent
    assert any(f"relay={relay[0]}" in line for line in sent), sent   # its own relay: 421
    assert not bounce_lines(stack)
    assert len(stack.sink.messages()) == 1


def test_check_says_when_the_odmr_daemon_is_down(odmr_stack):
    def odmr_problems():
        out = odmr_stack.flushctl("check", check=False).stdout
        return [line for line in out.splitlines() if line.startswith("odmr:")]
    assert odmr_problems() == []
    odmr_stack.stop_odmr()
    problems = odmr_problems()
    assert any("nothing accepts connections" in p for p in problems), problems
    assert any("nothing answers the relay" in p for p in problems), problems


def test_session_time_cap(make_stack):
    """A session that goes on past session_timeout ends; its mail is held again."""
    stack = start(make_stack, "session_timeout = 6\n")
    hold(stack, 2)
    stack.sink.start(options=("-w", "30"))
    proc = fetchmail(stack, stack.sink.port, background=True)
    try:
        wait_until(lambda: sessions(stack), 40, what="session ended")
        assert "result=timeout" in sessions(stack)[-1]
        wait_until(lambda: len(held(stack, "odmr.test")) == 2, 90, what="held again")
        assert not bounce_lines(stack)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


# -- a client of our own: STARTTLS, PLAIN, raw ATRN ----------------------------------

class RawClient:
    def __init__(self, port: int):
        self.smtp = smtplib.SMTP("127.0.0.1", port, timeout=30)
        self.smtp.ehlo("customer.example")

    def command(self, line: str) -> str:
        verb, _, arg = line.partition(" ")
        code, text = self.smtp.docmd(verb, arg)
        return f"{code} {text.decode(errors='replace')}"

    def cram(self, user: str, password: str) -> str:
        import base64
        import hmac
        code, challenge = self.smtp.docmd("AUTH", "CRAM-MD5")
        if code != 334:
            return f"{code} {challenge.decode()}"
        digest = hmac.new(password.encode(), base64.b64decode(challenge), "md5").hexdigest()
        code, text = self.smtp.docmd(base64.b64encode(f"{user} {digest}".encode()).decode())
        return f"{code} {text.decode(errors='replace')}"

    def login_cram(self, user: str, password: str) -> None:
        assert self.cram(user, password).startswith("235")

    def turn_around(self, mta_port: int, timeout: float = 60) -> None:
        """After 250: be the customer's side, as fetchmail is, in a thread."""
        sock = self.smtp.sock
        mta = socket.create_connection(("127.0.0.1", mta_port), 10)
        pipe(sock, mta, timeout)


def pipe(a: socket.socket, b: socket.socket, timeout: float) -> threading.Thread:
    from sockpipe import copy
    for src, dst in ((a, b), (b, a)):
        threading.Thread(target=copy, args=(src, dst), daemon=True).start()


class CustomerMTA:
    """The customer's MTA with answers per recipient (aiosmtpd)."""

    def __init__(self, refuse):
        from aiosmtpd.controller import Controller
        self.refuse = refuse
        self.messages = []
        mta = self

        class Handler:
            async def handle_RCPT(self, server, session, envelope, address, options):
                if mta.refuse(address):
                    return "450 4.2.0 Mailbox busy, try later"
                envelope.rcpt_tos.append(address)
                return "250 2.1.5 OK"

            async def handle_DATA(self, server, session, envelope):
                mta.messages.append(envelope.content)
                return "250 2.0.0 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def stop(self):
        self.controller.stop()


def _certificate(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=mx.provider.test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    os.chmod(key, 0o600)
    return cert, key


def test_starttls_then_plain(make_stack, tmp_path):
    cert, key = _certificate(tmp_path)
    stack = start(make_stack, f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"\n')
    hold(stack, 2)
    stack.sink.start()
    client = RawClient(stack.odmr_port)
    features = client.smtp.esmtp_features
    assert "starttls" in features and features["auth"].split() == ["CRAM-MD5"]
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False
    client.smtp.starttls(context=ctx)
    client.smtp.ehlo("customer.example")
    assert set(client.smtp.esmtp_features["auth"].split()) == {"CRAM-MD5", "PLAIN", "LOGIN"}
    client.smtp.user, client.smtp.password = "cust1", PASSWORD
    code, _ = client.smtp.auth("PLAIN", client.smtp.auth_plain)
    assert code == 235
    assert client.command("ATRN odmr.test").startswith("250")
    client.turn_around(stack.sink.port)
    wait_until(lambda: len(stack.sink.messages()) == 2, 30, what="delivered over TLS")
    wait_until(lambda: sessions(stack), 10, what="session logged")
    assert "result=delivered" in sessions(stack)[-1]


# -- a customer this host cannot reach at all ------------------------------------------

@in_netns
def test_customer_behind_a_network_this_host_cannot_reach():
    """The customer's MTA listens on its own network's loopback, in a
    network namespace of its own: this host (the test's namespace) reaches
    the customer only through the customer's outgoing connection, over a
    veth link, as behind NAT or a blocked port 25.  fetchmail there gets
    every held message."""
    from netns import Lan, run
    from stack import build_stack
    customer = subprocess.Popen(["unshare", "--net", "sleep", "600"])
    sink_dir = tempfile.mkdtemp(prefix="odmr-customer-")
    os.chmod(sink_dir, 0o777)
    sink = None
    stack = None
    try:
        pid = str(customer.pid)
        wait_until(lambda: os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net"),
                   10, what="customer namespace")

        def there(*argv):
            return ["nsenter", "-t", pid, "-n", *argv]
        with Lan(["192.0.2.1"], {("mx.provider.test", "A"): ["192.0.2.1"]}):
            run("ip", "link", "add", "vprov", "type", "veth", "peer", "name", "vcust",
                "netns", pid)
            run("ip", "addr", "add", "10.99.0.1/30", "dev", "vprov")
            run("ip", "link", "set", "vprov", "up")
            for argv in (("ip", "link", "set", "lo", "up"),
                         ("ip", "addr", "add", "10.99.0.2/30", "dev", "vcust"),
                         ("ip", "link", "set", "vcust", "up")):
                run(*there(*argv))
            sink = subprocess.Popen(there("smtp-sink", "-u", "nobody", "-d", sink_dir + "/%M%S.",
                                          "-h", "home.customer.test", "127.0.0.1:25", "64"))
            wait_until(lambda: subprocess.run(
                there("bash", "-c", "echo > /dev/tcp/127.0.0.1/25"),
                capture_output=True).returncode == 0, 10, what="customer's MTA")
            # this host cannot reach it: not on its own loopback, not over the link
            for host in ("127.0.0.1", "10.99.0.2"):
                with pytest.raises(OSError):
                    socket.create_connection((host, 25), 3).close()
            port = free_port()
            stack = build_stack(domains=odmr_domains,
                                extra=odmr_section(port).replace(
                                    "127.0.0.1:", "10.99.0.1:"))
            stack.odmr_port = port
            stack.flushctl("user", "add", "cust1", input=PASSWORD + "\n")
            stack.start_odmr()
            hold(stack, 3)
            rc = f'poll 10.99.0.1 user "cust1" password "{PASSWORD}"\n'
            home = tempfile.mkdtemp(prefix="fetchmail-", dir=stack.pf.root)
            proc = subprocess.run(
                there("fetchmail", "-f", "-", "--nosyslog", "-v", "-p", "ODMR",
                      "--pidfile", home + "/pid", "-P", str(port),
                      "--fetchdomains", "odmr.test", "--smtphost", "127.0.0.1/25"),
                input=rc, capture_output=True, text=True, timeout=120,
                env=dict(os.environ, HOME=home))
            assert proc.returncode == 0, proc.stdout + proc.stderr + logs(stack)

            def delivered():
                texts = [open(os.path.join(sink_dir, f), errors="replace").read()
                         for f in os.listdir(sink_dir)]
                return sorted(subjects(texts))
            wait_until(lambda: delivered() == ["odmr user0", "odmr user1", "odmr user2"], 30,
                       what="all delivered to the customer")
            assert not queued(stack, "odmr.test")
    finally:
        if stack is not None:
            stack.destroy()
        if sink is not None:
            sink.terminate()
            sink.wait(10)
        customer.kill()
        customer.wait(10)
        shutil.rmtree(sink_dir, ignore_errors=True)


# -- the cluster --------------------------------------------------------------------

def test_in_a_cluster_the_customer_polls_each_mx(make_stack):
    """Peers cannot connect to an ODMR customer either, so nothing is
    passed between them: the customer's client polls every MX in turn
    (one poll line each), each delivers the mail it holds itself, and a
    session on one MX releases nothing elsewhere, nor is sent on as ETRN."""
    from test_cluster import ADDRESSES
    from stack import Ports
    smtp, finger, odmr = port_free_on(ADDRESSES), port_free_on(ADDRESSES), port_free_on(ADDRESSES)
    stacks = []
    for address in ADDRESSES:
        peers = [f"{a}:{smtp}" for a in ADDRESSES if a != address]
        extra = (f"[cluster]\npeers = {peers!r}\nfinger_port = {finger}\nsource = \"{address}\"\n"
                 .replace("'", '"') + odmr_section(odmr).replace("127.0.0.1:", f"{address}:"))
        stack = make_stack(domains=odmr_domains, gateway=True, address=address,
                           smtpd_port=smtp, ports=Ports(finger), extra=extra)
        stack.odmr_port = odmr
        stack.flushctl("user", "add", "cust1", input=PASSWORD + "\n")
        stack.start_odmr()
        stacks.append(stack)
    for n, stack in enumerate(stacks):
        hold(stack, 2, prefix=f"mx{n}-")
    mta = stacks[0].sink.start()
    home = tempfile.mkdtemp(prefix="fetchmail-", dir=stacks[0].pf.root)

    def poll(*hosts):
        rc = "".join(f'poll {h} user "cust1" password "{PASSWORD}"\n' for h in hosts)
        return subprocess.run(
            ["fetchmail", "-f", "-", "--nosyslog", "-v", "-p", "ODMR", "--pidfile",
             home + "/pid", "-P", str(odmr), "--fetchdomains", "odmr.test",
             "--smtphost", f"127.0.0.1/{mta.port}"], input=rc, capture_output=True,
            text=True, timeout=180, env=dict(os.environ, HOME=home))
    # one MX polled: its mail only; the others keep theirs, and hear nothing of it
    assert poll(ADDRESSES[0]).returncode == 0
    wait_until(lambda: sorted(subjects(mta.messages())) == ["odmr mx0-0", "odmr mx0-1"], 30,
               what="the first MX's mail")
    time.sleep(3)
    assert [len(held(s, "odmr.test")) for s in stacks] == [0, 2, 2]
    assert not [line for s in stacks for line in s.gateway_log().splitlines()
                if "forward" in line and "odmr.test" in line]
    # a finger for an ODMR domain releases nothing anywhere either
    stacks[1].flushctl("flush", "odmr.test", check=False)
    time.sleep(3)
    assert [len(held(s, "odmr.test")) for s in stacks] == [0, 2, 2]
    # every MX polled in turn: all of it, once
    assert poll(*ADDRESSES).returncode in (0, 1)    # 1: the first had nothing (453)
    wait_until(lambda: len(subjects(mta.messages())) == 6, 60, what="all delivered")
    assert sorted(subjects(mta.messages())) == sorted(
        f"odmr mx{n}-{i}" for n in range(3) for i in range(2))
    assert not any(queued(s, "odmr.test") for s in stacks)


def test_implicit_tls_port(make_stack, tmp_path):
    cert, key = _certificate(tmp_path)
    tls_port = free_port()
    stack = start(make_stack, f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"\n'
                              f'tls_listen = ["127.0.0.1:{tls_port}"]\n')
    hold(stack, 1)
    stack.sink.start()
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False
    smtp = smtplib.SMTP_SSL("127.0.0.1", tls_port, timeout=30, context=ctx)
    smtp.ehlo("customer.example")
    assert "starttls" not in smtp.esmtp_features      # TLS already
    assert "PLAIN" in smtp.esmtp_features["auth"].split()
    smtp.user, smtp.password = "cust1", PASSWORD
    assert smtp.auth("PLAIN", smtp.auth_plain)[0] == 235
    assert smtp.docmd("ATRN", "odmr.test")[0] == 250
    mta = socket.create_connection(("127.0.0.1", stack.sink.port), 10)
    pipe(smtp.sock, mta, 60)
    wait_until(lambda: len(subjects(stack.sink.messages())) == 1, 30, what="delivered")
