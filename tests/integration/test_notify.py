"""Notices to customers about their held mail, on a private Postfix: sent
through that Postfix itself (relayhost: a second smtp-sink, the address
of the customer's ops people), read back from that sink.  Short times
stand for hours and days: interval 3 s, digest every 6 s, stale after 8 s.

Attacks: no second "held" notice while the mail stays held; a notice to
a held domain is refused by the config (a loop); the notices' own
envelope sender is the null one (nothing bounces back to a customer).
"""

import re
import time

import pytest

from conftest import wait_until
from stack import Sink

PORTAL_URL = "https://portal.provider.test/held"


def notify_domains(sink_port: int) -> str:
    return f"""
[domains."customer.test"]
relay = "[127.0.0.1]:{sink_port}"
notify = ["ops@notify.test"]
notify_interval = "3s"
notify_stale_after = "8s"
quota_messages = 10
"""


@pytest.fixture
def notify_stack(make_stack):
    ops = Sink().start()
    extra = f"""
[notify]
check_every = 1
digest_every = "6s"
from = "postmaster@provider.test"
[portal]
listen = "127.0.0.1:1"
url = "{PORTAL_URL}"
"""
    stack = make_stack(domains=notify_domains, extra=extra,
                       extra_main={"relayhost": f"[127.0.0.1]:{ops.port}"})
    stack.ops = ops
    stack.start_helper()   # the keeper, and with it the notices
    yield stack
    ops.cleanup()


def notices(stack, kind=None) -> list[str]:
    found = [m for m in stack.ops.messages() if "X-Flushctl-Notice:" in m]
    return [m for m in found if kind is None or f"X-Flushctl-Notice: {kind};" in m]


def subject(text: str) -> str:
    return re.search(r"^Subject: (.*)$", text, re.M).group(1)


def test_an_offline_customer_hears_once_then_a_digest_quota_stale_and_refusals(notify_stack):
    stack = notify_stack
    for i in range(2):
        stack.send(["alice@customer.test"], sender=f"sender{i}@far.test", subject=f"m{i}")
    [held] = wait_until(lambda: notices(stack, "held"), 30, what="the held notice")
    assert subject(held) == "Mail for customer.test is being held (2 message(s))", held
    assert "X-Mail-Args: <>" in held or "MAIL FROM:<>" in held, held   # the null sender
    assert "To: ops@notify.test" in held and "From: postmaster@provider.test" in held
    assert f"{PORTAL_URL}/domains/customer.test" in held
    assert "Auto-Submitted: auto-generated" in held
    assert "sender0@far.test" in held   # the top senders
    # the customer is still offline: up to 90 % of the quota, then the quota notice
    for i in range(7):
        stack.send(["alice@customer.test"], subject=f"more {i}")
    [quota] = wait_until(lambda: notices(stack, "quota"), 30, what="the quota notice")
    assert "90% of its quota" in subject(quota), subject(quota)
    digest = wait_until(lambda: notices(stack, "digest"), 30, what="a digest")
    assert "9 message(s)" in subject(digest[0]), subject(digest[0])
    [stale] = wait_until(lambda: notices(stack, "stale"), 30, what="the stale notice")
    assert subject(stale) == "customer.test: mail held for more than 8 seconds"
    time.sleep(6)   # more than the interval: no second "held" nor "stale" (never empty since)
    assert len(notices(stack, "held")) == 1 and len(notices(stack, "stale")) == 1
    # the customer's server comes back half-restored and refuses everything
    stack.sink.start(refuse="hard")
    stack.flushctl("flush", "customer.test", check=False)
    [refused] = wait_until(lambda: notices(stack, "refused"), 60, what="the refused notice")
    assert subject(refused) == "customer.test: your server refused 9 message(s)"
    assert "Your server said:" in refused, refused
    # all delivered: the domain is empty; new mail after the interval: "held" again
    stack.sink.restart()
    stack.flushctl("flush", "customer.test")
    wait_until(lambda: stack.status("customer.test")[0]["messages"] == 0, 60, what="delivered")
    time.sleep(6)   # seen empty by the keeper (every 5 s), and the interval passed
    stack.send(["alice@customer.test"], subject="again")
    wait_until(lambda: len(notices(stack, "held")) == 2, 30, what="a second held notice")
    assert not [m for m in stack.ops.messages() if "X-Flushctl-Notice" not in m]


def test_the_webhook_gets_each_notice_signed_and_retried(make_stack, tmp_path):
    """A local HTTP server as the provider's ticket system: it fails the
    first delivery (500), then takes the retry; each body is signed with
    the shared secret (checked here), the poller makes the deliveries as
    its unprivileged user."""
    import hashlib
    import hmac
    import http.server
    import json
    import threading
    secret = b"webhook secret 7"
    (tmp_path / "hook.key").write_bytes(secret + b"\n")
    received, answers = [], [500]

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((body, self.headers.get("X-Flushctl-Signature")))
            code = answers.pop(0) if answers else 204
            self.send_response(code)
            self.end_headers()

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        def domains(sink_port):
            return f"""
[domains."customer.test"]
relay = "[127.0.0.1]:{sink_port}"
notify_webhook = "http://127.0.0.1:{server.server_port}/hook"
"""
        stack = make_stack(domains=domains, extra=f"""
[notify]
check_every = 1
webhook_secret_file = "{tmp_path / 'hook.key'}"
""", poller_extra="interval = 3600")
        stack.start_poller()
        stack.send(["alice@customer.test"], subject="for the webhook")
        wait_until(lambda: len(received) >= 2, 60, what="the delivery and its retry")
        for body, signature in received:
            expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(signature, expected)
            notice = json.loads(body)
            assert (notice["kind"], notice["domain"], notice["messages"]) == \
                ("held", "customer.test", 1)
        assert received[0][0] == received[1][0]   # the same notice, retried
        time.sleep(8)   # acknowledged: never sent again
        assert len(received) == 2
        log = stack.daemon_log("poller")
        assert "event=webhook" in log and "ok=False" in log and "ok=True" in log
        scrape = stack.scrape()
        counted = {dict(labels)["result"]: value for (name, labels), value in scrape.items()
                   if name == "flushctl_notifications_total"
                   and dict(labels).get("channel") == "webhook"}
        assert counted == {"failed": 1, "sent": 1}, counted
    finally:
        server.shutdown()


def test_a_webhook_that_cannot_be_signed_does_not_repeat_the_mail(notify_stack, tmp_path):
    """The webhook's secret gone after the start: the mail notice still
    goes out once (not at every look, as when the failed signing kept the
    notice from being recorded), the webhook is counted as failed."""
    stack = notify_stack
    key = tmp_path / "hook.key"
    key.write_text("secret\n")
    text = stack.config_path.read_text().replace(
        'notify = ["ops@notify.test"]',
        'notify = ["ops@notify.test"]\nnotify_webhook = "http://127.0.0.1:9/hook"').replace(
        "[notify]\n", f'[notify]\nwebhook_secret_file = "{key}"\n')
    stack.config_path.write_text(text)
    stack.stop_helper()
    key.unlink()
    stack.start_helper()
    stack.send(["alice@customer.test"], subject="one")
    wait_until(lambda: notices(stack, "held"), 30, what="the held notice")
    time.sleep(8)
    assert len(notices(stack, "held")) == 1
    assert "channel=webhook" in stack.daemon_log("helper")
