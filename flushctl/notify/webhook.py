"""The webhook's deliveries: one HTTP POST each, made by the poller's
unprivileged half (it reads the receiver's answer; the release helper
signed the body and keeps the secret).

The receiver checks ``X-Flushctl-Signature: sha256=HEX``, the HMAC-SHA256
of the body under the shared secret (``[notify] webhook_secret_file``).
Any 2xx acknowledges; anything else (a redirect too, which is not
followed) is retried with a doubling delay until ``webhook_retry_for``.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.error
import urllib.request

log = logging.getLogger("flushctl.poller")

SIGNATURE_HEADER = "X-Flushctl-Signature"
MAX_ERROR = 200


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def post(url: str, body: str, signature: str, timeout: float) -> tuple[bool, str]:
    """(acknowledged, why not)."""
    request = urllib.request.Request(url, data=body.encode(), method="POST", headers={
        "Content-Type": "application/json", SIGNATURE_HEADER: signature,
        "User-Agent": "flushctl-notify"})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            response.read(4096)
            return 200 <= response.status < 300, f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return False, str(getattr(exc, "reason", exc))[:MAX_ERROR]


async def deliver(ops, config, stop: asyncio.Event) -> None:
    """In the poller: make the deliveries the release helper queued (``ops``:
    its ``webhooks`` and ``webhook_result``), one look every ``[notify]
    check_every``; each result goes back to it."""
    every = max(1.0, config.notify.check_every)
    timeout = config.notify.webhook_timeout
    while not stop.is_set():
        try:
            for d in await asyncio.to_thread(ops.webhooks):
                ok, why = await asyncio.to_thread(post, d["url"], d["body"], d["signature"],
                                                  timeout)
                log.log(logging.INFO if ok else logging.WARNING,
                        "event=webhook id=%d ok=%s detail=%r", d["id"], ok, why)
                await asyncio.to_thread(ops.webhook_result, d["id"], ok, why)
        except Exception:
            log.exception("event=error stage=webhook")
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass
