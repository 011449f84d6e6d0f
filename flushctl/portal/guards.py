"""What keeps hostile clients from the portal's work: the login throttle,
the body limit, the shape of a token (no I/O but the ASGI calls)."""

from __future__ import annotations

import re
from collections import deque

from flushctl.gateway.gate import bucket_key as throttle_key  # noqa: F401  one per /64

FAILURE_MEMORY = 900.0             # seconds a failed login counts against its address
MAX_ADDRESSES = 10000              # addresses with recent failures remembered
TOKEN = re.compile(r"[0-9a-f]{32}")   # what the helper grants (a longer one is no token)
MAX_BODY = 16 * 1024               # bytes of a form or a JSON request


class LimitBody:
    """ASGI middleware: a request body over ``MAX_BODY`` gets 413 before
    anything reads it (announced or streamed)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY:
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"cache-control", b"no-store")]})
            await send({"type": "http.response.body", "body": b'{"error": "request too large"}'})
            return
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > MAX_BODY:
                raise ValueError("request body too large")
            return message
        return await self.app(scope, limited, send)


class Throttle:
    """Failed logins per client (``throttle_key``: an IPv6 client's /64): ``limit``
    within ``FAILURE_MEMORY`` and that address waits (429) until the oldest
    is forgotten.  An attempt counts from its start (``failed``) and is
    forgiven when it succeeds, so concurrent attempts cannot slip past."""

    def __init__(self, limit: int):
        self.limit = limit
        self.failures: dict[str, deque] = {}

    def wait(self, address: str, now: float) -> float:
        q = self.failures.get(address)
        while q and q[0] < now - FAILURE_MEMORY:
            q.popleft()
        if q is not None and not q:
            del self.failures[address]
            return 0.0
        if q and len(q) >= self.limit:
            return q[0] + FAILURE_MEMORY - now
        return 0.0

    def failed(self, address: str, now: float) -> None:
        if len(self.failures) >= MAX_ADDRESSES and address not in self.failures:
            for key in [k for k, q in self.failures.items() if not q or q[-1] < now - 60]:
                del self.failures[key]
            if len(self.failures) >= MAX_ADDRESSES:
                self.failures.pop(next(iter(self.failures)))
        self.failures.setdefault(address, deque()).append(now)

    def forgive(self, address: str) -> None:
        q = self.failures.get(address)
        if q:
            q.pop()
            if not q:
                del self.failures[address]
