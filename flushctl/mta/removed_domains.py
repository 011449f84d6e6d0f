"""Held mail of domains taken out of the config: find it, refuse an apply over it, settle it.

`flushctl apply` refuses to drop a domain whose mail the ledger holds
unless told what becomes of that mail (one of ``REMOVED_ACTIONS``); a
release or purge is carried out once the new maps are in place.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from flushctl.config import Config
from flushctl.heldmail.ledger.schema import FILENAME
from flushctl.mta.commands import PostfixError

if TYPE_CHECKING:
    from flushctl.mta.apply import ApplyReport

# What to do with the held mail of a domain taken out of the config.
REMOVED_ACTIONS = ("release", "purge", "keep")


def held_removed(config: Config) -> dict[str, tuple[int, int]]:
    """Domains no longer configured whose mail the ledger holds:
    {domain: (messages, bytes)}, exact against the queue."""
    from flushctl.heldmail.library import HeldMail
    if not os.path.exists(os.path.join(config.state_directory, FILENAME)):
        return {}   # no ledger yet: nothing of ours recorded (and apply creates none)
    od = HeldMail(config)
    try:
        return {st.domain: (st.messages, st.bytes) for st in od.status_all(exact=True)
                if not st.configured and st.messages}
    finally:
        od.ledger.close()


def refuse_removed(config: Config, held: dict[str, tuple[int, int]], kept: set[str]) -> None:
    """Stop the apply if mail of removed domains is held and not kept by an earlier apply."""
    from flushctl.mta.apply import ApplyError   # apply.py imports this module
    pending = {d: v for d, v in held.items() if d not in kept}
    if not pending:
        return
    lines = "; ".join(f"{d}: {n} held message(s), {b} bytes" for d, (n, b) in
                      sorted(pending.items()))
    raise ApplyError(
        f"{config.path}: no longer names domains whose mail is held here ({lines}); "
        "say what becomes of it: --release-removed (deliver it as ordinary mail), "
        "--purge-removed (delete it) or --keep-removed (keep it held; "
        "flushctl status and check show it)")


def settle_removed(config: Config, held: dict[str, tuple[int, int]], action: str | None,
                   report: ApplyReport) -> None:
    """Carry out --release-removed / --purge-removed once the new maps are in place."""
    if not held or action not in ("release", "purge"):
        if held and action == "keep":
            report.removed_domains += [f"{d}: kept {n} held message(s) of a removed domain "
                                       "(flushctl status shows them)"
                                       for d, (n, _) in sorted(held.items())]
        return
    from flushctl.heldmail.library import HeldMail
    from flushctl.mta.apply import ApplyError   # apply.py imports this module
    od = HeldMail(config)
    try:
        for dom in sorted(held):
            if action == "release":
                count = od.release_removed(dom)
                report.removed_domains.append(
                    f"{dom}: released {count} held message(s) as ordinary mail")
            else:
                count = od.purge(dom)
                report.removed_domains.append(f"{dom}: deleted {count} held message(s)")
    except (OSError, PostfixError) as exc:
        raise ApplyError(f"applied, but the held mail of removed domains was not all "
                         f"{'released' if action == 'release' else 'deleted'}: {exc}; "
                         "the rest stays held (flushctl status)") from exc
    finally:
        od.ledger.close()
