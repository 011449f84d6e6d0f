"""The passwords' secrets and their checking: pure functions, no files.

Each login keeps two secrets.  ``scrypt`` is a salted scrypt hash
(N=2**14, r=8, p=1, 32 bytes) written ``scrypt$N$r$p$SALT$HASH`` (base64):
it checks a password given in the clear (AUTH PLAIN and LOGIN).  ``cram``
is the password itself, base64 so that any byte survives: CRAM-MD5
(RFC 2195) proves the password as HMAC-MD5 of the server's challenge keyed
with it, so the server needs the key, and no one-way hash can stand in.
It is plaintext-equivalent; that is why the store is root's alone (mode
0600) and refused otherwise.

Both checks compare in constant time and do the same work for a user
that does not exist (a dummy scrypt, a dummy HMAC), so the time of an
answer does not say which logins exist.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

from flushctl.logins.model import Logins

SCRYPT_N = 2 ** 14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_LENGTH = 32
SALT_LENGTH = 16
MAX_PASSWORD = 200   # bytes of UTF-8
_MAX_MEMORY = 2 ** 26   # what a stored hash may make scrypt use (N=2**14, r=8: 16 MiB)

# an unknown user is checked against these: same parameters, never a match
_DUMMY_SALT = os.urandom(SALT_LENGTH)
_DUMMY_HASH = os.urandom(SCRYPT_LENGTH)
_DUMMY_KEY = os.urandom(16)


def check_password(password: str) -> bytes:
    """``password`` as the UTF-8 bytes to keep, or a ValueError saying what
    is wrong: 1 to 200 bytes, no CR, LF or NUL (no SMTP line could carry it)."""
    try:
        data = password.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the password is not valid UTF-8") from None
    if not data:
        raise ValueError("the password is empty")
    if len(data) > MAX_PASSWORD:
        raise ValueError(f"the password is {len(data)} bytes long; at most {MAX_PASSWORD}")
    if any(c in data for c in b"\r\n\0"):
        raise ValueError("the password must not contain CR, LF or NUL")
    return data


def scrypt_hash(password: bytes, salt: bytes | None = None) -> str:
    """The ``scrypt`` secret of ``password``, with a new random salt unless given."""
    salt = os.urandom(SALT_LENGTH) if salt is None else salt
    digest = hashlib.scrypt(password, salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            dklen=SCRYPT_LENGTH, maxmem=_MAX_MEMORY * 2)
    return "$".join(["scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P),
                     _b64(salt), _b64(digest)])


def cram_secret(password: bytes) -> str:
    """The ``cram`` secret of ``password``: the password itself, base64."""
    return _b64(password)


def parse_scrypt(text: str) -> tuple[int, int, int, bytes, bytes]:
    """(N, r, p, salt, hash) of a ``scrypt`` secret, or a ValueError."""
    parts = text.split("$") if isinstance(text, str) else []
    if len(parts) != 6 or parts[0] != "scrypt" or not all(p.isdigit() for p in parts[1:4]):
        raise ValueError('not "scrypt$N$r$p$SALT$HASH"')
    n, r, p = (int(x) for x in parts[1:4])
    if n < 2 or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16 \
            or 128 * n * r > _MAX_MEMORY:
        raise ValueError(f"scrypt parameters out of range: N={n} r={r} p={p}")
    salt, digest = unb64(parts[4]), unb64(parts[5])
    if not salt or not 16 <= len(digest) <= 64:
        raise ValueError("an empty salt or a hash of the wrong length")
    return n, r, p, salt, digest


def unb64(text: str) -> bytes:
    """Strict base64, or a ValueError."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise ValueError(f"not base64: {text[:20]!r}") from None


def verify_plain(logins: Logins, user: str, password: str | bytes) -> bool:
    """Whether ``password`` (as given to AUTH PLAIN or LOGIN) is ``user``'s."""
    login = logins.get(user)
    if login is None:
        n, r, p, salt, expected = SCRYPT_N, SCRYPT_R, SCRYPT_P, _DUMMY_SALT, _DUMMY_HASH
    else:
        n, r, p, salt, expected = parse_scrypt(login.scrypt)
    if isinstance(password, str):
        password = password.encode("utf-8", "surrogatepass")   # never a kept password
    got = hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=len(expected),
                         maxmem=_MAX_MEMORY * 2)
    return hmac.compare_digest(got, expected) and login is not None


def verify_cram_md5(logins: Logins, user: str, challenge: bytes, digest_hex: str) -> bool:
    """Whether ``digest_hex`` is the hex HMAC-MD5 of ``challenge`` keyed with
    ``user``'s password (RFC 2195)."""
    login = logins.get(user)
    key = _DUMMY_KEY if login is None else unb64(login.cram)
    expected = hmac.new(key, challenge, hashlib.md5).hexdigest().encode("ascii")
    given = digest_hex.lower().encode("ascii", "replace") if isinstance(digest_hex, str) else b""
    return hmac.compare_digest(expected, given) and login is not None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
