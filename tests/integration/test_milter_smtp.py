"""What an SMTP client sees from the milter, through a real Postfix."""

import smtplib
import time

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
    # once some of it is gone, the domain takes mail again: the milter runs
    # unprivileged and cannot read Postfix's queue, the keeper (in the
    # poller, as in production) finds the mail gone within a pass or two
    stack.start_poller()
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
    """The socket's directory is the milter's own, made by `flushctl apply`:
    owner [milter] user, group postfix, 2750 (the setgid bit gives the
    socket postfix's group; the milter, never root, sets no such bit
    itself); the socket 0660. Postfix connects; another local user cannot."""
    import grp
    import os
    import pwd
    import stat
    import subprocess

    path = stack.cfg.milter_listen.path
    postfix_gid = grp.getgrnam("postfix").gr_gid
    nobody = pwd.getpwnam("nobody").pw_uid
    for p, mode in ((os.path.dirname(path), 0o2750), (path, 0o660)):
        st = os.stat(p)
        assert (st.st_uid, st.st_gid) == (nobody, postfix_gid), p
        assert stat.S_IMODE(st.st_mode) == mode, (p, oct(st.st_mode))
    probe = ("import socket,sys; s=socket.socket(socket.AF_UNIX); "
             "s.connect(sys.argv[1]); print('connected')")
    # a local user of no group of ours (not the milter's user: it owns the socket)
    as_other = subprocess.run(["setpriv", "--reuid=4242", "--regid=4242", "--clear-groups",
                               "/usr/bin/python3", "-c", probe, path], capture_output=True, text=True)
    assert "connected" not in as_other.stdout and "Permission denied" in as_other.stderr
    as_postfix = subprocess.run(["setpriv", "--reuid=postfix", "--regid=postfix",
                                 "--init-groups", "/usr/bin/python3", "-c", probe, path],
                                capture_output=True, text=True)
    assert as_postfix.stdout.strip() == "connected", as_postfix.stderr


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as fh:
        return dict(line.rstrip("\n").split(":\t", 1) for line in fh if ":\t" in line)


def test_milter_runs_as_its_own_user_without_capabilities(stack):
    """Issue 15, item 4: the milter reads every message, so once its socket is
    open it runs as `[milter] user` (here nobody, as the stack starts every
    daemon as production does), with no capability left; it writes the
    ledger through the state directory's group, and holds and counts mail
    as before."""
    import grp
    import os
    import pwd
    import stat

    import psutil

    nobody = pwd.getpwnam("nobody")
    wait_until(lambda: "event=privileges user=nobody" in
               (stack.state_dir / "milter.log").read_text(), what="privileges given up")
    proc = psutil.Process(stack.milter.pid)
    milters = [p for p in [proc, *proc.children(recursive=True)] if "milter" in " ".join(p.cmdline())]
    assert milters
    for p in milters:
        status = _status(p.pid)
        assert status["Uid"].split() == [str(nobody.pw_uid)] * 4, status["Uid"]
        assert status["Gid"].split() == [str(nobody.pw_gid)] * 4, status["Gid"]
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0, status
        assert status["NoNewPrivs"] == "1"
    st = os.stat(stack.state_dir)
    assert (st.st_uid, st.st_gid) == (0, nobody.pw_gid)
    assert stat.S_IMODE(st.st_mode) & 0o7770 == 0o770   # no setgid: RestrictSUIDSGID
    ledger = os.stat(stack.state_dir / "ledger.sqlite3")
    assert (ledger.st_gid, stat.S_IMODE(ledger.st_mode)) == (nobody.pw_gid, 0o660)
    stack.send(["a@customer.test"])
    wait_until(lambda: stack.status("customer.test")[0]["messages"] == 1, what="held, counted")
    assert grp.getgrgid(nobody.pw_gid).gr_name == "nogroup"


def test_a_milter_user_that_does_not_exist_is_a_clear_error(stack):
    stack.stop_milter()
    text = stack.config_path.read_text().replace('user = "nobody"   # as in production',
                                                 'user = "no-such-milter-user"   #', 1)
    stack.config_path.write_text(text)
    proc = stack.flushctl("milter", check=False, timeout=30)
    assert proc.returncode != 0
    assert "milter: user 'no-such-milter-user' does not exist" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def _sendmail(stack, sender, rcpts, text):
    import subprocess
    subprocess.run(["/usr/sbin/sendmail", "-C", str(stack.pf.config_directory), "-f", sender,
                    *rcpts], input=text, text=True, check=True, timeout=30)


def test_local_submissions_are_never_refused_or_stranded(make_stack):
    """The milter meets local submissions too (non_smtpd_milters), but there
    is no client to refuse anything to: a refused recipient would leave the
    whole message in maildrop, retried for ever.  Mixed mail (a customer and
    another domain, two customers, over a quota) goes on untagged and the
    keeper holds the customer's part; with the milter down, local mail is not
    held up either."""
    import os
    def domains(port):
        return (f'[domains."customer.test"]\nrelay = "[127.0.0.1]:{port}"\n'
                f'[domains."small.test"]\nrelay = "[127.0.0.1]:{port}"\nquota_messages = 2\n')
    stack = make_stack(domains=domains,
                       extra_main={"relay_domains": "other.test",
                                   "transport_maps": "inline:{other.test=smtp:[127.0.0.1]:9}"})
    stack.start_poller()
    maildrop = stack.pf.queue_directory / "maildrop"
    _sendmail(stack, "root@provider.test", ["a@customer.test", "v@other.test"],
              "Subject: mixed\n\nhi\n")
    _sendmail(stack, "root@provider.test", ["b@customer.test", "c@small.test"],
              "Subject: two customers\n\nhi\n")
    for i in range(3):
        _sendmail(stack, "root@provider.test", [f"q{i}@small.test"], f"Subject: q{i}\n\nhi\n")
    wait_until(lambda: not os.listdir(maildrop), 20, what="maildrop empty")
    # held: the customers' parts (the keeper's), and small.test past its quota of 2 too
    wait_until(lambda: stack.status("customer.test")[0]["messages"] == 2, 30,
               what="customer.test's parts held")
    wait_until(lambda: stack.status("small.test")[0]["messages"] == 3, 30,
               what="small.test's held, the quota never refusing local mail")
    log = stack.pf.log()
    assert "can't reject recipient" not in log
    assert not [line for line in log.splitlines()
                if "milter-reject" in line and "root@provider.test" in line]

    stack.stop_milter()
    _sendmail(stack, "root@provider.test", ["v2@other.test"], "Subject: milter down\n\nhi\n")
    _sendmail(stack, "root@provider.test", ["d@customer.test"], "Subject: down, customer\n\nhi\n")
    wait_until(lambda: not os.listdir(maildrop), 20, what="maildrop empty, milter down")
    wait_until(lambda: stack.status("customer.test")[0]["messages"] == 3, 30,
               what="the keeper holds what the milter could not")
    assert any(r["address"] == "v2@other.test" for m in stack.queue() for r in m["recipients"])


def test_a_ledger_made_anew_by_root_is_still_the_milters_to_write(stack):
    """The ledger removed while the milter runs, and made anew by a root
    process before the milter notices (the keeper's rebuild, a root
    `flushctl`): its files are the state directory group's, 0660, so the
    unprivileged milter goes on recording (before: 451 for every message)."""
    import os
    import stat

    from flushctl.heldmail.ledger.store import Ledger
    stack.send(["a@customer.test"])
    wait_until(lambda: len(stack.queue()) == 1, what="held")
    old_umask = os.umask(0o022)   # a root shell's
    try:
        for suffix in ("", "-wal", "-shm"):
            path = stack.state_dir / f"ledger.sqlite3{suffix}"
            if path.exists():
                path.unlink()
        root_ledger = Ledger(str(stack.state_dir))
        root_ledger.state("customer.test")
    finally:
        os.umask(old_umask)
    gid = os.stat(stack.state_dir).st_gid
    for suffix in ("", "-wal", "-shm"):
        st = os.stat(stack.state_dir / f"ledger.sqlite3{suffix}")
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (gid, 0o660), suffix
    time.sleep(6)   # the milter's upkeep notices the new file and opens it
    stack.send(["b@customer.test"])   # 451 if the milter could not write it
    wait_until(lambda: len(stack.queue()) == 2, what="held")
    root_ledger.close()
    assert "readonly" not in (stack.state_dir / "milter.log").read_text()


def test_the_milter_is_never_root_and_says_what_it_lacks(stack):
    """Issue 15, item 4: the milter's unit starts it as its user with no
    capability, so it cannot make its socket's directory or share the
    ledger itself: `flushctl apply` (root) does. A directory that is not
    the milter's (an old version's root:postfix one, say) stops it at
    start with what to do, and it serves once apply has run."""
    import os

    directory = os.path.dirname(stack.cfg.milter_listen.path)
    stack.stop_milter()
    os.chown(directory, 0, -1)
    proc = stack.flushctl("milter", check=False, timeout=60)   # root: becomes nobody first
    assert proc.returncode == 1
    assert "must be the milter's own" in proc.stderr and "flushctl apply" in proc.stderr, \
        proc.stderr
    stack.flushctl("apply")
    stack.start_milter()
    stack.send(["a@customer.test"])
    wait_until(lambda: len(stack.queue()) == 1, what="held")
    assert stack.queue()[0]["queue_name"] == "hold"


def test_apply_takes_no_directory_of_postfixs_for_the_milter(stack):
    """A careless admin puts the milter's socket in Postfix's private/:
    apply refuses (making that directory the milter's would cut Postfix
    off from its own services) and changes nothing."""
    import os
    import stat

    private = os.path.join(stack.pf.queue_directory, "private")
    before = os.stat(private)
    text = stack.config_path.read_text()
    stack.config_path.write_text(text.replace(
        f'unix:{stack.cfg.milter_listen.path}', f'unix:{private}/flushctl-milter'))
    try:
        proc = stack.flushctl("apply", check=False)
        assert proc.returncode == 1
        assert "holds other files" in proc.stderr and "a directory of its own" in proc.stderr, \
            proc.stderr
        after = os.stat(private)
        assert (after.st_uid, after.st_gid, stat.S_IMODE(after.st_mode)) == \
            (before.st_uid, before.st_gid, stat.S_IMODE(before.st_mode))
    finally:
        stack.config_path.write_text(text)


def test_apply_follows_no_link_to_the_milters_directory(stack):
    """apply makes the socket's directory the milter's: it must not be led
    to make another directory the milter's. A directory above it that
    another user may change (here the milter's own user, who could swap
    the socket's directory for a link between apply's look and its chown)
    is refused, and so is a link in place of the socket's directory; no
    directory changes hands."""
    import os
    import stat

    text = stack.config_path.read_text()
    path = stack.cfg.milter_listen.path
    mine = stack.state_dir.parent / "mine"
    mine.mkdir()
    os.chown(mine, 65534, 65534)
    victim = stack.state_dir.parent / "root-only"
    victim.mkdir(mode=0o700)
    try:
        stack.config_path.write_text(text.replace(f"unix:{path}", f"unix:{mine}/sock/milter.sock"))
        proc = stack.flushctl("apply", check=False)
        assert proc.returncode == 1, proc.stdout
        assert f"{mine} may be changed by others than root" in proc.stderr, proc.stderr
        assert not (mine / "sock").exists()
        link = stack.state_dir.parent / "linked"
        link.symlink_to(victim)
        stack.config_path.write_text(text.replace(f"unix:{path}", f"unix:{link}/milter.sock"))
        proc = stack.flushctl("apply", check=False)
        assert proc.returncode == 1 and "not a directory" in proc.stderr, proc.stderr
        st = os.stat(victim)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o700)
    finally:
        stack.config_path.write_text(text)



def test_twenty_sessions_at_once_are_each_recorded_and_counted_once(stack):
    """Twenty sessions at once, each message's row committed before its
    end is answered: every message Postfix accepted is held and recorded
    once, under its own queue id, in the domain's totals and in the held
    counter."""
    import subprocess

    from flushctl import config as config_mod
    from flushctl.heldmail.library import HeldMail
    sent = 400
    subprocess.run(["smtp-source", "-s", "20", "-m", str(sent), "-f", "load@sender.test",
                    "-t", "user@customer.test", f"127.0.0.1:{stack.pf.smtpd_port}"],
                   check=True, capture_output=True, timeout=300)
    wait_until(lambda: len(stack.queue()) == sent, 60, what=f"{sent} queued")
    held = {m["queue_id"] for m in stack.queue() if m["queue_name"] == "hold"}
    assert len(held) == sent
    ledger = HeldMail(config_mod.load(str(stack.config_path))).ledger
    assert {e.queue_id for e in ledger.entries("customer.test")} == held
    assert stack.status("customer.test")[0]["messages"] == sent
    assert ("milter_decisions", ("held",), sent) in ledger.counters()
