"""A customer changes where its mail goes in the portal, on a private
Postfix with the milter, the helper, the poller and the portal running.

The promise: from the change on, the domain's mail goes to the new
target, the mail held before it included, and mail that had already been
sent toward the old target and deferred there (the old complaint: queued
mail kept going to the old one).  Attacks: a domain whose relay is the
provider's, another customer's domain, next hops that are this host, a
private address, a port no mail server listens on, text that is no next
hop, a form without the CSRF token, changes in a burst; a change cut
short between the map and the file that records it; an apply afterwards.
"""

import json
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from conftest import free_port, wait_until
from stack import Sink
from test_portal import OTHER_PASSWORD, call, login, start

NEW_HOST = "127.0.0.2"   # the customer's new server: loopback, but not this Postfix's address


def relay_domains(sink_port: int) -> str:
    return f"""
[domains."customer.test"]
relay = "[127.0.0.1]:{sink_port}"
users = ["cust1"]
relay_editable = true

[domains."other.test"]
relay = "[127.0.0.1]:{sink_port}"
users = ["cust2"]
"""


ALLOW = 'relay_allow = ["127.0.0.0/29"]'   # loopback stands for the internet here


@pytest.fixture
def new_sink():
    sink = Sink(host=NEW_HOST).start()
    yield sink
    sink.cleanup()


def transport_value(stack, key: str) -> str:
    """What Postfix's transport map answers for ``key`` (postmap -q)."""
    proc = subprocess.run(["postmap", "-c", str(stack.pf.config_directory), "-q", key,
                           f"hash:{stack.pf.config_directory}/flushctl/transport"],
                          capture_output=True, text=True)
    return proc.stdout.strip()


def in_hold(stack, n: int) -> bool:
    queue = stack.queue()
    return len(queue) == n and all(e["queue_name"] == "hold" for e in queue)


def refused_with(stack, path: str, data: bytes, headers: dict) -> int:
    """The status of a POST that must fail."""
    req = urllib.request.Request(stack.portal_url + path, data=data, method="POST",
                                 headers=headers)
    try:
        urllib.request.urlopen(req, timeout=30)
    except urllib.error.HTTPError as exc:
        return exc.code
    raise AssertionError(f"{path}: taken")


def change(stack, token, relay: str, domain="customer.test"):
    return call(stack, "POST", f"/api/v1/domains/{domain}/relay", {"relay": relay}, token=token)


def test_held_and_deferred_mail_goes_to_the_new_relay_only(make_stack, new_sink):
    stack = start(make_stack, extra=ALLOW, domains=relay_domains)
    old = stack.sink.start(refuse="soft")   # the old server: up, but tempfails every RCPT
    token = login(stack)
    for i in range(3):
        stack.send(["alice@customer.test"], subject=f"before {i}")
    wait_until(lambda: in_hold(stack, 3), 30, what="three held")
    # delivered toward the old relay, tempfailed there, held again by the keeper
    status, body = call(stack, "POST", "/api/v1/domains/customer.test/release", token=token)
    assert status == 200 and body["outcome"]["released"] == 3, body
    wait_until(lambda: "status=deferred" in stack.pf.log() and in_hold(stack, 3), 60,
               what="the old relay's tempfail, and the mail held again")
    assert stack.status("customer.test")[0]["backoff_until"] is not None
    stack.send(["bob@customer.test"], subject="held since")
    wait_until(lambda: in_hold(stack, 4), 30, what="four held")

    status, body = change(stack, token, f"[{NEW_HOST}]:{new_sink.port}")
    assert status == 200, body
    assert body == {"relay": f"[{NEW_HOST}]:{new_sink.port}", "warning": ""}
    assert transport_value(stack, "customer.test") == f"ondemand:[{NEW_HOST}]:{new_sink.port}"
    assert transport_value(stack, ".customer.test") == f"ondemand:[{NEW_HOST}]:{new_sink.port}"
    assert transport_value(stack, "other.test") == f"ondemand:[127.0.0.1]:{old.port}"
    row = stack.status("customer.test")[0]
    assert row["backoff_until"] is None and row["reachable"] is None   # the old one's
    status, body = call(stack, "GET", "/api/v1/domains/customer.test", token=token)
    assert (body["relay"], body["relay_configured"]) == (f"[{NEW_HOST}]:{new_sink.port}",
                                                         f"[127.0.0.1]:{old.port}")
    assert body["relay_editable"] is True and body["relay_changed"] > 0

    old.restart()   # the old server takes mail again: none may reach it
    status, body = call(stack, "POST", "/api/v1/domains/customer.test/release", token=token)
    assert status == 200 and body["outcome"]["released"] == 4, body
    assert body["outcome"]["target"] == f"{NEW_HOST}:{new_sink.port}"
    wait_until(lambda: len(new_sink.messages()) == 4, 60, what="four at the new relay")
    wait_until(lambda: stack.queue() == [], 30, what="an empty queue")
    subjects = sorted(m.split("Subject: ")[1].split("\n")[0] for m in new_sink.messages())
    assert subjects == ["before 0", "before 1", "before 2", "held since"]
    assert old.messages() == []
    # new mail takes the new way too
    stack.send(["carol@customer.test"], subject="after")
    wait_until(lambda: in_hold(stack, 1), 30, what="held after the change")
    assert call(stack, "POST", "/api/v1/domains/customer.test/release", token=token)[0] == 200
    wait_until(lambda: len(new_sink.messages()) == 5, 60, what="the new mail at the new relay")
    assert old.messages() == []

    # back to the provider's setting (after the pause between two changes)
    time.sleep(10)
    status, body = change(stack, token, "")
    assert status == 200 and body["relay"] == f"[127.0.0.1]:{old.port}", body
    assert transport_value(stack, "customer.test") == f"ondemand:[127.0.0.1]:{old.port}"
    stack.send(["dave@customer.test"], subject="back")
    wait_until(lambda: in_hold(stack, 1), 30, what="held after the reset")
    assert call(stack, "POST", "/api/v1/domains/customer.test/release", token=token)[0] == 200
    wait_until(lambda: len(old.messages()) == 1, 60, what="the old relay's mail")
    assert len(new_sink.messages()) == 5


def test_the_poller_knocks_at_the_new_relay(make_stack, new_sink):
    """The unprivileged poller probes where the customer pointed the mail,
    and releases it there by itself."""
    stack = make_stack(domains=relay_domains, extra=(
        f"[portal]\nlisten = \"127.0.0.1:{free_port()}\"\nsecure_cookie = false\n{ALLOW}\n"),
        gateway=True, poller_extra="interval = 2")
    stack.flushctl("user", "add", "cust1", input="portal secret 1\n")
    stack.start_poller()
    stack.start_portal()
    token = login(stack)
    stack.send(["alice@customer.test"], subject="waiting")   # the old server is down
    wait_until(lambda: in_hold(stack, 1), 30, what="held")
    time.sleep(5)
    assert new_sink.started() == 0 and in_hold(stack, 1)
    assert change(stack, token, f"[{NEW_HOST}]:{new_sink.port}")[0] == 200
    wait_until(lambda: len(new_sink.messages()) == 1, 60, what="the poller's release")
    row = stack.status("customer.test")[0]
    assert row["last_flush_trigger"] == "poller", row


def test_what_a_customer_may_not_point_its_mail_at(make_stack, new_sink):
    stack = start(make_stack, extra=ALLOW, domains=relay_domains)
    token = login(stack)
    configured = transport_value(stack, "customer.test")
    refused = {
        "not a next hop": "must be",
        "[127.0.0.1]:22": "port 22",
        f"[127.0.0.1]:{stack.pf.smtpd_port}": "this host",   # this Postfix itself
        f"[{stack.pf.address}]:{stack.sink.port}": "this host",
        "[10.1.2.3]:25": "not an address on the internet",
        "[127.0.0.9]:2525": "not an address on the internet",   # outside relay_allow
        "[::1]:2525": "this host",
        "[fd00::1]:2525": "not an address on the internet",
        "nosuch.invalid:25": "",
        "[" + "1" * 400 + "]:25": "",
    }
    for text, words in refused.items():
        status, body = change(stack, token, text)
        assert status == 400, (text, status, body)
        assert words in body["error"], (text, body)
    # the relay of a domain the provider did not open, and another customer's domain
    other = login(stack, "cust2", OTHER_PASSWORD)
    status, body = change(stack, other, f"[{NEW_HOST}]:{new_sink.port}", domain="other.test")
    assert status == 403 and "provider" in body["error"], body
    assert change(stack, token, f"[{NEW_HOST}]:{new_sink.port}", domain="other.test")[0] == 403
    # not JSON: refused before anything is asked
    assert refused_with(stack, "/api/v1/domains/customer.test/relay", b"relay=x",
                        {"Authorization": f"Bearer {token}", "Content-Type": "text/plain"}) == 415
    # the page's form without the session's CSRF token
    form = urllib.parse.urlencode({"relay": f"[{NEW_HOST}]:{new_sink.port}"}).encode()
    req = urllib.request.Request(stack.portal_url + "/domains/customer.test/relay", data=form,
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.url.endswith("/login") or r.status == 403
    except urllib.error.HTTPError as exc:
        assert exc.code == 403
    assert transport_value(stack, "customer.test") == configured
    assert transport_value(stack, "other.test") == configured
    assert not (stack.pf.config_directory / "flushctl" / "relays.json").exists()
    status, body = change(stack, token, "[" + "1" * 301 + "]:25")
    assert status == 400 and "at most 300" in body["error"], body
    # changes in a burst: the second waits
    reloads = stack.pf.log().count("reload -- version")
    assert change(stack, token, f"[{NEW_HOST}]:{new_sink.port}")[0] == 200
    status, body = change(stack, token, f"[{NEW_HOST}]:{new_sink.port + 1}")
    assert status == 429 and "wait" in body["error"], body
    assert transport_value(stack, "customer.test") == f"ondemand:[{NEW_HOST}]:{new_sink.port}"
    # the same target again, later: nothing to do, no reload
    wait_until(lambda: stack.pf.log().count("reload -- version") == reloads + 1, 30,
               what="one reload")
    time.sleep(10)
    assert change(stack, token, f"[{NEW_HOST}]:{new_sink.port}")[0] == 200
    time.sleep(3)
    assert stack.pf.log().count("reload -- version") == reloads + 1


def test_refused_tries_are_counted_too(make_stack):
    """20 tries a minute per domain, refused ones too: refusals say which
    names are not on the internet, so they cannot be asked without end."""
    stack = start(make_stack, extra=ALLOW, domains=relay_domains)
    token = login(stack)
    for n in range(20):
        status, body = change(stack, token, f"[10.1.2.{n + 1}]:25")
        assert status == 400 and "not an address on the internet" in body["error"], body
    status, body = change(stack, token, "[10.1.2.99]:25")
    assert status == 429 and "too many tries" in body["error"], body


def test_a_change_cut_short_and_an_apply_afterwards(make_stack, new_sink):
    """The map rewritten but the file not (the helper killed between the
    two): the helper's next start puts the map back to what the file and
    the config say.  An apply keeps the customer's relay; an apply of a
    config that no longer lets the customer choose drops it."""
    from flushctl.config import relay_text
    from flushctl.mta.commands import Postfix
    from flushctl.mta.relay_change import _write_transport
    from dataclasses import replace
    stack = start(make_stack, extra=ALLOW, domains=relay_domains)
    cfg = stack.cfg
    configured = transport_value(stack, "customer.test")
    elsewhere = replace(cfg.domains["customer.test"], relay=relay_text(f"[{NEW_HOST}]:2999"))
    assert _write_transport(cfg, Postfix(str(stack.pf.config_directory)), [elsewhere])
    assert transport_value(stack, "customer.test") == f"ondemand:[{NEW_HOST}]:2999"
    stack.stop_portal()
    stack.stop_poller()
    stack.stop_gateway()   # each ends with the helper
    stack.stop_helper()
    stack.start_helper()
    stack.start_gateway()
    assert transport_value(stack, "customer.test") == configured
    assert "event=relay_reconciled domains=customer.test" in stack.daemon_log("helper")

    stack.start_portal()
    token = login(stack)
    assert change(stack, token, f"[{NEW_HOST}]:{new_sink.port}")[0] == 200
    wanted = f"ondemand:[{NEW_HOST}]:{new_sink.port}"
    stack.flushctl("apply")
    assert transport_value(stack, "customer.test") == wanted
    stack.send(["alice@customer.test"], subject="after apply")
    wait_until(lambda: in_hold(stack, 1), 30, what="held")
    assert call(stack, "POST", "/api/v1/domains/customer.test/release", token=token)[0] == 200
    wait_until(lambda: len(new_sink.messages()) == 1, 60, what="delivered to the new relay")
    # a config applied that the running helper did not load: no change until it does
    time.sleep(10)
    stack.config_path.write_text(stack.config_path.read_text() + "# edited\n")
    stack.flushctl("apply")
    status, body = change(stack, token, "")
    assert status == 429 and "try again later" in body["error"], body
    assert transport_value(stack, "customer.test") == wanted
    # the admin takes the choice back: the configured relay again at the next apply,
    # and the choice is gone from the file
    text = stack.config_path.read_text().replace("relay_editable = true\n", "")
    stack.config_path.write_text(text)
    stack.flushctl("apply")
    assert transport_value(stack, "customer.test") == configured
    data = json.loads((stack.pf.config_directory / "flushctl" / "relays.json").read_text())
    assert data == {"domains": {}}


def test_in_a_browser_a_customer_moves_its_mail(make_stack, new_sink, browser):
    """The domain page's form: a next hop refused in words, then one taken;
    a form with a forged CSRF token through the browser's own cookie
    changes nothing; the admin sees who chose the relay."""
    from selenium.webdriver.common.by import By
    from test_portal import ARTIFACTS, PASSWORD, _click, _login_page
    stack = start(make_stack, extra=ALLOW, domains=relay_domains)
    _login_page(browser, stack, "cust1", PASSWORD)
    browser.get(stack.portal_url + "/domains/customer.test")
    assert "as your provider set it" in browser.find_element(By.ID, "relay-now").text
    field = browser.find_element(By.ID, "relay")
    field.clear()
    field.send_keys("[10.9.9.9]:25")
    _click(browser, By.ID, "change-relay")
    assert "Nothing changed" in browser.find_element(By.CSS_SELECTOR, ".flash").text
    assert "not an address on the internet" in browser.find_element(By.CSS_SELECTOR, ".flash").text
    cookie = browser.get_cookie("flushctl_session")
    form = {"csrf": "forged", "relay": f"[{NEW_HOST}]:{new_sink.port}"}
    assert refused_with(stack, "/domains/customer.test/relay",
                        urllib.parse.urlencode(form).encode(),
                        {"Cookie": f"flushctl_session={cookie['value']}",
                         "Content-Type": "application/x-www-form-urlencoded"}) == 403
    assert transport_value(stack, "customer.test") == f"ondemand:[127.0.0.1]:{stack.sink.port}"

    field = browser.find_element(By.ID, "relay")
    field.clear()
    field.send_keys(f"[{NEW_HOST}]:{new_sink.port}")
    _click(browser, By.ID, "change-relay")
    flash = browser.find_element(By.CSS_SELECTOR, ".flash").text
    assert f"Your mail goes to [{NEW_HOST}]:{new_sink.port} from now on" in flash, flash
    assert f"[{NEW_HOST}]:{new_sink.port}" in browser.find_element(By.ID, "relay-now").text
    assert browser.find_element(By.ID, "reset-relay")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "portal-relay.png"))
    assert transport_value(stack, "customer.test") == f"ondemand:[{NEW_HOST}]:{new_sink.port}"
    listed = {d["domain"]: d for d in json.loads(stack.flushctl("domains", "--json").stdout)}
    assert listed["customer.test"]["relay"] == f"[{NEW_HOST}]:{new_sink.port}"
    assert listed["customer.test"]["relay_chosen"] is True
    assert listed["other.test"]["relay_chosen"] is False
    assert "user=cust1 via=portal changed=yes" in stack.daemon_log("helper")
    # another customer's page has no such form
    _login_page(browser, stack, "cust2", OTHER_PASSWORD)
    browser.get(stack.portal_url + "/domains/other.test")
    assert not browser.find_elements(By.ID, "relay")
