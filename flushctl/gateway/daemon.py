"""`flushctl gateway`: how its process is wired (binding, dropping root,
the release helper, the cluster's forwarder).

One asyncio process serves two listeners (``listeners``): finger (RFC
1288) on ``[gateway] finger_listen`` and Postfix's policy delegation
protocol on ``[gateway] policy_listen``, which smtpd asks for every ETRN
(``check_policy_service`` in smtpd_etrn_restrictions, set by ``flushctl
apply``).  Parsing lives in ``protocols``, admission in ``gate``, the
words in ``replies``; releases are scheduled by ``releaser`` where the
releasing is done: in this process when it runs as root with ``[gateway]
user`` empty, else in the release helper.  With ``[cluster]``, the
process that releases also runs the ``cluster.Forwarder`` that sends this
host's releases on to the peers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3

from flushctl import stopsignals
from flushctl import cluster
from flushctl.config import Config
from flushctl.gateway.gate import Gate
from flushctl.gateway.listeners import Gateway
from flushctl.gateway.releaser import Releaser
from flushctl.heldmail.library import HeldMail
from flushctl.heldmail.outcome import FAILED, Outcome
from flushctl.privsep import accounts, releases
from flushctl.privsep.errors import PrivsepError
from flushctl.privsep.sockets import bind as bind_socket

log = logging.getLogger("flushctl.gateway")

def helper_gate(config: Config, peers: frozenset[str]) -> Gate:
    """The release helper's own gate: one for every gateway that connects."""
    return Gate(config.domains, per_minute=config.gateway.rate_per_minute,
                burst=config.gateway.rate_burst, peers=peers)


async def serve_parent(config: Config, channel, releaser, gate: Gate) -> None:
    """The release helper's side of one gateway: carry out its requests,
    deciding again with ``gate`` (the helper's, shared by every gateway
    connection) what protects a customer (flush_from, rate limits,
    peers), and answering every one."""
    await releases.serve_releases(
        channel, releaser, config.domains, Outcome.as_json, gate,
        refused=lambda verdict: Outcome(FAILED, 0, "", f"refused: {verdict}", None),
        failed=lambda text: Outcome(FAILED, 0, "", text, None))


async def with_forwarder(config: Config, rel: Releaser, serving) -> None:
    """Run the coroutine ``serving`` and, with [cluster], the forwarder
    that sends ``rel``'s releases on to the peers beside it."""
    if config.cluster is None:
        await serving
        return
    forwarder = cluster.Forwarder(rel.heldmail.ledger, config.cluster)
    rel.forwarded = forwarder.wake.set
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(forwarder.run(stop))
    try:
        await serving
    finally:
        stop.set()
        task.cancel()   # not waiting out a peer's timeout: what is pending stays queued
        try:
            await task
        except asyncio.CancelledError:
            pass


def bind(config: Config) -> list:
    """The gateway's listeners, finger and policy (root's work: port 79,
    Postfix's private/); both or neither."""
    finger = bind_socket(config.finger_listen, backlog=1024)
    try:
        return [finger, bind_socket(config.policy_listen, backlog=128)]
    except BaseException:
        finger.close()
        raise


def run(config: Config, heldmail: HeldMail | None = None) -> None:
    """Serve.  Started as root with ``[gateway] user`` empty, one process
    binds and releases itself.  Otherwise it serves as ``[gateway] user``
    (as root, it becomes that user before anything else) with no privilege
    at all: the release helper (``flushctl helper``, root) binds its
    listeners (port 79, the policy socket in Postfix's private/) and hands
    them over, and decides again every release it asks for."""
    from flushctl.privsep import client
    stopsignals.catch()
    user = config.gateway.user
    root = os.geteuid() == 0
    if root and not user:
        sockets = bind(config)
        peers = _peers(config)

        async def single():
            try:
                rel = Releaser(heldmail or HeldMail(config), config.gateway.release_window)
                rel.heldmail.ledger   # opened now: a ledger that cannot be is said at start
            except (OSError, sqlite3.Error) as exc:
                raise PrivsepError(
                    f"cannot open the ledger in {config.state_directory}: {exc}") from None
            await with_forwarder(config, rel, Gateway(config, rel, peers).serve(sockets))
        asyncio.run(single())
        return

    if root:
        accounts.drop_privileges(accounts.account(user), "gateway", groups=True)
    channel, sockets = client.connect_gateway(config, wait=client.CONNECT_WAIT)
    peers = _peers(config)

    async def main():
        remote = client.RemoteReleaser(channel, Outcome.from_json)
        await remote.start()
        gateway = Gateway(config, remote, peers)
        await gateway.serve(sockets, closed=remote.closed)
        if not gateway.asked_to_stop:
            # not a stop asked for: exit with an error, and the supervisor restarts us
            raise PrivsepError("gateway: the release helper is gone")
    asyncio.run(main())


def _peers(config: Config) -> frozenset:
    peers = cluster.peer_addresses(config.cluster) if config.cluster else frozenset()
    if peers:
        log.info("event=peers addresses=%s", ",".join(sorted(peers)))
    return peers
