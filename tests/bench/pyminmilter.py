"""pyminmilter: minmilter.c in Python, with pymilter, the library ours is
built on. The same negotiation (no connect, HELO, MAIL, DATA, header,
end-of-headers, body or unknown-command events, RCPT unanswered) and the
same work at the end of each message (one header added, the message held),
nothing else: what any pymilter milter in our place costs at least.
P1b measures it against the C one (the price of Python and pymilter) and
ours against it (the price of what ours does), and two variants that each
add one part of ours, to say what each part costs:
- ``--steps``: the protocol steps ours takes (RCPT answered, the headers
  and the body streamed without replies, their sizes summed);
- ``--ledger DIR``: ours' ledger record of each message (flushctl's own
  Ledger, in DIR), the transaction ours makes at the end of the message.

    python pyminmilter.py [--steps] [--ledger DIR] /path/to/socket
"""

from __future__ import annotations

import argparse
import os
import sys

import Milter


class Minimal(Milter.Base):
    # every other callback is Milter.Base's, marked @nocallback there

    ledger = None

    @Milter.noreply
    def envrcpt(self, rcpt, *params):
        return Milter.CONTINUE

    def eom(self):
        if self.ledger is not None:
            self.ledger.record(self.getsymval("i"), "customer.test", 2300,
                               counted=("milter_decisions", "held"))
        self.addheader("X-Bench-Tag", "customer.test")
        self.quarantine("on-demand: held")
        return Milter.ACCEPT


class Steps(Minimal):
    """Ours' protocol steps: RCPT answered, headers and body streamed."""

    size = 0

    def envrcpt(self, rcpt, *params):
        return Milter.CONTINUE

    @Milter.noreply
    def header(self, name, value):
        self.size += len(name) + len(value) + 4
        return Milter.CONTINUE

    @Milter.noreply
    def body(self, chunk):
        self.size += len(chunk)
        return Milter.CONTINUE


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", action="store_true")
    ap.add_argument("--ledger", metavar="DIR")
    ap.add_argument("socket")
    args = ap.parse_args()
    os.umask(0)
    cls = Steps if args.steps else Minimal
    if args.ledger:
        from flushctl.heldmail.ledger.store import Ledger
        cls.ledger = Ledger(args.ledger)
    Milter.factory = cls
    Milter.set_flags(Milter.ADDHDRS | Milter.QUARANTINE)
    Milter.runmilter("pyminmilter", "unix:" + args.socket, timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
