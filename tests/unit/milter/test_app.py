"""flushctl_milter.app: OnDemandMilter driven through pymilter's TestCtx.

TestCtx (Milter/testctx.py) stands in for libmilter.  Two gaps are filled
in a small subclass below:
- TestCtx.quarantine() raises (``raise NotImplemented``), so we record it;
- addheader()/chgheader() work on ``ctx._msg``, which only ``_feedFile``
  sets; ``_feedFile`` itself cannot be used because our header()/body()
  are @noreply and return NOREPLY, which ``_feedFile`` takes as a stop.
  So the steps are driven one by one and ``_msg`` is set by hand.
"""

import email
from io import BytesIO

import Milter
import pytest
from Milter import testctx

from flushctl import config
from flushctl.heldmail.ledger.store import Ledger
from flushctl_milter import app
from flushctl_milter import rules
from flushctl_milter.app import OnDemandMilter, Shared

CONFIG = """
[domains."customer.example"]
relay = "[mail.customer.example]:25"

[domains."second.example"]

[domains."listed.example"]
recipients = ["alice@listed.example"]

[domains."small.example"]
quota_messages = 1

[domains."tiny.example"]
quota_bytes = 200
"""

QUEUE_ID = "4jcczJ2wnFzJ9C2"
HOLD_HEADER = "X-OnDemand-Hold"
HEADER = "X-OnDemand-Domain"


class FakeOnDemand:
    def __init__(self, ledger):
        self.ledger = ledger
        self.located = []
        self.on_locate = None

    def locate(self, domain):
        self.located.append(domain)
        if self.on_locate:
            self.on_locate(domain)


class RecordingCtx(testctx.TestCtx):
    def __init__(self):
        super().__init__()
        self.quarantined = []
        self.added = []
        self.changed = []

    def quarantine(self, reason):  # TestCtx raises here
        self.quarantined.append(reason)

    def addheader(self, field, value, idx):
        self.added.append((field, value))
        return super().addheader(field, value, idx)

    def chgheader(self, field, idx, value):
        self.changed.append((field, idx, value))
        return super().chgheader(field, idx, value)


@pytest.fixture
def cfg():
    return config.parse(CONFIG, "/etc/flushctl/t.toml")


@pytest.fixture
def heldmail(tmp_path):
    led = Ledger(str(tmp_path / "state"))
    yield FakeOnDemand(led)
    led.close()


def make_shared(cfg, heldmail):
    return Shared(cfg, heldmail)


def domain_headers(ctx):
    return [(f, v) for f, v in ctx.added if f == HEADER]


@pytest.fixture(autouse=True)
def milter_setup(monkeypatch, cfg, heldmail):
    monkeypatch.setattr(OnDemandMilter, "shared", make_shared(cfg, heldmail), raising=False)
    monkeypatch.setattr(Milter, "factory", OnDemandMilter)


MESSAGE = (
    "From: sender@example.org\n"
    "To: alice@customer.example\n"
    "Subject: hello\n"
    "\n"
    "Hello there.\n"
)


def new_ctx(queue_id=QUEUE_ID):
    ctx = RecordingCtx()
    if queue_id is not None:
        ctx._setsymval("i", queue_id)
    assert ctx._connect() == Milter.CONTINUE
    return ctx


def send_data(ctx, text=MESSAGE):
    """Headers, end of headers, body, end of message; the eom result."""
    msg = email.message_from_string(text)
    ctx._msg = msg
    for name, value in msg.items():
        assert ctx._header(name, value) in (Milter.CONTINUE, Milter.NOREPLY)
    assert ctx._eoh() == Milter.CONTINUE
    body = msg.get_payload().encode()
    assert ctx._feed_body(BytesIO(body)) in (Milter.CONTINUE, Milter.NOREPLY)
    return ctx._eom()


def transaction(ctx, *rcpts, text=MESSAGE, sender="<sender@example.org>"):
    assert ctx._envfrom(sender) == Milter.CONTINUE
    for rcpt in rcpts:
        assert ctx._envrcpt(rcpt) == Milter.CONTINUE
    return send_data(ctx, text)


def expected_size(text, klass):
    msg = email.message_from_string(text)
    size = sum(len(n) + len(v) + 4 for n, v in msg.items()) + len(msg.get_payload().encode())
    return size + len(HEADER) + len(klass) + 4


# -- customer mail is tagged, held and recorded --------------------------------

def test_customer_message_is_tagged_quarantined_and_recorded(heldmail):
    ctx = new_ctx()
    rc = transaction(ctx, "<alice@customer.example>", "<bob@mx.customer.example>")
    assert rc == Milter.ACCEPT
    assert ctx._reply is None
    assert domain_headers(ctx) == [(HEADER, "customer.example")]
    assert ctx._msg.get_all(HEADER) == ["customer.example"]
    assert [f for f, v in ctx.added] == [HEADER]   # the tag only: no mark that holds
    assert ctx.changed == []
    assert len(ctx.quarantined) == 1
    assert "customer.example" in ctx.quarantined[0]

    (entry,) = heldmail.ledger.entries("customer.example")
    assert entry.queue_id == QUEUE_ID
    assert entry.domain == "customer.example"
    assert entry.size == expected_size(MESSAGE, "customer.example")
    state = heldmail.ledger.state("customer.example")
    assert (state.messages, state.bytes) == (1, entry.size)


def test_forged_header_is_deleted():
    text = (f"{HEADER}: evil.example\n" + MESSAGE)
    ctx = new_ctx()
    assert transaction(ctx, "<alice@customer.example>", text=text) == Milter.ACCEPT
    assert ctx.changed == [(HEADER, 1, "")]
    assert domain_headers(ctx) == [(HEADER, "customer.example")]
    assert ctx._msg.get_all(HEADER) == ["customer.example"]


def test_two_forged_headers_deleted_from_the_last():
    text = (f"{HEADER}: one.example\nx-ondemand-domain: two.example\n" + MESSAGE)
    ctx = new_ctx()
    assert transaction(ctx, "<alice@customer.example>", text=text) == Milter.ACCEPT
    assert ctx.changed == [(HEADER, 2, ""), (HEADER, 1, "")]
    assert ctx._msg.get_all(HEADER) == ["customer.example"]


def test_headers_of_ours_are_deleted_from_mail_that_is_no_customers():
    """Forged on mail for anyone else: removed too, and nothing added (the
    attack: a leaked mark beside victim@another-domain)."""
    text = (f"{HOLD_HEADER}: 0123456789abcdef\n{HEADER}: customer.example\n" + MESSAGE)
    ctx = new_ctx()
    assert transaction(ctx, "<victim@elsewhere.example>", text=text) == Milter.ACCEPT
    assert sorted(ctx.changed) == [(HEADER, 1, ""), (HOLD_HEADER, 1, "")]
    assert ctx.added == [] and ctx.quarantined == []
    assert ctx._msg.get_all(HEADER) is None and ctx._msg.get_all(HOLD_HEADER) is None


# -- refusals ------------------------------------------------------------------

def test_second_customer_domain_gets_452(heldmail):
    ctx = new_ctx()
    assert ctx._envfrom("<sender@example.org>") == Milter.CONTINUE
    assert ctx._envrcpt("<alice@customer.example>") == Milter.CONTINUE
    assert ctx._envrcpt("<carol@second.example>") == Milter.TEMPFAIL
    assert ctx._reply == ("452", "4.5.3", rules.SECOND_DOMAIN.text)
    # the first recipient's message still goes through and is held
    ctx._reply = None
    assert send_data(ctx) == Milter.ACCEPT
    assert domain_headers(ctx) == [(HEADER, "customer.example")]
    assert [e.queue_id for e in heldmail.ledger.entries("customer.example")] == [QUEUE_ID]
    assert heldmail.ledger.entries("second.example") == []


def test_non_customer_beside_customer_gets_452():
    ctx = new_ctx()
    ctx._envfrom("<sender@example.org>")
    assert ctx._envrcpt("<someone@stranger.example>") == Milter.CONTINUE
    assert ctx._envrcpt("<alice@customer.example>") == Milter.TEMPFAIL
    assert ctx._reply[:2] == ("452", "4.5.3")


def test_unknown_listed_recipient_gets_550():
    ctx = new_ctx()
    ctx._envfrom("<sender@example.org>")
    assert ctx._envrcpt("<mallory@listed.example>") == Milter.REJECT
    assert ctx._reply[:2] == ("550", "5.1.1")
    ctx._reply = None
    assert ctx._envrcpt("<Alice@listed.example>") == Milter.CONTINUE
    assert ctx._reply is None


def test_quota_messages_at_rcpt(heldmail):
    heldmail.ledger.record("AAAAAAAAAA", "small.example", 10)
    ctx = new_ctx()
    ctx._envfrom("<sender@example.org>")
    assert ctx._envrcpt("<x@small.example>") == Milter.TEMPFAIL
    assert ctx._reply[:2] == ("452", "4.2.2")
    # near the quota the queue is recounted through ondemand.locate
    assert heldmail.located == ["small.example"]


def test_quota_recount_can_free_room(heldmail):
    heldmail.ledger.record("AAAAAAAAAA", "small.example", 10)
    # the message was delivered meanwhile: the recount prunes it
    heldmail.on_locate = lambda domain: heldmail.ledger.forget(["AAAAAAAAAA"])
    ctx = new_ctx()
    ctx._envfrom("<sender@example.org>")
    assert ctx._envrcpt("<x@small.example>") == Milter.CONTINUE
    assert heldmail.located == ["small.example"]


def test_quota_recount_rate_limited(heldmail):
    heldmail.ledger.record("AAAAAAAAAA", "small.example", 10)
    shared = OnDemandMilter.shared
    assert shared.totals("small.example") == (1, 10)
    assert shared.totals("small.example") == (1, 10)
    assert heldmail.located == ["small.example"]     # once within QUOTA_RECHECK
    assert app.QUOTA_RECHECK > 0


def test_quota_bytes_at_eom(heldmail):
    ctx = new_ctx()
    text = MESSAGE + "x" * 300 + "\n"
    rc = transaction(ctx, "<x@tiny.example>", text=text)
    assert rc == Milter.TEMPFAIL
    assert ctx._reply[:2] == ("452", "4.2.2")
    assert ctx.added == []
    assert ctx.quarantined == []
    assert heldmail.ledger.entries("tiny.example") == []


def test_small_message_fits_byte_quota(heldmail):
    ctx = new_ctx()
    assert transaction(ctx, "<x@tiny.example>", text="Subject: s\n\nhi\n") == Milter.ACCEPT
    assert len(heldmail.ledger.entries("tiny.example")) == 1


# -- mail for nobody in particular ---------------------------------------------

def test_non_customer_mail_untouched(heldmail):
    ctx = new_ctx()
    rc = transaction(ctx, "<someone@stranger.example>", "<other@elsewhere.example>")
    assert rc == Milter.ACCEPT
    assert ctx.added == []
    assert ctx.changed == []
    assert ctx.quarantined == []
    assert ctx._msg.get_all(HEADER) is None
    assert heldmail.ledger.entries("stranger.example") == []
    with heldmail.ledger._lock:
        assert heldmail.ledger._db.execute("SELECT COUNT(*) FROM messages").fetchone() == (0,)


# -- missing queue id ----------------------------------------------------------

def test_missing_queue_id_macro_tempfails(heldmail):
    ctx = new_ctx(queue_id=None)
    rc = transaction(ctx, "<alice@customer.example>")
    assert rc == Milter.TEMPFAIL
    assert ctx._reply[:2] == ("451", "4.3.0")
    assert ctx.added == []
    assert ctx.quarantined == []
    assert heldmail.ledger.entries("customer.example") == []


def test_duplicate_queue_id_still_accepted(heldmail):
    # the ledger already knows this id (e.g. a retried eom): the row is not doubled
    heldmail.ledger.record(QUEUE_ID, "customer.example", 5, arrival=1.0)
    ctx = new_ctx()
    assert transaction(ctx, "<alice@customer.example>") == Milter.ACCEPT
    assert heldmail.ledger.state("customer.example").messages == 1


# -- several transactions on one connection ------------------------------------

def test_class_resets_between_transactions(heldmail):
    ctx = new_ctx()
    assert transaction(ctx, "<alice@customer.example>") == Milter.ACCEPT
    ctx._setsymval("i", "4jcczJ2xwpzJ9C3")
    ctx.added.clear()
    assert transaction(ctx, "<carol@second.example>") == Milter.ACCEPT
    assert domain_headers(ctx) == [(HEADER, "second.example")]
    assert [e.queue_id for e in heldmail.ledger.entries("second.example")] == \
        ["4jcczJ2xwpzJ9C3"]
    ctx._setsymval("i", "4jcczJ2v7dzJ9C1")
    ctx.added.clear()
    assert transaction(ctx, "<someone@stranger.example>") == Milter.ACCEPT
    assert ctx.added == []


def test_abort_resets_class():
    ctx = new_ctx()
    ctx._envfrom("<sender@example.org>")
    assert ctx._envrcpt("<alice@customer.example>") == Milter.CONTINUE
    milter = ctx.getpriv()
    assert milter.klass == "customer.example"
    assert milter.abort() == Milter.CONTINUE
    assert milter.klass is None
    assert milter.size == 0


# -- local submissions (sendmail): nothing refused, mixed mail left to the keeper

def connected_ctx(port, host="localhost", address="127.0.0.1"):
    """A connection as Postfix 3.7 presents it to us: no connect event (we
    ask to skip it), the client in the macros we ask for at RCPT."""
    ctx = RecordingCtx()
    ctx._setsymval("i", QUEUE_ID)
    for name, value in (("{client_name}", host), ("{client_addr}", address),
                        ("{client_port}", str(port))):
        ctx._setsymval(name, value)
    assert ctx._negotiate() == Milter.CONTINUE
    return ctx


def local_ctx():
    """A connection as Postfix presents non-SMTP mail: localhost, port 0."""
    return connected_ctx(0)


def test_local_mail_all_for_one_customer_is_held():
    ctx = local_ctx()
    assert transaction(ctx, "<alice@customer.example>") == Milter.ACCEPT
    assert domain_headers(ctx) == [(HEADER, "customer.example")]
    assert len(ctx.quarantined) == 1


@pytest.mark.parametrize("rcpts", [
    ["<alice@customer.example>", "<victim@elsewhere.example>"],   # a second domain
    ["<alice@customer.example>", "<carol@second.example>"],       # another customer
])
def test_local_mixed_mail_is_never_refused_and_left_to_the_keeper(heldmail, rcpts):
    ctx = local_ctx()
    assert ctx._envfrom("<root@mx.example>") == Milter.CONTINUE
    for rcpt in rcpts:
        assert ctx._envrcpt(rcpt) == Milter.CONTINUE   # a refusal would strand it in maildrop
    text = f"{HEADER}: forged.example\n" + MESSAGE
    assert send_data(ctx, text) == Milter.ACCEPT
    assert ctx._reply is None and ctx.quarantined == [] and domain_headers(ctx) == []
    assert ctx.changed == [(HEADER, 1, "")]              # still no forged tag
    assert heldmail.ledger.entries("customer.example") == []


def test_local_mail_over_quota_goes_on_untagged(heldmail):
    heldmail.ledger.record("AAAAAAAAAA", "small.example", 10)
    ctx = local_ctx()
    assert transaction(ctx, "<x@small.example>") == Milter.ACCEPT
    assert ctx._reply is None and ctx.quarantined == []
    assert [e.queue_id for e in heldmail.ledger.entries("small.example")] == ["AAAAAAAAAA"]


@pytest.mark.parametrize("host, address", [
    ("localhost", ("127.0.0.1", 40123)),          # SMTP from this host
    ("client.example", ("192.0.2.7", 0)),         # smtpd could not tell the port
])
def test_smtp_is_not_local_mail(heldmail, host, address):
    ctx = connected_ctx(address[1], host, address[0])
    assert ctx._envfrom("<s@example.org>") == Milter.CONTINUE
    assert ctx._envrcpt("<alice@customer.example>") == Milter.CONTINUE
    assert ctx._envrcpt("<victim@elsewhere.example>") == Milter.TEMPFAIL


# -- what we ask Postfix for: the fewest steps that do the job --------------------

def test_we_ask_for_rcpt_and_the_end_of_the_message_and_headers_and_body_unanswered():
    ctx = RecordingCtx()
    assert ctx._negotiate() == Milter.CONTINUE
    p = ctx._protocol
    for skipped in (Milter.P_NOCONNECT, Milter.P_NOHELO, Milter.P_NOMAIL, Milter.P_NODATA,
                    Milter.P_NOEOH, Milter.P_NOUNKNOWN, Milter.P_NR_HDR, Milter.P_NR_BODY):
        assert p & skipped, hex(skipped)
    for kept in (Milter.P_NORCPT, Milter.P_NR_RCPT, Milter.P_NOHDRS, Milter.P_NOBODY):
        assert not p & kept, hex(kept)   # recipients answered; headers and body seen
    # the client comes as macros with each RCPT
    assert sorted(ctx._symlist[Milter.M_ENVRCPT]) == [b"{client_addr}", b"{client_name}",
                                                      b"{client_port}"]


def test_without_macro_requests_connect_says_who_sent_it(heldmail):
    """An MTA that cannot be asked for macros keeps the connect event,
    and local mail is still told from SMTP."""
    import socket
    ctx = RecordingCtx()
    ctx._setsymval("i", QUEUE_ID)
    opts = [Milter.ADDHDRS | Milter.CHGHDRS | Milter.QUARANTINE, 0x1fffff, 0, 0]
    assert Milter.negotiate_callback(ctx, opts) == Milter.CONTINUE
    ctx._protocol = opts[1]
    assert not opts[1] & Milter.P_NOCONNECT
    assert Milter.connect_callback(ctx, "localhost", socket.AF_INET,
                                   ("127.0.0.1", 0)) == Milter.CONTINUE
    assert ctx._envfrom("<root@mx.example>") == Milter.CONTINUE
    # local: a second domain is not refused (it would strand the mail in maildrop)
    assert ctx._envrcpt("<alice@customer.example>") == Milter.CONTINUE
    assert ctx._envrcpt("<victim@elsewhere.example>") == Milter.CONTINUE


def test_a_second_message_on_a_connection_starts_afresh(heldmail):
    """No MAIL event resets the message's state: its end does (abort too)."""
    ctx = connected_ctx(40123)
    assert transaction(ctx, "<alice@customer.example>") == Milter.ACCEPT
    assert len(ctx.quarantined) == 1
    # the next message, for no customer: not tagged, not held, not refused
    assert ctx._envrcpt("<victim@elsewhere.example>") == Milter.CONTINUE
    assert send_data(ctx) == Milter.ACCEPT
    assert len(ctx.quarantined) == 1 and len(domain_headers(ctx)) == 1
