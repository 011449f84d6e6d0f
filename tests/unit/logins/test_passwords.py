"""flushctl.logins.passwords: the secrets kept for a password, and checking them."""

import base64

import pytest

from flushctl.logins.model import Login, Logins
from flushctl.logins.passwords import (check_password, cram_secret, parse_scrypt, scrypt_hash,
                                       verify_cram_md5, verify_plain)

# RFC 2195, section 2: the example exchange
RFC_CHALLENGE = b"<1896.697170952@postoffice.reston.mci.net>"
RFC_USER, RFC_PASSWORD = "tim", "tanstaaftanstaaf"
RFC_DIGEST = "b913a602c7eda7a495b4e6e7334d3890"


def logins(**users: str) -> Logins:
    found = {}
    for name, password in users.items():
        secret = check_password(password)
        found[name] = Login(name, scrypt_hash(secret), cram_secret(secret), 1700000000)
    return Logins(found)


def test_rfc_2195_test_vector():
    tim = logins(tim=RFC_PASSWORD)
    assert verify_cram_md5(tim, RFC_USER, RFC_CHALLENGE, RFC_DIGEST)
    assert verify_cram_md5(tim, RFC_USER, RFC_CHALLENGE, RFC_DIGEST.upper())


@pytest.mark.parametrize("user, challenge, digest", [
    ("tom", RFC_CHALLENGE, RFC_DIGEST),                      # no such user
    ("Tim", RFC_CHALLENGE, RFC_DIGEST),                      # names are case-sensitive
    ("tim", b"<1897.697170952@postoffice.reston.mci.net>", RFC_DIGEST),   # another challenge
    ("tim", RFC_CHALLENGE, RFC_DIGEST[:-1] + "1"),
    ("tim", RFC_CHALLENGE, RFC_DIGEST[:-1]),
    ("tim", RFC_CHALLENGE, ""),
    ("tim", RFC_CHALLENGE, "b913a602c7eda7a495b4e6e7334d389\u00e9"),
])
def test_cram_md5_refused(user, challenge, digest):
    assert not verify_cram_md5(logins(tim=RFC_PASSWORD), user, challenge, digest)


def test_plain_verify():
    users = logins(cust1="s3cret \u00e9t\u00e9", cust2="other")
    assert verify_plain(users, "cust1", "s3cret \u00e9t\u00e9")
    assert verify_plain(users, "cust1", "s3cret \u00e9t\u00e9".encode())   # bytes off the wire
    assert not verify_plain(users, "cust1", "other")
    assert not verify_plain(users, "cust1", "s3cret")
    assert not verify_plain(users, "cust1", b"\xff\xfe")
    assert not verify_plain(users, "cust1", "\ud800\udcff")   # lone surrogates off JSON
    assert verify_plain(users, "cust2", "other")


def test_unknown_user_is_false_for_every_password():
    users = logins(cust1="pw")
    assert not verify_plain(users, "nobody-here", "pw")
    assert not verify_plain(Logins(), "cust1", "pw")
    assert not verify_cram_md5(Logins(), "tim", RFC_CHALLENGE, RFC_DIGEST)


def test_scrypt_secret_format():
    text = scrypt_hash(b"pw", salt=b"\0" * 16)
    kind, n, r, p, salt, digest = text.split("$")
    assert (kind, n, r, p) == ("scrypt", "16384", "8", "1")
    assert base64.b64decode(salt) == b"\0" * 16 and len(base64.b64decode(digest)) == 32
    assert parse_scrypt(text)[:3] == (16384, 8, 1)
    assert scrypt_hash(b"pw") != scrypt_hash(b"pw")   # a new salt each time


@pytest.mark.parametrize("text", [
    "", "scrypt$16384$8$1$AAAA", "bcrypt$16384$8$1$AAAA$AAAA", "scrypt$1000$8$1$AAAA$" + "A" * 44,
    "scrypt$16384$8$1$!!$" + "A" * 44, "scrypt$16384$8$1$AAAA$AAAA",
    "scrypt$1048576$8$1$AAAA$" + "A" * 44,   # would take 1 GiB
])
def test_bad_scrypt_secrets(text):
    with pytest.raises(ValueError):
        parse_scrypt(text)


def test_cram_secret_keeps_any_byte():
    assert base64.b64decode(cram_secret("p\u00e4ss\tw\u00f6rd".encode())) == \
        "p\u00e4ss\tw\u00f6rd".encode()


@pytest.mark.parametrize("password, message", [
    ("", "empty"),
    ("a" * 201, "201 bytes long; at most 200"),
    ("\u00e9" * 101, "202 bytes long"),
    ("pass\nword", "CR, LF or NUL"),
    ("pass\rword", "CR, LF or NUL"),
    ("pass\0word", "CR, LF or NUL"),
    ("pass\udcffword", "not valid UTF-8"),
])
def test_bad_passwords(password, message):
    with pytest.raises(ValueError, match=message):
        check_password(password)


def test_longest_password_and_any_other_character():
    assert check_password("a" * 200) == b"a" * 200
    assert check_password(" tab\there \u00e9 ") == " tab\there \u00e9 ".encode()


def test_secrets_never_in_a_repr():
    users = logins(tim=RFC_PASSWORD)
    assert RFC_PASSWORD not in repr(users)
    assert base64.b64encode(RFC_PASSWORD.encode()).decode() not in repr(users)
    assert "scrypt$" not in repr(users)


def test_logins_are_read_only():
    users = logins(tim=RFC_PASSWORD)
    with pytest.raises(TypeError):
        users.users["eve"] = users.users["tim"]
    assert list(users) == ["tim"] and "tim" in users and len(users) == 1
