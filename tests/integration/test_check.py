"""`flushctl check`: one line per problem, nothing when all is well."""

import json
import sqlite3
import sys
from pathlib import Path

import pytest

from conftest import wait_until

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dnsserver import DNSServer  # noqa: E402

DOMAINS = ("customer.test", "listed.test", "small.test")


@pytest.fixture
def checked(make_stack):
    dns = DNSServer().start()
    for name in DOMAINS:  # we are each customer's backup MX
        dns.records[(name, "MX")] = [(10, f"mail.{name}"), (20, "mx.provider.test")]
    stack = make_stack(gateway=True, poller_extra=f'nameservers = ["127.0.0.1:{dns.port}"]')
    stack.start_poller()
    wait_until(lambda: "event=start" in (stack.state_dir / "poller.log").read_text(), 15,
               what="poller started")
    stack.dns = dns
    yield stack
    dns.stop()


def check(stack, *args):
    proc = stack.flushctl("check", *args, check=False)
    return proc.returncode, proc.stdout


def test_all_well(checked):
    code, out = check(checked)
    assert code == 0, out
    assert out.startswith("all well: postfix, settings, milter, gateway finger"), out
    code, out = check(checked, "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"] and data["problems"] == []
    assert {"mx", "helper", "poller", "metrics"} <= set(data["checks"])


def test_each_problem_is_one_line(checked):
    checked.stop_poller()
    checked.stop_gateway()
    checked.stop_helper()
    checked.dns.records[("small.test", "MX")] = [(10, "mx.elsewhere.test")]
    checked.pf.postconf("-e", "smtpd_milters=")
    code, out = check(checked)
    lines = out.splitlines()
    assert code == 1
    assert any(line.startswith("settings: Postfix differs") and "smtpd_milters" in line
               for line in lines), out
    assert any(line.startswith("gateway finger: nothing accepts connections") for line in lines)
    assert any(line.startswith("gateway policy: nothing accepts connections") for line in lines)
    assert any(line.startswith("poller: no `flushctl poller` process") for line in lines)
    assert any(line.startswith("helper: nothing accepts connections") for line in lines), out
    assert "mx: small.test: MX mx.elsewhere.test names none of our hosts (mx.provider.test)" \
        in lines, out
    assert len(lines) == 6, out
    data = json.loads(check(checked, "--json")[1])
    assert data["ok"] is False and len(data["problems"]) == 6


def test_a_gateway_that_is_gone_is_missed_though_its_ports_answer(checked):
    """The helper keeps the gateway's sockets open while no gateway runs:
    they accept connections that nobody answers. check says so."""
    checked.stop_gateway()
    code, out = check(checked)
    lines = out.splitlines()
    assert code == 1
    assert lines == [f"gateway: no `flushctl gateway` process for {checked.config_path}: "
                     "the helper holds its sockets, queries wait unanswered"], out
    checked.start_gateway()
    assert check(checked)[0] == 0


def test_ledger_that_lost_rows_is_caught_and_mended(checked):
    for i in range(3):
        checked.send([f"user{i}@customer.test"])
    wait_until(lambda: len(checked.queue()) == 3, what="3 held")
    db = sqlite3.connect(checked.state_dir / "ledger.sqlite3")
    with db:
        db.execute("DELETE FROM messages WHERE queue_id IN "
                   "(SELECT queue_id FROM messages LIMIT 2)")
        db.execute("UPDATE domains SET messages = 1 WHERE domain = 'customer.test'")
    db.close()
    assert checked.status("customer.test")[0]["messages"] == 1   # the lost rows show
    code, out = check(checked)
    assert code == 1 and "ledger: lacked 2 held message(s) of ours" in out, out
    assert checked.status("customer.test")[0]["messages"] == 3   # exact again
    code, out = check(checked)
    assert code == 0, out
