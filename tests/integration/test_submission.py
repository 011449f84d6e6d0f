"""Optional SASL-authenticated submission ([submission]), with Cyrus SASL
and a sasldb, as the Ansible role sets it up: customers send their
outbound mail through us from anywhere once they log in, over TLS only."""

import os
import shutil
import time
import subprocess

import pytest

from conftest import default_domains, wait_until
from instance import free_port

USER, REALM, PASSWORD = "alice", "customer.test", "s3cret-Pass"

pytestmark = pytest.mark.skipif(shutil.which("saslpasswd2") is None,
                                reason="needs saslpasswd2 (Debian package sasl2-bin)")


def prepare_sasl(pf):
    """What the Ansible role installs: a certificate, Cyrus's smtpd.conf and a
    sasldb with one customer login, in CONFIG_DIRECTORY/sasl."""
    path = pf.config_directory / "sasl"
    path.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=mx.provider.test", "-keyout", str(path / "mx.key"),
                    "-out", str(path / "mx.pem")], check=True, capture_output=True)
    os.chmod(path / "mx.key", 0o600)
    (path / "smtpd.conf").write_text(
        f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\n"
        f"sasldb_path: {path}/sasldb2\n")
    subprocess.run(["saslpasswd2", "-p", "-c", "-f", str(path / "sasldb2"), "-u", REALM, USER],
                   input=PASSWORD, text=True, check=True)
    shutil.chown(path / "sasldb2", "root", "postfix")
    os.chmod(path / "sasldb2", 0o640)


@pytest.fixture
def sub_stack(make_stack):
    port = free_port()
    made = {}

    def prepare(pf):
        prepare_sasl(pf)
        made["dir"] = pf.config_directory / "sasl"

    def domains(sink_port):
        return default_domains(sink_port) + f"""
[submission]
listen = "127.0.0.1:{port}"
tls_cert_file = "{made['dir']}/mx.pem"
tls_key_file = "{made['dir']}/mx.key"
"""
    stack = make_stack(domains=domains, extra_main={"mynetworks": "127.0.0.1/32"},
                       prepare=prepare)
    # outbound mail goes to smtp-sink, standing in for the internet
    stack.pf.postconf("-e", f"relayhost=[127.0.0.1]:{stack.sink.port}")
    stack.pf.postfix("reload")
    stack.sink.start()
    stack.submission_port = port
    return stack


def swaks(stack, *args):
    proc = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{stack.submission_port}", "--timeout", "20",
         "--from", f"{USER}@{REALM}", "--to", "friend@elsewhere.test", *args],
        capture_output=True, text=True, timeout=60)
    return proc.stdout + proc.stderr


def test_authenticated_customer_relays_through_us(sub_stack):
    out = swaks(sub_stack, "--tls", "--auth", "PLAIN", "--auth-user", f"{USER}@{REALM}",
                "--auth-password", PASSWORD, "--header", "Subject: outbound via submission")
    assert "<~  235 2.7.0 Authentication successful" in out, out
    assert "<~  250 2.0.0 Ok: queued" in out, out
    wait_until(lambda: any("outbound via submission" in m for m in sub_stack.sink.messages()),
               what="relayed to the next hop")
    assert sub_stack.queue() == []


def test_submission_is_no_open_relay(sub_stack):
    # no TLS: nothing but EHLO, STARTTLS and QUIT
    out = swaks(sub_stack)
    assert "<** 530 5.7.0 Must issue a STARTTLS command first" in out, out
    # TLS but no login
    out = swaks(sub_stack, "--tls")
    assert "<~* 554 5.7.1" in out and "Access denied" in out, out
    # a wrong password
    out = swaks(sub_stack, "--tls", "--auth", "PLAIN", "--auth-user", f"{USER}@{REALM}",
                "--auth-password", "wrong")
    assert "<~* 535 5.7.8" in out, out
    # AUTH is not even offered before TLS
    out = swaks(sub_stack, "--quit-after", "EHLO")
    assert "AUTH" not in out.split("EHLO", 1)[1], out
    assert sub_stack.sink.started() == 0 and sub_stack.queue() == []


def test_submission_entry_is_ours_and_goes_away(sub_stack):
    key = f"127.0.0.1:{sub_stack.submission_port}/inet"

    def entries():
        return [" ".join(line.split()[:2]) for line in sub_stack.pf.postconf("-M").splitlines()]
    assert key.replace("/", " ") in entries()
    assert sub_stack.flushctl("apply").stdout.strip() == "nothing to change"
    text = sub_stack.config_path.read_text()
    sub_stack.config_path.write_text(text[:text.index("[submission]")])
    out = sub_stack.flushctl("apply").stdout
    assert f"removed master.cf: {key}" in out, out
    assert key.replace("/", " ") not in entries()
    assert sub_stack.flushctl("apply").stdout.strip() == "nothing to change"


# -- ETRN after AUTH: a login a domain lists in `users` may release it --------------

@pytest.fixture
def etrn_stack(make_stack):
    port = free_port()
    made = {}

    def prepare(pf):
        prepare_sasl(pf)
        made["dir"] = pf.config_directory / "sasl"

    def domains(sink_port):
        # neither domain lets 127.0.0.1 release by its address
        return f"""
[domains."authed.test"]
relay = "[127.0.0.1]:{sink_port}"
flush_from = ["192.0.2.0/24"]
users = ["{USER}@{REALM}"]

[domains."notyours.test"]
relay = "[127.0.0.1]:{sink_port}"
flush_from = ["192.0.2.0/24"]
users = ["someone-else"]

[submission]
listen = "127.0.0.1:{port}"
tls_cert_file = "{made['dir']}/mx.pem"
tls_key_file = "{made['dir']}/mx.key"
"""
    stack = make_stack(domains=domains, prepare=prepare, gateway=True)
    stack.submission_port = port
    return stack


def _etrn(stack, domain, login=True):
    import smtplib
    import ssl
    with smtplib.SMTP("127.0.0.1", stack.submission_port, timeout=30) as smtp:
        smtp.starttls(context=ssl._create_unverified_context())
        if login:
            smtp.login(f"{USER}@{REALM}", PASSWORD)
        return smtp.docmd("ETRN", domain)


def test_etrn_after_auth_releases_the_logins_domain(etrn_stack):
    stack = etrn_stack
    stack.send(["a@authed.test"])
    stack.send(["b@notyours.test"])
    wait_until(lambda: len(stack.queue()) == 2, what="2 held")
    stack.sink.start()
    # without a login, 127.0.0.1 is outside flush_from: refused
    code, _ = _etrn(stack, "authed.test", login=False)
    assert code >= 400
    # a login listed for another domain only: refused, nothing released
    code, _ = _etrn(stack, "notyours.test")
    assert code >= 400
    time.sleep(2)
    assert stack.sink.started() == 0
    code, text = _etrn(stack, "authed.test")
    assert code == 250, text
    wait_until(lambda: len(stack.sink.messages()) == 1, 30, what="released by the login")
    assert "a@authed.test" in stack.sink.messages()[0]
    assert len(stack.queue()) == 1           # notyours.test's stays held
