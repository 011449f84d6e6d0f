"""The wire between the release helper and the daemons: JSON lines, bounded and checked.

One JSON object a line, each way.  A thread asks with a ``Channel`` (one
request, one answer, in turn) and the helper answers with
``serve_channel``; a gateway's requests (``check_request``) and its
request counts (``check_counts``) are checked before the helper acts on
them.  The limits here bound what either side reads.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import select
import socket
import threading

from flushctl.privsep.errors import Malformed, PrivsepError

log = logging.getLogger("flushctl.privsep")

MAX_MESSAGE = 64 * 1024
MAX_INFLIGHT = 256        # a gateway's requests under way at once in the helper
REQUEST_TIMEOUT = 300.0   # seconds the gateway waits for a release's outcome
TRIGGERS = ("finger", "etrn", "peer", "report")  # report: what is held, nothing released


class Channel:
    """In an unprivileged daemon: ask the release helper, one JSON line out and
    one back, one request at a time (callers in several threads wait their
    turn).  ``PrivsepError`` when the helper answers with an error or
    is gone; ``gone`` is set then."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._file = sock.makefile("rwb")
        self._lock = threading.Lock()
        self.gone = threading.Event()

    def hung_up(self) -> bool:
        """Has the helper hung up?  A look that does not wait (and says
        no while a call is under way: that call will tell)."""
        if self.gone.is_set():
            return True
        if not self._lock.acquire(blocking=False):
            return False
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
            if not readable:
                return False
            try:
                data = self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return False
            except OSError:
                data = b""
            if not data:
                self.gone.set()
            return not data
        finally:
            self._lock.release()

    def call(self, request: dict) -> dict:
        with self._lock:
            if self.gone.is_set():
                raise PrivsepError("the release helper is gone")
            try:
                self._file.write(json.dumps(request).encode() + b"\n")
                self._file.flush()
                line = self._file.readline()
            except (OSError, ValueError) as exc:
                line = b""
                log.error("event=error stage=privsep reason=%r", str(exc))
            if not line:
                self.gone.set()
                raise PrivsepError("the release helper is gone")
        reply = json.loads(line)
        if "error" in reply:
            raise PrivsepError(reply["error"])
        return reply


def serve_channel(sock: socket.socket, handle, who: str, limit: int = MAX_MESSAGE) -> bool:
    """In the release helper: answer each request of a ``Channel`` with
    ``handle(request)`` until the worker hangs up.  Every request gets an
    answer (an exception becomes ``{"error": text}``), except one the
    worker would never send (``Malformed``, or not JSON, or over ``limit`` bytes):
    then the helper stops serving it, and hangs up.  True when the
    worker hung up, False when it was cut off for such a request."""
    with sock, sock.makefile("rwb") as channel:
        while True:
            try:
                line = channel.readline(limit + 1)
            except OSError:   # silent past its time, or cut: as if it hung up
                return True
            if not line:
                break
            try:
                if len(line) > limit or not line.endswith(b"\n"):
                    raise Malformed("request too long")
                try:
                    request = json.loads(line)
                except (ValueError, RecursionError):
                    raise Malformed("not JSON") from None
                if not isinstance(request, dict):
                    raise Malformed("not an object")
                try:
                    reply = handle(request)
                except Malformed:
                    raise
                except Exception as exc:
                    log.exception("event=error stage=%s_root request=%.40s", who,
                                  request.get("op"))
                    reply = {"error": str(exc) or type(exc).__name__}
            except Malformed as exc:
                log.error("event=refused who=%s reason=%r", who, str(exc))
                return False
            try:
                channel.write(json.dumps(reply).encode() + b"\n")
                channel.flush()
            except OSError:
                return True
    return True


# -- what a gateway sends ----------------------------------------------------------

def check_request(request, domains) -> tuple[int, str, str, str, str]:
    """Validate one request of a gateway; ValueError if it is not one we serve."""
    keys = {"id", "domain", "trigger", "client"}
    if not isinstance(request, dict) or set(request) not in (keys, keys | {"login"}):
        raise ValueError("malformed request")
    login = request.get("login", "")
    if "login" in request:
        from flushctl.config import login_name
        login_name(login)   # a ValueError for what is not one
    rid, domain, trigger, client = (request["id"], request["domain"], request["trigger"],
                                request["client"])
    if not isinstance(rid, int) or isinstance(rid, bool):
        raise ValueError("malformed id")
    if trigger not in TRIGGERS:
        raise ValueError(f"unknown trigger {trigger!r}")
    # a domain name in canonical form; one this process does not serve is
    # answered, refused by the gate (the gateway may have read a newer
    # config: a finger for a domain it knows must not end the conversation)
    if not isinstance(domain, str) or domain not in domains and not _canonical(domain):
        raise ValueError(f"not a domain name in canonical form: {domain!r:.80}")
    if not isinstance(client, str):
        raise ValueError("malformed client")
    if client != "unknown":
        ipaddress.ip_address(client)
    return rid, domain, trigger, client, login


def _canonical(domain: str) -> bool:
    from flushctl.names import domain as canonical
    try:
        return canonical(domain) == domain
    except ValueError:
        return False


_LABEL = re.compile(r"[a-z_]{1,40}")


def check_counts(message) -> list[tuple[str, tuple, int]]:
    """Validate a gateway's request counts; ValueError if they are not that."""
    if not isinstance(message, dict) or set(message) != {"counts"} \
            or not isinstance(message["counts"], list) or len(message["counts"]) > 1000:
        raise ValueError("malformed counts")
    items = []
    for item in message["counts"]:
        if not (isinstance(item, list) and len(item) == 3 and item[0] == "gateway_requests"
                and isinstance(item[1], list) and len(item[1]) == 2
                and all(isinstance(x, str) and _LABEL.fullmatch(x) for x in item[1])
                and item[1][0] in ("finger", "etrn")
                and isinstance(item[2], int) and not isinstance(item[2], bool)
                and 0 < item[2] <= 10**7):
            raise ValueError(f"malformed count {item!r:.100}")
        items.append((item[0], tuple(item[1]), item[2]))
    return items
