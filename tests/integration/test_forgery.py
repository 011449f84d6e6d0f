"""Nothing forgeable (issue 15, item 1): no header decides that mail is
held or whose it is.

Earlier versions held requeued mail by ``X-OnDemand-Hold: SECRET``; a
bounce of released mail quoted that header, and with it anybody could put
mail for any address of this host on hold, charged to a customer and
delivered by that customer's next release.  The attack below takes every
header of ours from a message held right now (more than any bounce ever
quoted) and sends it on, by SMTP and by local submission, beside mail for
another domain of this host: it failed on the code before (the forged
mail was held and counted as the customer's).
"""

from __future__ import annotations

import re
import subprocess
import time

from conftest import wait_until


def one_customer(sink_port: int) -> str:
    return f'[domains."customer.test"]\nrelay = "[127.0.0.1]:{sink_port}"\n'


def our_headers(stack, queue_id: str) -> list[str]:
    """Every X-OnDemand-* header line of a queued message."""
    text = stack.pf.run("postcat", "-c", str(stack.pf.config_directory), "-hq", queue_id).stdout
    return re.findall(r"^X-OnDemand-[A-Za-z-]*:.*$", text, re.MULTILINE | re.IGNORECASE)


def queued(stack, address: str) -> list[dict]:
    return [m for m in stack.queue() if any(r["address"] == address for r in m["recipients"])]


def beside_another_domain(make_stack, tmp_path, hold_rule: str):
    """customer.test, and the admin's own relay domain other.test (its server
    down: its mail waits, deferred), with the admin's own HOLD rule."""
    admin_checks = tmp_path / "admin_header_checks"
    admin_checks.write_text(hold_rule + "\n")
    return make_stack(domains=one_customer,
                      extra_main={"relay_domains": "other.test",
                                  "transport_maps": "inline:{other.test=smtp:[127.0.0.1]:9}",
                                  "header_checks": f"regexp:{admin_checks}"})


def test_headers_taken_from_held_mail_hold_nothing_and_charge_nobody(make_stack, tmp_path):
    # the admin's own rule that holds some mail: a second way into the hold queue
    stack = beside_another_domain(make_stack, tmp_path,
                                  "/^Subject: quarantine me/ HOLD admin's quarantine")
    stack.start_poller()   # the keeper: what it takes in, it takes in here
    stack.send(["alice@customer.test"], subject="the customer's own")
    wait_until(lambda: stack.status("customer.test")[0]["messages"] == 1, 20, what="held")
    (held,) = queued(stack, "alice@customer.test")
    assert held["queue_name"] == "hold"
    stolen = our_headers(stack, held["queue_id"])
    assert any(h.lower().startswith("x-ondemand-domain:") for h in stolen), stolen
    # what an attacker sends: every header of ours on that message, and the
    # hold header of earlier versions with the value it had here, if any
    forged = "\n".join(stolen + ["X-OnDemand-Domain: customer.test",
                                 "X-OnDemand-Hold: " + "0123456789abcdef" * 2]) + "\n"

    stack.send(["victim@other.test"], sender="attacker@sender.test", subject="forged smtp",
               extra_headers=forged)
    subprocess.run(["/usr/sbin/sendmail", "-C", str(stack.pf.config_directory),
                    "-f", "local-user@provider.test", "victim2@other.test"],
                   input=f"{forged}Subject: forged sendmail\n\nhello\n",
                   text=True, check=True, timeout=30)
    stack.send(["victim3@other.test"], sender="attacker@sender.test",
               subject="quarantine me", extra_headers=forged)
    # a local user's mail for the customer, with a tag naming another domain
    subprocess.run(["/usr/sbin/sendmail", "-C", str(stack.pf.config_directory),
                    "-f", "local-user@provider.test", "bob@customer.test"],
                   input="X-OnDemand-Domain: other.test\nSubject: local, mis-tagged\n\nhi\n",
                   text=True, check=True, timeout=30)
    wait_until(lambda: all(queued(stack, a) for a in
                           ("victim@other.test", "victim2@other.test", "victim3@other.test")),
               20, what="the forged mail queued")
    time.sleep(3)   # the keeper's passes (every second here) see it all

    # held: only the customer's own and the admin's quarantine, not by a header
    for address in ("victim@other.test", "victim2@other.test"):
        (msg,) = queued(stack, address)
        assert msg["queue_name"] != "hold", (address, msg)
        assert our_headers(stack, msg["queue_id"]) == [], address   # removed at intake
    (quarantined,) = queued(stack, "victim3@other.test")
    assert quarantined["queue_name"] == "hold"
    assert our_headers(stack, quarantined["queue_id"]) == []
    # charged to nobody but the customer, for its own two: the local one held
    # at once, tagged right
    wait_until(lambda: stack.status("customer.test")[0]["messages"] == 2, 20,
               what="the local submission held")
    (status,) = stack.status("customer.test")
    assert (status["messages"], status["queues"]) == (2, {"hold": 2}), status
    (local,) = queued(stack, "bob@customer.test")
    assert our_headers(stack, local["queue_id"]) == ["X-OnDemand-Domain: customer.test"]

    # the customer's next release sends its own mail, nothing of the attacker's
    stack.sink.start()
    out = stack.flushctl("flush", "customer.test").stdout
    assert "released 2" in out, out
    wait_until(lambda: len(stack.sink.messages()) == 2, 30, what="delivered")
    time.sleep(2)
    texts = sorted(stack.sink.messages(), key=lambda t: "local, mis-tagged" in t)
    assert "the customer's own" in texts[0] and "local, mis-tagged" in texts[1]
    for text in texts:
        assert text.count("X-OnDemand-Domain") == 1, text
        assert "X-OnDemand-Domain: customer.test" in text and "X-OnDemand-Hold" not in text
    assert len(stack.sink.messages()) == 2
    assert queued(stack, "victim3@other.test")[0]["queue_name"] == "hold"   # still the admin's
    assert queued(stack, "victim@other.test") and queued(stack, "victim2@other.test")


def test_mail_planted_under_the_old_secret_is_no_customers_after_the_upgrade(make_stack,
                                                                              tmp_path):
    """Earlier versions adopted held mail by the secret's header: mail an
    attacker planted with a leaked value was recorded as the customer's and
    would leave with its next release.  The first apply of this version
    (it finds the old secret and deletes it) checks every row again."""
    from flushctl.heldmail.ledger.store import Ledger
    stack = beside_another_domain(make_stack, tmp_path,
                                  "/^Subject: planted/ HOLD as the old secret's header did")
    stack.send(["alice@customer.test"], subject="the customer's own")
    stack.send(["victim@other.test"], sender="attacker@sender.test", subject="planted")
    wait_until(lambda: len([m for m in stack.queue() if m["queue_name"] == "hold"]) == 2,
               what="both held")
    (planted,) = queued(stack, "victim@other.test")
    # what the old keeper wrote for it: a row of the customer's
    ledger = Ledger(str(stack.state_dir))
    ledger.record(planted["queue_id"], "customer.test", planted["message_size"])
    ledger.close()
    assert stack.status("customer.test")[0]["messages"] == 2
    (stack.state_dir / "hold-secret").write_text("0123456789abcdef0123456789abcdef\n")

    stack.flushctl("apply")
    assert not (stack.state_dir / "hold-secret").exists()
    (status,) = stack.status("customer.test")
    assert status["messages"] == 1, status
    stack.sink.start()
    assert "released 1" in stack.flushctl("flush", "customer.test").stdout
    wait_until(lambda: len(stack.sink.messages()) == 1, 30, what="the customer's own delivered")
    assert queued(stack, "victim@other.test")[0]["queue_name"] == "hold"   # untouched
    assert stack.status("customer.test")[0]["messages"] == 0
