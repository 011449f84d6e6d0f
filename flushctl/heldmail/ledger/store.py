"""The ledger as one object: ``Ledger``, every part of it on one connection.

The parts live in modules of their own (``records``, ``domains``,
``counters``, ``forwards``, ``foreign``, ``history``,
``notices``), each on the shared file and
connection of ``connection.LedgerFile``.
"""

from __future__ import annotations

from flushctl.heldmail.ledger.counters import Counters
from flushctl.heldmail.ledger.domains import DomainStates
from flushctl.heldmail.ledger.foreign import ForeignMail
from flushctl.heldmail.ledger.forwards import Forwards
from flushctl.heldmail.ledger.history import History
from flushctl.heldmail.ledger.notices import Notices
from flushctl.heldmail.ledger.records import Records


class Ledger(Records, DomainStates, Counters, Forwards, ForeignMail, History, Notices):
    """The ledger file, and one connection to it shared by a process's threads.

    A ledger removed or replaced under a running process is noticed on the
    next use (one stat) and opened afresh; one that is not a database any
    more is set aside and started afresh. ``generation`` counts the files
    this object has opened: when it moves, the queue is the only truth
    left, and ``HeldMail`` rebuilds the rows from the tag headers.
    """
