"""A ledger file is trusted once it was rebuilt from the queue, by
whichever process could: one the milter made anew holds only what it
recorded since, and a reader that trusted it would say nothing is held.
These attack the mark: a rebuild from an old listing, a file swapped in
during a rebuild, a backup put back under a running process."""

import os
import shutil
import time

import pytest

from flushctl import config as config_mod
from flushctl.heldmail.ledger.store import Ledger
from flushctl.heldmail.library import HeldMail
from flushctl.mta.queuefiles import QueueLayout

HASHED = frozenset({"deferred", "defer"})


class QueueReader:
    """postcat's output for the held messages (tagged for a.test)."""

    def __init__(self, layout):
        self.layout = layout

    def read_messages(self, ids):
        return "".join(
            f"*** ENVELOPE RECORDS hold/{q} ***\nmessage_size: 10 0 1 0 10\n"
            f"recipient: u@a.test\n*** MESSAGE CONTENTS hold/{q} ***\n"
            f"X-OnDemand-Domain: a.test\n\n"
            for q in ids if os.path.exists(self.layout.path("hold", q)))


@pytest.fixture
def host(tmp_path):
    layout = QueueLayout(str(tmp_path / "queue"), HASHED, 1)
    cfg = config_mod.parse(f'[state]\ndirectory = "{tmp_path / "state"}"\n'
                           '[domains."a.test"]\n', "t.toml")
    state = str(tmp_path / "state")

    class Host:
        def process(self):
            return HeldMail(cfg, postfix=QueueReader(layout), layout=layout,
                            ledger=Ledger(state))

        def hold(self, queue_id, record=None):
            path = layout.path("hold", queue_id)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "w").close()
            if record is not None:
                record.record(queue_id, "a.test", 10)

        def remove_ledger(self):
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.unlink(os.path.join(state, "ledger.sqlite3" + suffix))
                except FileNotFoundError:
                    pass

        def milter_makes_a_new_ledger(self):
            self.remove_ledger()
            return Ledger(state)
    return Host()


def test_a_file_the_milter_made_is_rebuilt_by_the_first_reader(host):
    keeper = host.process()
    host.hold("4jfQW04Wb7zJ9WA", keeper.ledger)
    milter = host.milter_makes_a_new_ledger()
    host.hold("4jfQW04Wb7zJ9WB", milter)
    reader = host.process()
    assert reader.needs_rebuild()
    assert reader.status("a.test").messages == 2
    assert not host.process().needs_rebuild()   # marked: the next reader trusts it


def test_a_rebuild_lists_the_hold_queue_afresh(host):
    """Review finding: a long-running process rebuilt from its watch's
    listing, which a big hold queue lists again only after 20 times its
    cost, and marked the file: a message held since was in no one's file."""
    keeper = host.process()
    host.hold("4jfQW04Wb7zJ9WA", keeper.ledger)
    keeper.rebuild_if_needed()
    keeper.take_in()
    watch = keeper._watches["hold"]
    for directory, (mtime, ids, listed_at, _) in list(watch._dirs.items()):
        watch._dirs[directory] = (mtime, ids, listed_at, 1.0)   # a 1 s listing
    time.sleep(0.01)
    host.hold("4jfQW04Wb7zJ9WB", keeper.ledger)
    host.milter_makes_a_new_ledger().close()
    keeper.rebuild_if_needed()
    reader = host.process()
    assert reader.status("a.test").messages == 2


def test_a_file_swapped_in_during_a_rebuild_is_not_marked(host):
    keeper = host.process()
    host.hold("4jfQW04Wb7zJ9WA", keeper.ledger)
    generation = keeper.ledger.generation
    host.remove_ledger()
    keeper.ledger.check_file()          # another thread saw it replaced
    assert not keeper.ledger.mark_rebuilt(generation)
    assert keeper.ledger.marked_generation() is None


def test_a_backup_put_back_under_a_running_process_is_rebuilt_by_it(host, tmp_path):
    """A marked file is trusted when a process first finds it; one that
    replaces the file under a running process (a backup put back) is
    rebuilt by that process whatever it says."""
    keeper = host.process()
    keeper.rebuild_if_needed()          # marked, nothing held yet
    keeper.ledger.close()
    backup = tmp_path / "backup.sqlite3"
    shutil.copy(keeper.ledger.path, backup)
    keeper = host.process()
    host.hold("4jfQW04Wb7zJ9WA", keeper.ledger)
    assert keeper.status("a.test").messages == 1
    host.remove_ledger()
    shutil.copy(backup, keeper.ledger.path)
    assert keeper.needs_rebuild()
    assert keeper.status("a.test").messages == 1


def test_a_failed_rebuild_is_tried_once_per_file_and_leaves_it_unmarked(host):
    """A process that cannot read the queue (or a full disk) does not
    rebuild at every call, and does not mark what it could not rebuild."""
    reader = host.process()
    host.hold("4jfQW04Wb7zJ9WA")

    def unreadable(ids):
        raise PermissionError("the queue")
    reader.postfix.read_messages = unreadable
    with pytest.raises(PermissionError):
        reader.rebuild_if_needed()
    assert not reader.needs_rebuild()
    assert reader.ledger.marked_generation() is None
    assert host.process().status("a.test").messages == 1
