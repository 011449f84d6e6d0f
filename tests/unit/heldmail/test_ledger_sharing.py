"""The state directory the milter's group may write: root neither follows
a name the milter planted there nor lets such a name widen what the
milter may touch (issue 15: the milter reads every message, so it is the
likeliest to be taken over; its group's directory must not be a way to
root)."""

import os
import shutil
import sqlite3
import stat
import tempfile
import threading

import pytest

from flushctl.heldmail.ledger.schema import FILENAME
from flushctl.heldmail.ledger.sharing import identity, share
from flushctl.heldmail.ledger.store import Ledger

NOBODY, NOGROUP = 65534, 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="root's side of the state directory")


@pytest.fixture
def place():
    """A state directory shared with nogroup as `flushctl apply` leaves it,
    and beside it a directory only root may enter, with a file of root's:
    both where nobody can reach (pytest's own tmp_path is root's 0700)."""
    top = tempfile.mkdtemp(prefix="flushctl-shared-")
    os.chmod(top, 0o755)
    state = os.path.join(top, "state")
    share(state, NOGROUP)
    private = os.path.join(top, "root-only")
    os.mkdir(private, 0o700)
    secret = os.path.join(private, "secret")
    with open(secret, "w") as fh:
        fh.write("root's\n")
    os.chmod(secret, 0o600)
    yield state, private, secret
    shutil.rmtree(top)


def test_a_link_in_place_of_the_ledger_leads_root_nowhere(place):
    """The milter replaced the ledger with a link to where only root may
    write: root's ledger does not create the file there (old code: SQLite
    followed the link and made a database of root's at the link's end)."""
    state, private, _ = place
    target = os.path.join(private, "planted")
    os.symlink(target, os.path.join(state, FILENAME))
    with pytest.raises((sqlite3.Error, OSError)):
        Ledger(state, as_uid=NOBODY)
    assert not os.path.exists(target)
    assert os.listdir(private) == ["secret"]


def test_share_changes_no_file_a_link_points_at(place):
    """A link named like the ledger's WAL, pointing at a file of root's:
    apply's share refuses it and leaves that file as it was (old code:
    chown to the milter's group and chmod 0660 through the link)."""
    state, _, secret = place
    os.symlink(secret, os.path.join(state, FILENAME + "-wal"))
    with pytest.raises(OSError, match="not the ledger's file"):
        share(state, NOGROUP)
    st = os.stat(secret)
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0o600)


def test_root_uses_a_shared_ledger_as_the_milter_would_and_is_root_again_after(place):
    state, _, secret = place
    led = Ledger(state, as_uid=NOBODY)
    try:
        assert led.record("4ABCDEF0123", "customer.test", 100)
        assert led.state("customer.test").messages == 1
        st = os.stat(os.path.join(state, FILENAME))
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOGROUP, 0o660)
        # the thread is root again: it reads a file only root may
        with open(secret) as fh:
            assert fh.read() == "root's\n"
        # and other threads never stopped being root, even while one is in the ledger
        inside, done = threading.Event(), threading.Event()
        seen = []

        def hold():
            with led._lock:
                inside.set()
                done.wait(10)
        worker = threading.Thread(target=hold)
        worker.start()
        inside.wait(10)
        with open(secret) as fh:
            seen.append(fh.read())
        done.set()
        worker.join()
        assert seen == ["root's\n"]
    finally:
        led.close()


def test_a_directory_only_root_writes_is_used_as_root(tmp_path):
    led = Ledger(str(tmp_path / "state"), as_uid=NOBODY)
    try:
        assert led._lock.identity is None
        led.record("4ABCDEF0124", "customer.test", 1)
        assert os.stat(led.path).st_uid == 0
    finally:
        led.close()
    assert identity(str(tmp_path / "state"), NOBODY) is None
