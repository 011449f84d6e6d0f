"""No open relay, and no ETRN for strangers, on an instance after `apply`.

XCLIENT (allowed for loopback in this private instance only) lets the test
speak as a client from outside mynetworks.
"""

import subprocess

import pytest

from conftest import wait_until


@pytest.fixture
def outside_stack(make_stack):
    return make_stack(extra_main={"smtpd_authorized_xclient_hosts": "127.0.0.1",
                                  "mynetworks": "127.0.0.1/32"})


def swaks(stack, *args, client="192.0.2.7"):
    proc = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{stack.pf.smtpd_port}", "--timeout", "20",
         "--xclient-addr", client, "--xclient-name", "[UNAVAILABLE]",
         "--from", "stranger@outside.test", *args],
        capture_output=True, text=True, timeout=60)
    return proc.stdout + proc.stderr


def test_customer_networks_relay_and_nobody_else(make_stack):
    """[relay] networks: the customers' own networks send outbound mail through us."""
    from conftest import default_domains

    def domains(port):
        return '[relay]\nnetworks = ["198.51.100.0/24"]\n' + default_domains(port)
    stack = make_stack(extra_main={"smtpd_authorized_xclient_hosts": "127.0.0.1",
                                   "mynetworks": "127.0.0.1/32"}, domains=domains)
    assert "198.51.100.0/24" in stack.pf.postconf("-h", "mynetworks")
    out = swaks(stack, "--to", "friend@elsewhere.test", client="198.51.100.9")
    assert "<-  250 2.0.0 Ok: queued" in out, out
    out = swaks(stack, "--to", "friend@elsewhere.test", client="203.0.113.9")
    assert "<** 554 5.7.1" in out and "Relay access denied" in out, out


def test_outside_client_cannot_relay_but_can_reach_customers(outside_stack):
    out = swaks(outside_stack, "--to", "victim@elsewhere.test")
    assert "<** 554 5.7.1" in out and "Relay access denied" in out, out
    out = swaks(outside_stack, "--to", "user@customer.test")
    assert "<-  250 2.0.0 Ok: queued" in out, out
    wait_until(lambda: len(outside_stack.queue()) == 1, what="held")
    assert outside_stack.queue()[0]["queue_name"] == "hold"


def test_subdomain_mail_is_held_for_the_parent_domain(stack):
    stack.send(["user@office.customer.test"])
    wait_until(lambda: len(stack.queue()) == 1, what="held")
    assert stack.queue()[0]["queue_name"] == "hold"
    assert stack.status("customer.test")[0]["messages"] == 1


def test_etrn_without_the_gateway_is_refused_not_open(stack):
    """smtpd_etrn_restrictions asks the gateway; with it down, ETRN fails closed."""
    import smtplib
    with smtplib.SMTP("127.0.0.1", stack.pf.smtpd_port, timeout=60) as smtp:
        smtp.ehlo("client.test")
        code, msg = smtp.docmd("ETRN", "customer.test")
    assert code >= 400, (code, msg)


def test_networks_that_together_are_everyone_are_refused(outside_stack):
    """[relay] networks of two halves of the Internet (each narrower than
    /0) would make an open relay: the config is refused, nothing changes,
    and mail from outside to outside is still refused. An admin's own
    mynetworks of the same: apply refuses it too."""
    stack = outside_stack
    config_text = stack.config_path.read_text()
    stack.config_path.write_text('[relay]\nnetworks = ["0.0.0.0/1", "128.0.0.0/1"]\n'
                                 + config_text)
    proc = stack.flushctl("apply", check=False)
    assert proc.returncode == 1
    assert "relay.networks: 0.0.0.0/1 is wider than a /8: that is an open relay" in proc.stderr
    assert stack.pf.postconf("-h", "mynetworks").strip() == "127.0.0.1/32"
    out = swaks(stack, "--to", "victim@elsewhere.test", client="203.0.113.9")
    assert "<** 554 5.7.1" in out and "Relay access denied" in out, out

    stack.config_path.write_text(config_text)
    stack.pf.postconf("-e", "mynetworks = 127.0.0.1/32, 0.0.0.0/1, 128.0.0.0/1")
    proc = stack.flushctl("apply", check=False)
    assert proc.returncode == 1 and "mynetworks: 0.0.0.0/1 is wider than a /8" in proc.stderr
