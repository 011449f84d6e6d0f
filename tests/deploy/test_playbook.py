"""The deployment test: the Ansible playbook against this machine, as an admin runs it.

It changes the machine's own Postfix (port 25) and starts the daemons
(finger on port 79, ODMR on 127.0.0.1:366), so it runs only where that is
wanted: in CI (CI=true) or with FLUSHCTL_DEPLOY_TEST=1, as root.
"""

import grp
import json
import os
import pwd
import re
import secrets
import smtplib
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
BOOTSTRAP = ROOT / "ansible" / "bootstrap.sh"
ANSIBLE_PYTHON = Path("/opt/flushctl-ansible/bin/python")   # bootstrap.sh's virtualenv
FLUSHCTL = "/usr/local/sbin/flushctl"

sys.path.insert(0, str(ROOT / "tests"))
from stack import Sink, wait_until  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not (os.environ.get("CI") == "true"
                              or os.environ.get("FLUSHCTL_DEPLOY_TEST") == "1"),
    reason="changes this machine's Postfix: runs in CI or with FLUSHCTL_DEPLOY_TEST=1")


EXAMPLE_VARS = ROOT / "ansible" / "example-vars.yml"
LOGIN = "carol@customer.example"
ADMIN = "flushctl-deploy-admin"   # a login user the role lets release without root
PASSWORD = "p" + secrets.token_urlsafe(12)   # never "-...": swaks would take it for an option
# an ODMR customer: no server of its own; it logs in on port 366 and takes its mail
ODMR_DOMAIN = "odmr-customer.example"
PORTAL_PORT = 8366
ODMR_LOGIN = "cust1"
ODMR_PASSWORD = "p" + secrets.token_urlsafe(12)
ODMR_PORT = 366
CAP_NET_BIND_SERVICE = 1 << 10


def playbook(extra_vars: Path, *more: str):
    proc = subprocess.run([str(BOOTSTRAP), "-e", f"@{EXAMPLE_VARS}", "-e", f"@{extra_vars}",
                           *more], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    recap = re.search(r"localhost\s+:\s+ok=\d+\s+changed=(\d+)\s+unreachable=0\s+failed=0",
                      proc.stdout)
    assert recap, proc.stdout[-3000:]
    changed = int(recap.group(1))
    if changed:   # say which tasks changed
        tasks = [block.split("]", 1)[0] for block in re.split(r"\n(?:TASK|RUNNING HANDLER) \[",
                                                              proc.stdout)
                 if "\nchanged: " in block]
        print(f"{changed} changed: {tasks}")
    return changed


def example_vars() -> dict:
    """ansible/example-vars.yml as data, read by the PyYAML Ansible brings
    (the bootstrap installs it first)."""
    subprocess.run([str(BOOTSTRAP), "--version"], capture_output=True, timeout=1800, check=True)
    with EXAMPLE_VARS.open() as fh:
        out = subprocess.run([str(ANSIBLE_PYTHON), "-c", "import json, sys, yaml; "
                              "json.dump(yaml.safe_load(sys.stdin), sys.stdout)"],
                             stdin=fh, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def forget_login():
    """No ODMR login left from an earlier run (with another password)."""
    if Path(FLUSHCTL).exists():
        subprocess.run([FLUSHCTL, "user", "del", ODMR_LOGIN], capture_output=True, timeout=60)


def status():
    out = subprocess.run(["/usr/local/sbin/flushctl", "status", "--json", "customer.example"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(out)[0]


def deployed(name):
    """The deployed daemon ``name``'s processes (other test runs may have
    private daemons of their own)."""
    found = [p for p in psutil.process_iter(["cmdline"])
             if (p.info["cmdline"] or [])[-3:] == ["--config", "/etc/flushctl/flushctl.toml",
                                                  name]]
    assert found, f"no {name} running"
    return found


def unprivileged(proc, user, caps=0):
    """``proc`` runs as ``user`` (every uid), with the capabilities ``caps``
    only, and can never gain another."""
    with open(f"/proc/{proc.pid}/status") as fh:
        proc_status = dict(line.rstrip("\n").split(":\t", 1) for line in fh
                           if ":\t" in line)
    entry = pwd.getpwnam(user)
    assert proc_status["Uid"].split() == [str(entry.pw_uid)] * 4, proc_status["Uid"]
    assert int(proc_status["CapEff"], 16) == caps, proc_status["CapEff"]
    assert int(proc_status["CapBnd"], 16) == caps, proc_status["CapBnd"]
    return proc_status


def swaks(*args):
    proc = subprocess.run(["swaks", "--server", "127.0.0.1:587", "--timeout", "30", "--tls",
                           "--from", LOGIN, "--to", "friend@elsewhere.example", *args],
                          capture_output=True, text=True, timeout=90)
    return proc.stdout + proc.stderr


def test_playbook_deploys_a_working_host_and_converges(tmp_path):
    # the example vars, plus SASL submission with one login, plus an ODMR
    # customer with its login
    domains = example_vars()["flushctl_domains"]
    domains[ODMR_DOMAIN] = {"odmr": True, "users": [ODMR_LOGIN]}
    extra = tmp_path / "submission.json"
    extra.write_text(json.dumps({"flushctl_submission_enabled": True,
                                 "flushctl_submission_users": {LOGIN: PASSWORD},
                                 "flushctl_admins": [ADMIN],
                                 "flushctl_domains": domains,
                                 "flushctl_odmr": {"listen": [f"127.0.0.1:{ODMR_PORT}"]},
                                 "flushctl_portal": {"listen": f"127.0.0.1:{PORTAL_PORT}",
                                                     "secure_cookie": False},
                                 "flushctl_users": [{"name": ODMR_LOGIN,
                                                     "password": ODMR_PASSWORD}]}))
    forget_login()
    # this host is one of three backup MX hosts in the inventory's group;
    # the play runs on this one only
    inventory = tmp_path / "inventory.ini"
    inventory.write_text("[flushctl_mx]\nmx2.provider.example\nlocalhost\n"
                         "mx3.provider.example\n")
    cluster = ("-i", str(inventory), "--limit", "localhost")
    playbook(extra, *cluster)
    assert playbook(extra, *cluster) == 0, "the second run changes nothing"

    # the other two are this host's peers
    config = Path("/etc/flushctl/flushctl.toml").read_text()
    assert 'peers = ["mx2.provider.example:25", "mx3.provider.example:25"]' in config, config
    rows = json.loads(subprocess.run(
        ["/usr/local/sbin/flushctl", "status", "--cluster", "--json", "customer.example"],
        capture_output=True, text=True, timeout=120, check=True).stdout)
    assert [r["host"] for r in rows] == ["(here)", "mx2.provider.example:25",
                                         "mx3.provider.example:25"]
    assert rows[1]["error"] and rows[2]["error"]   # example names: nobody answers

    mynetworks = subprocess.run(["postconf", "-h", "mynetworks"], capture_output=True,
                                text=True, check=True).stdout
    assert "198.51.100.0/24" in mynetworks  # flushctl_relay_networks from the example vars

    before = status()["messages"]
    with smtplib.SMTP("127.0.0.1", 25, timeout=60) as smtp:
        refused = smtp.sendmail("someone@sender.example", ["alice@customer.example"],
                                "Subject: deploy test\n\nheld, please\n")
    assert refused == {}
    deadline = time.monotonic() + 30
    while status()["messages"] < before + 1:
        assert time.monotonic() < deadline, "the message was not held"
        time.sleep(0.5)
    queue = subprocess.run(["postqueue", "-j"], capture_output=True, text=True,
                           check=True).stdout
    held = [json.loads(line) for line in queue.splitlines() if line.strip()]
    assert any(m["queue_name"] == "hold" and m["recipients"][0]["address"]
               == "alice@customer.example" for m in held)

    # the poller's Prometheus endpoint, where the role opened it, agrees
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen("http://127.0.0.1:9469/metrics", timeout=30) as answer:
        families = text_string_to_metric_families(answer.read().decode())
    held = {s.labels["domain"]: s.value for f in families for s in f.samples
            if s.name == "flushctl_held_messages"}
    assert held == {"customer.example": status()["messages"], ODMR_DOMAIN: 0}

    finger = subprocess.run(["finger", "customer.example@127.0.0.1"], capture_output=True,
                            text=True, timeout=60).stdout
    assert "customer.example:" in finger and "message(s)" in finger, finger
    assert "does not answer" in finger  # nothing listens at the example relay

    # an admin who is not root releases through the helper: the same
    # answer as root's (exit 3: the customer's server does not answer)
    flush = subprocess.run(["runuser", "-u", ADMIN, "--", "/usr/local/sbin/flushctl",
                            "flush", "customer.example"], capture_output=True, text=True,
                           timeout=120)
    assert flush.returncode == 3 and "not reachable" in flush.stderr, flush
    assert f"role=admin uid={pwd.getpwnam(ADMIN).pw_uid}" in \
        Path("/var/log/flushctl/helper.log").read_text()
    # a local user outside the helper's group cannot even ask
    flush = subprocess.run(["runuser", "-u", "nobody", "--", "/usr/local/sbin/flushctl",
                            "flush", "customer.example"], capture_output=True, text=True,
                           timeout=120)
    assert flush.returncode == 1 and "may not use the release helper" in flush.stderr, flush
    assert status()["messages"] >= 1     # still held

    subprocess.run(["/usr/local/sbin/flushctl", "purge", "customer.example", "--yes"],
                   check=True, capture_output=True, timeout=60)

    # only the release helper stays root, and its socket is root's and
    # the group's that the daemons' users and the admins are in
    st = os.stat("/run/flushctl/helper.sock")
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, grp.getgrgid(st.st_gid).gr_name) == (0, "flushctl")
    assert "flushctl-gateway" in grp.getgrnam("flushctl").gr_mem
    assert "flushctl-poller" in grp.getgrnam("flushctl").gr_mem
    helpers = [p for p in psutil.process_iter(["cmdline"])
               if (p.info["cmdline"] or [])[-3:] == ["--config", "/etc/flushctl/flushctl.toml",
                                                    "helper"]]
    assert len(helpers) == 1 and helpers[0].username() == "root"

    # the milter, the gateway and the poller run as the users the role
    # made, from the start (User=), with no capability they could ever
    # gain.
    [gateway] = deployed("gateway")
    unprivileged(gateway, "flushctl-gateway")
    # port 79 is bound by the helper and served by the gateway: nobody else holds it
    def listens_on_79(proc):
        try:
            return any(c.status == psutil.CONN_LISTEN and c.laddr.port == 79
                       for c in proc.net_connections("tcp"))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False
    holders = {p.pid for p in psutil.process_iter() if listens_on_79(p)}
    assert holders == {gateway.pid, helpers[0].pid}, holders
    for proc in deployed("milter"):
        proc_status = unprivileged(proc, "flushctl-milter")
        # in no group but its own: the postfix group reads SASL databases and maps
        assert proc_status["Groups"].split() == [str(pwd.getpwnam("flushctl-milter").pw_gid)], \
            proc_status["Groups"]
    milter_dir = os.stat("/var/spool/postfix/flushctl")
    assert (pwd.getpwuid(milter_dir.st_uid).pw_name, grp.getgrgid(milter_dir.st_gid).gr_name,
            stat.S_IMODE(milter_dir.st_mode)) == ("flushctl-milter", "postfix", 0o2750)

    # the poller probes customers and answers scrapes as its own user: it
    # was never root, and can gain no capability
    [scraper] = {c.pid for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == 9469}
    unprivileged(psutil.Process(scraper), "flushctl-poller")

    # ETRN asks the gateway over a socket only Postfix reaches
    policy = "/var/spool/postfix/private/flushctl-policy"
    st = os.stat(policy)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert pwd.getpwuid(st.st_uid).pw_name == "postfix"
    assert subprocess.run(["postconf", "-h", "smtpd_etrn_restrictions"], capture_output=True,
                          text=True, check=True).stdout.strip() == \
        "check_policy_service unix:private/flushctl-policy, reject"
    with smtplib.SMTP("127.0.0.1", 25, timeout=60) as smtp:
        smtp.ehlo("customer.example")
        code, text = smtp.docmd("ETRN", "customer.example")
    assert code == 250, (code, text)     # nothing held any more: Postfix got its answer

    # submission: a customer that logs in relays; nobody else does
    out = swaks()
    assert "<~* 554 5.7.1" in out and "Access denied" in out, out
    out = swaks("--auth", "PLAIN", "--auth-user", LOGIN, "--auth-password", "wrong")
    assert "<~* 535 5.7.8" in out, out
    out = swaks("--auth", "PLAIN", "--auth-user", LOGIN, "--auth-password", PASSWORD)
    assert "<~  235 2.7.0 Authentication successful" in out, out
    queued = re.search(r"<~  250 2.0.0 Ok: queued as (\w+)", out)
    assert queued, out
    # it went out toward elsewhere.example (no internet here): take it back
    subprocess.run(["postsuper", "-d", queued.group(1)], capture_output=True, timeout=60)

    portal_session()
    odmr_session(tmp_path)   # it deletes the login at its end


def portal_session():
    """The portal, deployed: its own user, no capability; a customer logs in
    over HTTP on loopback and sees its domain."""
    config = Path("/etc/flushctl/flushctl.toml").read_text()
    assert f'[portal]\nuser = "flushctl-portal"\nlisten = "127.0.0.1:{PORTAL_PORT}"\n' in config
    [portal] = deployed("portal")
    unprivileged(portal, "flushctl-portal")
    base = f"http://127.0.0.1:{PORTAL_PORT}"
    with urllib.request.urlopen(base + "/login", timeout=30) as r:
        assert r.status == 200 and b'name="password"' in r.read()
    req = urllib.request.Request(base + "/api/v1/login", method="POST",
                                 data=json.dumps({"user": ODMR_LOGIN,
                                                  "password": ODMR_PASSWORD}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        token = json.load(r)["token"]
    req = urllib.request.Request(base + "/api/v1/domains",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert [d["domain"] for d in json.load(r)["domains"]] == [ODMR_DOMAIN]


def odmr_session(tmp_path):
    """The ODMR customer's mail, held here, taken by fetchmail over port 366."""
    config = Path("/etc/flushctl/flushctl.toml").read_text()
    assert f'[odmr]\nuser = "flushctl-odmr"\nlisten = ["127.0.0.1:{ODMR_PORT}"]\n' in config
    assert f'[domains."{ODMR_DOMAIN}"]\nodmr = true\nusers = ["{ODMR_LOGIN}"]\n' in config
    logins = json.loads(subprocess.run([FLUSHCTL, "user", "list", "--json"], capture_output=True,
                                       text=True, timeout=60, check=True).stdout)
    [login] = [r for r in logins if r["user"] == ODMR_LOGIN]
    assert login["has_password"] is True and login["domains"] == [ODMR_DOMAIN], login
    assert stat.S_IMODE(os.stat("/var/lib/flushctl/logins").st_mode) & 0o077 == 0

    # the ODMR daemon holds port 366 itself: its own user, in the helper's
    # group, with the one capability that binds the port
    [odmr] = deployed("odmr")
    proc_status = unprivileged(odmr, "flushctl-odmr", caps=CAP_NET_BIND_SERVICE)
    assert str(grp.getgrnam("flushctl").gr_gid) in proc_status["Groups"].split()
    holders = {c.pid for c in psutil.net_connections("tcp")
               if c.status == psutil.CONN_LISTEN and c.laddr.port == ODMR_PORT}
    assert holders == {odmr.pid}, holders

    def odmr_mail():
        queue = subprocess.run(["postqueue", "-j"], capture_output=True, text=True,
                               check=True).stdout
        return [m for m in (json.loads(line) for line in queue.splitlines() if line.strip())
                if any(r["address"].endswith("@" + ODMR_DOMAIN) for r in m["recipients"])]

    sink = Sink()
    try:
        with smtplib.SMTP("127.0.0.1", 25, timeout=60) as smtp:
            refused = smtp.sendmail("someone@sender.example", [f"bob@{ODMR_DOMAIN}"],
                                    "Subject: deploy test odmr\n\nfor fetchmail\n")
        assert refused == {}
        wait_until(lambda: [m for m in odmr_mail() if m["queue_name"] == "hold"], 30,
                   what="the ODMR domain's message held")

        # the customer: smtp-sink as its MTA, fetchmail as its ODMR client
        sink.start()
        home = tmp_path / "fetchmail"
        home.mkdir()
        rc = f'poll 127.0.0.1 user "{ODMR_LOGIN}" password "{ODMR_PASSWORD}"\n'
        proc = subprocess.run(["fetchmail", "-f", "-", "--nosyslog", "-v", "-p", "ODMR",
                               "-P", str(ODMR_PORT), "--pidfile", str(home / "pid"),
                               "--fetchdomains", ODMR_DOMAIN,
                               "--smtphost", f"127.0.0.1/{sink.port}"],
                              input=rc, capture_output=True, text=True, timeout=180,
                              env=dict(os.environ, HOME=str(home)))
        logs = "\n".join(Path(f"/var/log/flushctl/{name}.log").read_text()[-3000:]
                         for name in ("odmr", "helper"))
        assert proc.returncode == 0, proc.stdout + proc.stderr + logs
        texts = wait_until(lambda: [t for t in sink.messages()
                                    if f"X-OnDemand-Domain: {ODMR_DOMAIN}" in t], 30,
                           what="the message at the customer's MTA")
        assert len(texts) == 1 and "Subject: deploy test odmr" in texts[0], texts
        # delivered: nothing left here (qmgr removes the queue file once the
        # ODMR daemon has passed the customer's 250 back: moments after the
        # sink has the message, and after fetchmail may have ended)
        wait_until(lambda: odmr_mail() == [], 30, what="the queue file removed")
    finally:
        sink.cleanup()
        if odmr_mail():
            subprocess.run([FLUSHCTL, "purge", ODMR_DOMAIN, "--yes"], capture_output=True,
                           timeout=60)
        forget_login()
