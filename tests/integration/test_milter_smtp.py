"""What an SMTP client sees from the milter, through a real Postfix."""

import smtplib

import pytest

from conftest import wait_until


def rcpt_reply(stack, rcpts, sender="someone@sender.test"):
    """RCPT replies for one transaction, in order."""
    with smtplib.SMTP("127.0.0.1", stack.pf.smtpd_port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        smtp.mail(sender)
        replies = [smtp.rcpt(r) for r in rcpts]
        smtp.rset()
    return [(code, msg.decode()) for code, msg in replies]


def test_unknown_recipient_of_listed_domain_gets_550(stack):
    replies = rcpt_reply(stack, ["alice@listed.test", "BOB@listed.test", "mallory@listed.test"])
    assert replies[0][0] == 250
    assert replies[1][0] == 250  # local parts compare case-insensitively
    assert replies[2][0] == 550
    assert "5.1.1" in replies[2][1]


def test_second_customer_domain_in_one_transaction_gets_452(stack):
    replies = rcpt_reply(stack, ["a@customer.test", "alice@listed.test"])
    assert replies[0][0] == 250
    assert replies[1][0] == 452
    assert "4.5.3" in replies[1][1]


def test_customer_and_outside_recipient_are_split(stack):
    replies = rcpt_reply(stack, ["a@customer.test", "x@elsewhere.test"], sender="me@provider.test")
    assert replies[0][0] == 250
    assert replies[1][0] == 452


def test_quota_gives_452_and_nothing_bounces(stack):
    stack.send(["a@small.test"])
    stack.send(["b@small.test"])
    wait_until(lambda: len(stack.queue()) == 2, what="2 held")
    replies = rcpt_reply(stack, ["c@small.test"])
    assert replies[0][0] == 452
    assert "4.2.2" in replies[0][1]
    [row] = stack.status("small.test")
    assert row["messages"] == 2
    # once some of it is gone, the domain takes mail again
    ids = [m["queue_id"] for m in stack.queue()]
    stack.pf.run("postsuper", "-c", str(stack.pf.config_directory), "-d", ids[0])
    wait_until(lambda: rcpt_reply(stack, ["c@small.test"])[0][0] == 250, timeout=30,
               what="quota freed after a deletion")


def test_forged_tag_header_is_replaced(stack):
    stack.send(["a@customer.test"], extra_headers="X-OnDemand-Domain: listed.test\n")
    wait_until(lambda: len(stack.queue()) == 1, what="held")
    [msg] = stack.queue()
    text = stack.pf.run("postcat", "-c", str(stack.pf.config_directory), "-h", "-q",
                        msg["queue_id"]).stdout
    tags = [line for line in text.splitlines() if line.lower().startswith("x-ondemand-domain")]
    assert tags == ["X-OnDemand-Domain: customer.test"]


def test_mail_for_other_domains_is_not_held(stack):
    stack.send(["x@elsewhere.test"], sender="me@provider.test")
    wait_until(lambda: len(stack.queue()) >= 1, what="queued")
    assert [m for m in stack.queue() if m["queue_name"] == "hold"] == []
    assert stack.status() and all(row["messages"] == 0 for row in stack.status())


def test_milter_down_means_tempfail_never_untagged(stack):
    stack.stop_milter()
    with pytest.raises(smtplib.SMTPException) as info:
        stack.send(["a@customer.test"])
    text = str(info.value)
    assert " 4" in text or "(4" in text, text
    assert stack.queue() == []
    stack.start_milter()
    stack.send(["a@customer.test"])
    wait_until(lambda: len(stack.queue()) == 1, what="held after restart")
    assert stack.queue()[0]["queue_name"] == "hold"


def test_socket_reachable_by_postfix_only(stack):
    """root:postfix, no setgid bit (systemd's RestrictSUIDSGID forbids it),
    and nobody else can connect; Postfix can, as the test above shows."""
    import grp
    import os
    import stat
    import subprocess

    path = stack.cfg.milter_listen.path
    postfix_gid = grp.getgrnam("postfix").gr_gid
    for p, mode in ((os.path.dirname(path), 0o750), (path, 0o660)):
        st = os.stat(p)
        assert (st.st_uid, st.st_gid) == (0, postfix_gid), p
        assert stat.S_IMODE(st.st_mode) == mode, (p, oct(st.st_mode))
    probe = ("import socket,sys; s=socket.socket(socket.AF_UNIX); "
             "s.connect(sys.argv[1]); print('connected')")
    as_nobody = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                                "/usr/bin/python3", "-c", probe, path], capture_output=True, text=True)
    assert "connected" not in as_nobody.stdout and "Permission denied" in as_nobody.stderr
    as_postfix = subprocess.run(["setpriv", "--reuid=postfix", "--regid=postfix",
                                 "--init-groups", "/usr/bin/python3", "-c", probe, path],
                                capture_output=True, text=True)
    assert as_postfix.stdout.strip() == "connected", as_postfix.stderr
