"""The Prometheus endpoint (served by the poller), scraped and parsed with
prometheus-client's own parser: per-domain figures equal `flushctl status
--json`, each release counted under its trigger, counters kept across
restarts of every daemon."""

import subprocess
import time

import pytest

from conftest import wait_until


def metric(scraped, name, **labels):
    return scraped.get((name, frozenset(labels.items())))


def assert_matches_status(stack):
    scraped = stack.scrape()
    for row in stack.status():
        dom = row["domain"]
        assert metric(scraped, "flushctl_held_messages", domain=dom) == row["messages"], dom
        assert metric(scraped, "flushctl_held_bytes", domain=dom) == row["bytes"], dom
        age = metric(scraped, "flushctl_oldest_held_age_seconds", domain=dom)
        assert (age > 0) == (row["oldest_arrival"] is not None), dom
        reachable = metric(scraped, "flushctl_domain_reachable", domain=dom)
        assert reachable == (None if row["reachable"] is None else float(row["reachable"])), dom
    return scraped


def counters(scraped):
    return {(name, labels): value for (name, labels), value in scraped.items()
            if name.endswith("_total")}


def test_metrics_follow_status_through_every_trigger_and_restarts(make_stack):
    stack = make_stack(gateway=True, poller_extra="interval = 3600")
    for i in range(2):
        stack.send([f"user{i}@customer.test"])
    stack.send(["alice@listed.test"])
    stack.send(["a@small.test"])
    for rcpt in (["nobody@listed.test"], ["b@small.test"], ["c@small.test"]):
        try:   # unknown recipient (550, from Postfix's relay_recipient_maps), then
            #    small.test's quota of 2 (452, from the milter)
            stack.send(rcpt)
        except Exception:
            pass
    wait_until(lambda: len(stack.queue()) == 5, what="5 held")
    stack.start_poller()       # one cycle now: every server down
    wait_until(stack.metrics_up, 15, what="the endpoint")
    wait_until(lambda: metric(stack.scrape(), "flushctl_domain_reachable",
                              domain="customer.test") == 0, 15, what="a probe recorded")
    scraped = assert_matches_status(stack)
    assert metric(scraped, "flushctl_held_messages", domain="customer.test") == 2
    assert metric(scraped, "flushctl_held_messages", domain="listed.test") == 1
    assert metric(scraped, "flushctl_held_messages", domain="small.test") == 2
    assert metric(scraped, "flushctl_probes_total", domain="customer.test",
                  result="refused") == 1
    assert metric(scraped, "flushctl_quota_messages", domain="small.test") == 2
    # the milter's decisions: held ones at once, refusals within its keeper's 5 s
    assert metric(scraped, "flushctl_milter_decisions_total", result="held") == 5
    wait_until(lambda: metric(stack.scrape(), "flushctl_milter_decisions_total",
                              result="quota") == 1, 15, what="refusals counted")

    # one release by each trigger
    stack.sink.start()
    assert "Delivery started" in stack.finger("customer.test")
    proc = subprocess.run(
        ["fetchmail", "-f", "/dev/null", "-p", "ETRN", "--fetchdomains", "listed.test",
         "-P", str(stack.pf.smtpd_port), "127.0.0.1"], capture_output=True, text=True,
        timeout=120)
    assert "Queuing for listed.test started" in proc.stdout + proc.stderr, proc.stderr
    stack.flushctl("flush", "small.test")
    wait_until(lambda: not stack.queue(), 30, what="all delivered")
    stack.send(["user9@customer.test"])
    wait_until(lambda: len(stack.queue()) == 1, what="one more held")
    stack.flushctl("poller", "--once")          # another process: the same counters
    wait_until(lambda: not stack.queue(), 30, what="delivered")

    def released():
        scraped = stack.scrape()
        return {(d, t): metric(scraped, "flushctl_releases_total", domain=d, trigger=t)
                for d, t in (("customer.test", "finger"), ("listed.test", "etrn"),
                             ("small.test", "admin"), ("customer.test", "poller"))}
    assert released() == {("customer.test", "finger"): 1, ("listed.test", "etrn"): 1,
                          ("small.test", "admin"): 1, ("customer.test", "poller"): 1}
    wait_until(lambda: metric(stack.scrape(), "flushctl_gateway_requests_total",
                              protocol="finger", result="released") == 1
               and metric(stack.scrape(), "flushctl_gateway_requests_total",
                          protocol="etrn", result="released") == 1, 10,
               what="gateway requests counted")
    before = assert_matches_status(stack)
    assert all(metric(before, "flushctl_held_messages", domain=d) == 0
               for d in ("customer.test", "listed.test", "small.test"))

    # every daemon restarted: the counters are where they were
    stack.stop_milter()
    stack.stop_gateway()
    stack.stop_poller()
    stack.start_milter()
    stack.start_gateway()
    stack.start_poller()
    wait_until(stack.metrics_up, 15, what="the endpoint back")
    after = assert_matches_status(stack)
    kept = {k: v for k, v in counters(after).items() if not k[0].startswith("flushctl_probes")}
    assert kept == {k: v for k, v in counters(before).items()
                    if not k[0].startswith("flushctl_probes")}
    print(f"scraped {len(after)} samples; held per domain equal to status; releases "
          f"counted per trigger {sorted(released().values())}; counters kept over restarts")



@pytest.mark.parametrize("hashed", [False, True])
def test_the_all_domains_views_count_from_the_keepers_check_and_see_deletions(
        make_stack, monkeypatch, hashed):
    """With much held, the status of every domain and the scrape count from
    the ledger as the release helper's keeper last checked it against the
    hold queue (no listing of their own; the check asked of the helper):
    mail an admin deletes behind our back must leave them after the
    keeper's next check, in a hashed hold queue too."""
    from flushctl import config as config_mod
    from flushctl.heldmail import status as status_mod
    from flushctl.heldmail.library import HeldMail
    from flushctl.mta.queuefiles import QueueLayout
    stack = make_stack(extra_main={"hash_queue_names": "deferred, defer, hold"}
                       if hashed else None)
    for i in range(3):
        stack.send([f"u{i}@customer.test"])
    wait_until(lambda: len(stack.queue()) == 3, what="3 held")
    stack.start_helper()
    monkeypatch.setattr(status_mod, "LIST_FROM", 1)   # "much held", in this process
    listed = []
    real = QueueLayout.ids
    monkeypatch.setattr(QueueLayout, "ids", lambda self, q: listed.append(q) or real(self, q))
    od = HeldMail(config_mod.load(str(stack.config_path)))
    # the helper's keeper's check, asked over its socket
    wait_until(lambda: od.trusted_check(time.time()) is not None, 20,
               what="the keeper's check")

    def held():
        return {s.domain: s.messages for s in od.status_all() if s.messages}
    assert held() == {"customer.test": 3} and listed == []
    victim = stack.queue()[0]["queue_id"]
    stack.pf.run("postsuper", "-c", str(stack.pf.config_directory), "-d", victim)
    wait_until(lambda: held() == {"customer.test": 2}, 30, what="the deletion counted")
    assert listed == [] and victim not in od.ledger.all_ids()   # the keeper forgot it
    assert {s.domain: s.messages for s in od.status_all(exact=True) if s.messages} == \
        {"customer.test": 2} and listed == ["hold"]
    print(f"hashed={hashed}: a held message deleted with postsuper -d left the all-domains "
          "view after the keeper's next check, with no listing of its own")
