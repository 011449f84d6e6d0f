"""The helper's side of a gateway's connection: each release decided again, then done.

A gateway runs unprivileged and reads what strangers send; the helper
does not take its word for anything that protects a customer.  Its
requests are checked (``wire.check_request``), decided again by the
helper's own gate, carried out, and answered by id, at most
``wire.MAX_INFLIGHT`` at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

from flushctl.privsep.wire import MAX_INFLIGHT, MAX_MESSAGE, check_counts, check_request

log = logging.getLogger("flushctl.privsep")


async def serve_releases(sock: socket.socket, releaser, domains, encode, gate=None,
                         refused=None, failed=None) -> None:
    """In the root parent: carry out the child's requests until it hangs up.

    The child is not trusted with what protects a customer: ``gate`` (the
    parent's own ``gate.Gate``: flush_from, the rate limits, which
    addresses are peers) decides each request again, here, before anything
    is released; a request it refuses gets ``refused(verdict)`` as its
    outcome.  Every request gets an answer: if the release itself fails
    (the ledger on a full disk, say), ``failed(text)``.
    """
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_MESSAGE)
    tasks = set()
    # requests under way at once: a client that sends without reading the
    # answers is not read from until some are done
    room = asyncio.Semaphore(MAX_INFLIGHT)

    async def one(rid, domain, trigger, client, login):
        verdict = gate.check(client, domain, time.monotonic(), login) \
            if gate is not None else None
        if verdict is not None and verdict != "allowed":
            log.warning("event=refused domain=%s client=%s trigger=%s reason=%s",
                        domain, client, trigger, verdict.replace(" ", "_"))
            outcome = refused(verdict)
        else:
            try:
                outcome = await releaser.trigger(domain, trigger, client, login)
            except Exception as exc:
                log.exception("event=error stage=release_service domain=%s", domain)
                outcome = failed(str(exc)) if failed else None
        try:
            writer.write(json.dumps({"id": rid, "outcome": encode(outcome)}).encode() + b"\n")
            await writer.drain()
        except ConnectionError:
            pass

    try:
        while line := await reader.readline():
            try:
                message = json.loads(line)
                if isinstance(message, dict) and "counts" in message:
                    items = check_counts(message)
                    try:
                        await releaser.add_counts(items)
                    except Exception:   # the ledger: counts are not worth a restart
                        log.exception("event=error stage=counts")
                    continue
                args = check_request(message, domains)
            except ValueError as exc:
                # Not something the child we started would send: stop serving it.
                log.error("event=refused reason=%r", str(exc))
                break
            await room.acquire()
            task = asyncio.get_running_loop().create_task(one(*args))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            task.add_done_callback(lambda _: room.release())
    except (ConnectionError, ValueError) as exc:
        log.error("event=error stage=privsep reason=%r", str(exc))
    finally:
        writer.close()
        for task in tasks:
            task.cancel()
