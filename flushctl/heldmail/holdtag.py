"""The hold-tag contract, in one module: the headers of ours a message may
carry, how a tag is read back, and the header_checks rules that keep our
headers from acting or leaving.

The milter tags each message it holds with ``X-OnDemand-Domain: DOMAIN``
(the customer domain), after removing any such header a sender wrote
(smtpd and local ``sendmail`` alike). A ledger rebuilt from the hold queue
reads the tag back (``tag_of``) and believes it only for a domain of one
of the message's own recipients (``HeldMail._tagged``): the tag informs,
it never holds anything. Earlier versions also held requeued mail by a
secret in ``X-OnDemand-Hold``; nothing obeys that header now: the
``intake`` table removes it as mail comes in, ``strip_hold`` as mail
leaves by smtp, and ``flushctl apply`` deletes the secret's files
(``LEGACY_FILES``).
"""

from __future__ import annotations

TAG_HEADER = "X-OnDemand-Domain"   # names the customer domain of a held message
HOLD_HEADER = "X-OnDemand-Hold"     # earlier versions' hold mark: never obeyed
OUR_HEADERS = (TAG_HEADER, HOLD_HEADER)

# What earlier versions held requeued mail by: a secret in a header, named
# by a header_checks table ((where, name): the state or the maps directory).
# A value that may have leaked in a bounce is worth nothing now, and is not
# kept either.
LEGACY_FILES = (("state", "hold-secret"), ("maps", "hold_tagged"))


def tag_of(values: list[str]) -> str | None:
    """The domain a message's tag headers name: exactly one tag, or None."""
    if len(values) != 1:
        return None
    return values[0].strip().lower().rstrip(".") or None


def intake_rules(requeue_uid: int | None = None) -> str:
    """The ``intake`` header_checks rules every message passes in cleanup
    (from smtpd, sendmail or a requeue): the old hold mark goes. With
    ``requeue_uid`` (the mail_owner's uid), also the trace header pickup
    adds to mail requeued with ``postsuper -r`` (``Received: by HOST
    (Postfix, from userid UID)``): held mail whose lifetime clock is renewed
    again and again would otherwise gain one per renewal and reach
    hopcount_limit."""
    drop = ""
    if requeue_uid is not None:
        drop = (f"/^Received: by [^ ]+ \\([^,()]+, from userid {int(requeue_uid)}\\)/"
                " IGNORE\n")
    return drop + f"/^{HOLD_HEADER}:/ IGNORE\n"


def strip_rules() -> str:
    """The ``strip_hold`` smtp_header_checks rules: the old hold mark leaves
    by no smtp delivery."""
    return f"/^{HOLD_HEADER}:/ IGNORE\n"
