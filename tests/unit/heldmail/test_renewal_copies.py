"""Renewal copies (``postsuper -r`` of stale held mail, arriving back in
the deferred queue) belong to the release that made them while it runs:
the keeper records them but neither intake nor the sweep holds them."""

import os
import time

from flushctl import config as config_mod
from flushctl.heldmail.ledger.store import Ledger
from flushctl.heldmail.library import HeldMail
from flushctl.mta.queuefiles import QueueLayout

HASHED = frozenset({"deferred", "defer"})


class FakePostfix:
    def __init__(self, layout, arrival):
        self.layout, self.arrival, self.held = layout, arrival, []

    def read_messages(self, ids):
        stamp = time.strftime("%a %b %d %H:%M:%S %Y", time.localtime(self.arrival))
        return "".join(
            f"*** ENVELOPE RECORDS deferred/{q} ***\nmessage_size: 10 0 1 0 10\n"
            f"message_arrival_time: {stamp}\ncreate_time: {stamp}\n"
            f"recipient: u@a.test\n*** MESSAGE CONTENTS deferred/{q} ***\nSubject: x\n\n"
            for q in ids)

    def hold(self, ids):
        self.held += list(ids)
        return len(ids)


def test_keeper_pass_leaves_a_live_releases_renewal_copy_to_it(tmp_path):
    """Review finding: intake left a renewal's copy to the release under
    way, and the sweep of the same keeper pass held it all the same (its
    hold could land after the release's postsuper -H and take it back).
    Once that release is over (its claim dead, or two minutes old), the
    sweep holds the copy."""
    layout = QueueLayout(str(tmp_path / "queue"), HASHED, 1)
    cfg = config_mod.parse(f'[state]\ndirectory = "{tmp_path / "state"}"\n'
                           '[domains."a.test"]\n', "t.toml")
    now = time.time()
    fake = FakePostfix(layout, arrival=now - 86400)      # a renewed copy keeps its arrival
    keeper = HeldMail(cfg, postfix=fake, layout=layout, ledger=Ledger(str(tmp_path / "state")))
    # a release under way in a live process (this one), claimed 5 s ago
    assert keeper.ledger.claim_release("a.test", now - 5, "admin", None, False,
                                       now + 900, lambda s: False)
    copy = "4jfQW04Wb7zJ9WA"
    path = layout.path("deferred", copy)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").close()
    os.utime(path, (now + 300, now + 300))   # qmgr's deferral: retry time ahead
    keeper.take_in(queues=("deferred",))     # the keeper's pass: intake ...
    assert keeper.ledger.known({copy}) == {copy} and fake.held == []   # recorded, not held
    keeper.sweep_all()                       # ... then the sweep, same pass
    assert fake.held == [], "the sweep held the copy the release is about to -H"
    keeper.ledger.set_flush_result("a.test", "releasing (pid 999999999)")   # it died
    keeper.sweep_all()
    assert fake.held == [copy]
