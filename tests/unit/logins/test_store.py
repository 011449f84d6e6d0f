"""flushctl.logins.store: the root-only file, on real files in tmp_path.

The store refuses any file not root's, so these tests run as root (as the
unit tests do here); as anyone else they are skipped.
"""

import json
import multiprocessing
import os
import stat

import pytest

from flushctl.logins import store
from flushctl.logins.model import LoginsError
from flushctl.logins.passwords import verify_cram_md5, verify_plain

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the store is root's: run as root")


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "logins")


def test_no_file_is_no_users(path):
    assert len(store.load(path)) == 0
    assert not verify_plain(store.load(path), "cust1", "pw")


def test_round_trip(path):
    store.add_user(path, "cust1", "first pw")
    store.add_user(path, "tim", "tanstaaftanstaaf")
    logins = store.load(path)
    assert list(logins) == ["cust1", "tim"]
    assert verify_plain(logins, "cust1", "first pw")
    assert not verify_plain(logins, "cust1", "tanstaaftanstaaf")
    assert verify_cram_md5(logins, "tim", b"<1896.697170952@postoffice.reston.mci.net>",
                           "b913a602c7eda7a495b4e6e7334d3890")
    assert logins.get("cust1").changed > 1700000000

    store.set_password(path, "cust1", "second pw")
    logins = store.load(path)
    assert verify_plain(logins, "cust1", "second pw")
    assert not verify_plain(logins, "cust1", "first pw")

    store.delete_user(path, "cust1")
    assert list(store.load(path)) == ["tim"]


def test_the_file_as_documented(path):
    store.add_user(path, "cust1", "pw")
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    doc = json.loads(open(path).read())
    assert doc["version"] == 1
    entry = doc["users"]["cust1"]
    assert sorted(entry) == ["changed", "cram", "scrypt"]
    assert entry["scrypt"].startswith("scrypt$16384$8$1$")
    assert entry["cram"] == "cHc="   # "pw": plaintext-equivalent, as documented
    assert isinstance(entry["changed"], int)
    # no temporary file left behind; the lock beside it
    assert sorted(os.listdir(os.path.dirname(path))) == ["logins", "logins.lock"]


def test_the_mode_is_0600_whatever_the_umask(path):
    old = os.umask(0)
    try:
        store.add_user(path, "cust1", "pw")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_add_refuses_an_existing_user_and_keeps_its_password(path):
    store.add_user(path, "cust1", "pw")
    with pytest.raises(LoginsError, match="cust1: there is a user of that name already"):
        store.add_user(path, "cust1", "other")
    assert verify_plain(store.load(path), "cust1", "pw")


@pytest.mark.parametrize("change", [
    lambda path: store.set_password(path, "ghost", "pw"),
    lambda path: store.delete_user(path, "ghost"),
])
def test_a_missing_user_is_refused(path, change):
    store.add_user(path, "cust1", "pw")
    with pytest.raises(LoginsError, match="ghost: no such user"):
        change(path)
    with pytest.raises(LoginsError, match="ghost: no such user"):
        change(path + "-none")   # no store at all


@pytest.mark.parametrize("name, password, message", [
    ("-cust", "pw", "not a login name"),
    ("cust1", "", "the password is empty"),
    ("cust1", "a\nb", "CR, LF or NUL"),
    ("cust1", "x" * 201, "at most 200"),
])
def test_bad_names_and_passwords_are_refused(path, name, password, message):
    with pytest.raises(LoginsError, match=message):
        store.add_user(path, name, password)
    assert not os.path.exists(path)


def test_a_missing_state_directory_is_said(tmp_path):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(LoginsError, match=f"{missing}: no such directory"):
        store.add_user(str(missing / "logins"), "cust1", "pw")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o660])
def test_a_store_others_may_read_or_write_is_refused(path, mode):
    store.add_user(path, "cust1", "pw")
    os.chmod(path, mode)
    with pytest.raises(LoginsError, match=f"mode {mode:04o} lets group or others at it; "
                                          "refusing it: it holds plaintext-equivalent secrets"):
        store.load(path)
    with pytest.raises(LoginsError, match="refusing it"):
        store.add_user(path, "cust2", "pw")   # nor changed


def test_a_symlinked_store_is_refused(path, tmp_path):
    real = tmp_path / "elsewhere"
    os.mkdir(real)
    store.add_user(str(real / "logins"), "cust1", "pw")
    os.symlink(real / "logins", path)
    with pytest.raises(LoginsError, match="a symbolic link; refusing it"):
        store.load(path)
    with pytest.raises(LoginsError, match="a symbolic link; refusing it"):
        store.add_user(path, "cust2", "pw")
    assert list(store.load(str(real / "logins"))) == ["cust1"]


def test_a_store_not_of_root_is_refused(path):
    store.add_user(path, "cust1", "pw")
    os.chown(path, 65534, -1)
    with pytest.raises(LoginsError, match="owned by uid 65534, not root"):
        store.load(path)


@pytest.mark.parametrize("make", [os.mkdir, os.mkfifo])
def test_a_store_that_is_not_a_file_is_refused(path, make):
    make(path, 0o600)
    with pytest.raises(LoginsError, match="not a regular file"):
        store.load(path)


@pytest.mark.parametrize("text, message", [
    ("{", "not JSON"),
    ("[]", '"version": 1'),
    ('{"version": 2, "users": {}}', '"version": 1'),
    ('{"version": 1, "users": []}', '"users" must be an object'),
    ('{"version": 1, "users": {"-x": {}}}', "not a login name"),
    ('{"version": 1, "users": {"x": {"scrypt": "plain", "cram": "cHc=", "changed": 1}}}',
     "scrypt"),
    ('{"version": 1, "users": {"x": {"scrypt": "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$'
     + "A" * 43 + '=", "cram": "", "changed": 1}}}', "cram"),
])
def test_a_damaged_store_is_said(path, text, message):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, text.encode())
    os.close(fd)
    with pytest.raises(LoginsError, match="not a logins store") as info:
        store.load(path)
    assert message in str(info.value)


def _add_many(path: str, worker: int, count: int) -> None:
    for i in range(count):
        store.add_user(path, f"w{worker}-u{i}", f"password {worker}/{i}")


def test_concurrent_adds_from_several_processes_keep_every_entry(path):
    fork = multiprocessing.get_context("fork")
    workers = [fork.Process(target=_add_many, args=(path, w, 4)) for w in range(6)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
        assert p.exitcode == 0
    logins = store.load(path)
    assert sorted(logins) == sorted(f"w{w}-u{i}" for w in range(6) for i in range(4))
    assert verify_plain(logins, "w3-u2", "password 3/2")
    assert sorted(os.listdir(os.path.dirname(path))) == ["logins", "logins.lock"]
