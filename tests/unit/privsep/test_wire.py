"""flushctl.privsep (wire, releases, accounts): what the root parent accepts from the
unprivileged child."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flushctl import config
from flushctl.privsep.accounts import account
from flushctl.privsep.errors import PrivsepError
from flushctl.privsep.wire import check_request

DOMAINS = {"customer.example": object()}


def req(**kw):
    base = {"id": 1, "domain": "customer.example", "trigger": "finger", "client": "192.0.2.1"}
    base.update(kw)
    return base


def test_a_good_request():
    assert check_request(req(), DOMAINS) == (1, "customer.example", "finger", "192.0.2.1", "")
    assert check_request({**req(), "login": "cust1"}, DOMAINS)[4] == "cust1"
    with pytest.raises(ValueError):
        check_request({**req(), "login": "no spaces"}, DOMAINS)
    with pytest.raises(ValueError):
        check_request({**req(), "login": 7}, DOMAINS)
    assert check_request(req(trigger="etrn", client="2001:db8::1"), DOMAINS)[2] == "etrn"
    assert check_request(req(client="unknown"), DOMAINS)[3] == "unknown"


def test_a_domain_not_served_is_for_the_gate_to_refuse():
    """The gateway may have read a newer config: a domain in canonical form
    is let through, to be refused (and answered) by the helper's gate."""
    assert check_request(req(domain="other.example"), DOMAINS)[1] == "other.example"


@pytest.mark.parametrize("bad", [
    req(domain="CUSTOMER.example"),           # not in canonical form
    req(domain="-x.example"),
    req(domain="customer.example -d ALL"),
    req(domain=["customer.example"]),
    req(trigger="admin"),                         # only the network triggers
    req(trigger="poller"),
    req(client="192.0.2.1; rm -rf /"),
    req(client=7),
    req(id="1"),
    req(id=True),
    {"id": 1, "domain": "customer.example", "trigger": "finger"},
    {**req(), "extra": 1},
    ["customer.example"],
    "customer.example",
])
def test_refused(bad):
    with pytest.raises(ValueError):
        check_request(bad, DOMAINS)


@given(st.dictionaries(st.sampled_from(["id", "domain", "trigger", "client", "x"]),
                       st.one_of(st.text(), st.integers(), st.none(), st.booleans())))
def test_anything_else_is_a_value_error_or_a_domain_name(data):
    from flushctl import names
    try:
        rid, domain, trigger, client, login = check_request(data, DOMAINS)
    except ValueError:
        return
    assert names.domain(domain) == domain and trigger in ("finger", "etrn", "peer", "report")


def test_account_refuses_root_and_strangers():
    with pytest.raises(PrivsepError, match="is root"):
        account("root")
    with pytest.raises(PrivsepError, match="does not exist"):
        account("no-such-user-here")
    assert account("nobody").pw_uid != 0


def test_config_user():
    assert config.parse("").gateway.user == "nobody"
    assert config.parse('[gateway]\nuser = "flushctl"').gateway.user == "flushctl"
    assert config.parse('[gateway]\nuser = ""').gateway.user == ""
    with pytest.raises(config.ConfigError, match="must not run as root"):
        config.parse('[gateway]\nuser = "root"')
    with pytest.raises(config.ConfigError, match="not a user name"):
        config.parse('[gateway]\nuser = "-o evil"')


# -- the root half decides again, and always answers ------------------------------

import asyncio  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402

from flushctl import config as config_mod  # noqa: E402
from flushctl.gateway.gate import Gate  # noqa: E402
from flushctl.privsep.releases import serve_releases  # noqa: E402

RESTRICTED = config_mod.parse("""
[domains."restricted.example"]
flush_from = ["192.0.2.0/24"]

[domains."open.example"]
""", "t.toml").domains


class Recording:
    """A releaser that records what it was asked (or raises)."""

    def __init__(self, raises=False):
        self.calls = []
        self.raises = raises

    async def trigger(self, domain, trigger, client, login=""):
        self.calls.append((domain, trigger, client))
        if self.raises:
            raise OSError("database or disk is full")
        return {"kind": "released", "domain": domain}

    async def add_counts(self, items):
        pass


def converse(requests, releaser, peers=frozenset(), burst=30):
    """A scripted child sends ``requests`` over the real socketpair protocol;
    the answers, by id."""
    parent_end, child_end = socket.socketpair()
    gate = Gate(RESTRICTED, per_minute=60, burst=burst, peers=peers)

    async def main():
        server = asyncio.create_task(serve_releases(
            parent_end, releaser, RESTRICTED, lambda o: o, gate,
            refused=lambda verdict: {"kind": "failed", "detail": f"refused: {verdict}"},
            failed=lambda text: {"kind": "failed", "detail": text}))
        reader, writer = await asyncio.open_unix_connection(sock=child_end)
        for item in requests:
            writer.write(json.dumps(item).encode() + b"\n")
        await writer.drain()
        answers = {}
        while len(answers) < len(requests):
            line = await asyncio.wait_for(reader.readline(), 10)
            reply = json.loads(line)
            answers[reply["id"]] = reply["outcome"]
        writer.close()
        await asyncio.wait_for(server, 10)
        return answers
    return asyncio.run(main())


def request(rid, domain, client, trigger="finger"):
    return {"id": rid, "domain": domain, "trigger": trigger, "client": client}


def test_a_hostile_network_half_cannot_pass_flush_from():
    rel = Recording()
    answers = converse([request(1, "restricted.example", "203.0.113.9"),
                        request(2, "restricted.example", "192.0.2.7"),
                        request(3, "open.example", "203.0.113.9")], rel)
    assert answers[1] == {"kind": "failed", "detail": "refused: not allowed"}
    assert answers[2]["kind"] == answers[3]["kind"] == "released"
    assert rel.calls == [("restricted.example", "finger", "192.0.2.7"),
                         ("open.example", "finger", "203.0.113.9")]


def test_a_hostile_network_half_cannot_claim_to_be_a_peer():
    rel = Recording()
    answers = converse([request(1, "restricted.example", "203.0.113.9", trigger="peer"),
                        request(2, "restricted.example", "198.51.100.2", trigger="peer")], rel,
                       peers=frozenset({"198.51.100.2"}))
    assert answers[1]["detail"] == "refused: not allowed"   # not a peer: ordinary rights
    assert rel.calls == [("restricted.example", "peer", "198.51.100.2")]


def test_a_hostile_network_half_cannot_flood():
    rel = Recording()
    answers = converse([request(i, "open.example", "203.0.113.9") for i in range(1, 11)], rel,
                       burst=3)
    assert sum(a["kind"] == "released" for a in answers.values()) == 3
    assert sum(a.get("detail") == "refused: rate limited" for a in answers.values()) == 7


def test_a_releaser_that_raises_still_answers():
    answers = converse([request(1, "open.example", "192.0.2.7"),
                        request(2, "open.example", "192.0.2.8")], Recording(raises=True))
    assert answers == {1: {"kind": "failed", "detail": "database or disk is full"},
                       2: {"kind": "failed", "detail": "database or disk is full"}}
