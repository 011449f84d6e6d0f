"""flushctl.heldmail.holdtag: the hold-tag contract in one place."""

import re

from flushctl.heldmail import holdtag


def test_a_tag_is_exactly_one_header_naming_a_domain():
    assert holdtag.tag_of(["Customer.Example."]) == "customer.example"
    assert holdtag.tag_of([" customer.example "]) == "customer.example"
    assert holdtag.tag_of([]) is None
    assert holdtag.tag_of(["a.example", "b.example"]) is None   # two: believed for neither
    assert holdtag.tag_of(["  "]) is None


def test_the_old_hold_mark_is_removed_coming_in_and_going_out():
    for rules in (holdtag.intake_rules(), holdtag.strip_rules()):
        [line] = rules.splitlines()
        pattern = re.fullmatch(r"/(.+)/ IGNORE", line).group(1)
        assert re.search(pattern, "X-OnDemand-Hold: 0123456789abcdef")
        assert not re.search(pattern, "X-OnDemand-Domain: customer.example")


def test_intake_drops_only_the_requeue_trace_of_the_mail_owner():
    rules = holdtag.intake_rules(requeue_uid=107).splitlines()
    assert len(rules) == 2
    pattern = re.fullmatch(r"/(.+)/ IGNORE", rules[0]).group(1)
    assert re.search(pattern, "Received: by mx.example (Postfix, from userid 107)")
    assert not re.search(pattern, "Received: by mx.example (Postfix, from userid 1000)")
    assert not re.search(pattern, "Received: from client.example (client [192.0.2.1])")
