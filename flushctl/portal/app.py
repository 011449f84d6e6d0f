"""The portal's web application: HTML pages for people, a JSON API for programs.

Everything a page shows and every action goes through the release helper
(``ask``), which checks the login's token and decides again which
domains it may see; this module only renders and routes.  Pages are
server-rendered HTML that work without JavaScript; every form carries
the session's CSRF token; sessions are signed cookies (SameSite=Strict,
HttpOnly, Secure unless ``[portal] secure_cookie = false``).  The API
takes ``Authorization: Bearer TOKEN`` from ``POST /api/v1/login``; its
description is ``/api/v1/openapi.json``.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import secrets
import time

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from flushctl import names
from flushctl.portal.guards import FAILURE_MEMORY, TOKEN, LimitBody, Throttle, throttle_key
from flushctl.portal.views import assets, chart, outcome_words, relay_words
from flushctl.privsep.errors import PrivsepError

log = logging.getLogger("flushctl.portal")

ACTIONS = {"release": "release", "pause": "pause", "resume": "resume",
           "return-refused": "return_refused", "relay": "relay"}
NOT_YOURS = "no such domain"       # the helper's words for another's domain or none
MAX_RELAY = 300                    # characters of a next hop (the helper's limit too)
LOGIN_GONE = ("no such login", "the login was removed")


def build(ask, settings, secret: str | None = None) -> Starlette:
    """The application.  ``ask(request_dict)`` is a coroutine that asks the
    release helper (raising ``PrivsepError`` with its words); ``settings``
    is ``Config.portal``."""
    env, openapi = assets()
    throttle = Throttle(settings.login_failures)
    acting: set[str] = set()   # domains with an action under way (one at a time each)

    async def act(name: str, message: dict, run):
        """``run(message)`` unless an action on the domain is under way
        (a release may take long: it must not take all the helper's channels)."""
        if name in acting:
            return None
        acting.add(name)
        try:
            return await run(message)
        finally:
            acting.discard(name)

    def page(template: str, request: Request, status: int = 200, **values) -> HTMLResponse:
        session = request.session
        if "csrf" not in session:
            session["csrf"] = secrets.token_urlsafe(24)
        flash = session.pop("flash", None)
        body = env.get_template(template).render(user=session.get("user"),
                                             admin=session.get("admin", False),
                                             csrf=session["csrf"], flash=flash, **values)
        return HTMLResponse(body, status_code=status, headers=_SECURITY_HEADERS)

    def client_of(request: Request) -> str:
        """The client's address (a trusted proxy's X-Forwarded-For, see
        ``[portal] trusted_proxies``); "unknown" for anything that is not one."""
        host = request.client.host if request.client else ""
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            return "unknown"

    async def csrf_ok(request: Request) -> dict | None:
        form = await request.form()
        token = form.get("csrf")
        expected = request.session.get("csrf")
        if not expected or not isinstance(token, str) \
                or not hmac.compare_digest(token.encode(), expected.encode()):
            return None
        return form

    async def login_attempt(request: Request, user: str, password: str) -> tuple[dict | None, int]:
        """(the helper's grant, 0) or (None, seconds to wait; 0: wrong password)."""
        client, now = client_of(request), time.monotonic()
        key = throttle_key(client)
        wait = throttle.wait(key, now)
        if wait > 0:
            return None, math.ceil(wait)
        throttle.failed(key, now)   # counted from now: concurrent attempts see it
        reply = await ask({"op": "login", "user": user[:200], "password": password[:1000],
                           "client": client})
        if reply.get("busy"):
            throttle.forgive(key)
            raise PrivsepError("too many logins at once")
        if not reply.get("token"):
            return None, 0 if not reply.get("locked") else math.ceil(FAILURE_MEMORY)
        throttle.forgive(key)
        return reply, 0

    # -- HTML --------------------------------------------------------------
    async def home(request: Request):
        return RedirectResponse("/domains" if request.session.get("token") else "/login", 303)

    async def login_form(request: Request):
        return page("login.html", request, error=None)

    async def login(request: Request):
        form = await csrf_ok(request)
        if form is None:
            return page("login.html", request, 403, error="The form expired: please try again.")
        grant, wait = await login_attempt(request, str(form.get("user", "")),
                                          str(form.get("password", "")))
        if grant is None:
            if wait:
                return page("login.html", request, 429, error="Too many failed logins: "
                            f"try again in {math.ceil(wait / 60)} minutes.")
            return page("login.html", request, 401, error="Wrong user name or password.")
        request.session.clear()   # a new session for the new login (no fixation)
        request.session.update({"token": grant["token"], "user": grant["user"],
                                "admin": grant["admin"], "csrf": secrets.token_urlsafe(24)})
        return RedirectResponse("/domains", 303)

    async def logout(request: Request):
        if await csrf_ok(request) is not None and request.session.get("token"):
            try:
                await ask({"op": "logout", "token": request.session["token"]})
            except PrivsepError:
                pass
            request.session.clear()
        return RedirectResponse("/login", 303)

    async def signed_in(request: Request, message: dict):
        """The helper's answer for the session's login; a RedirectResponse
        to the login page when there is none (or it ended)."""
        token = request.session.get("token")
        if not token:
            return None
        try:
            return await ask({**message, "token": token})
        except PrivsepError as exc:
            if str(exc).startswith(LOGIN_GONE):
                request.session.clear()
                return None
            raise

    async def domains(request: Request):
        reply = await signed_in(request, {"op": "overview"})
        if reply is None:
            return RedirectResponse("/login", 303)
        return page("domains.html", request, domains=reply["domains"])

    async def domain(request: Request):
        name = request.path_params["domain"]
        if not _domain_name(name):
            return page("denied.html", request, 403)
        number = _page_number(request.query_params.get("page"))
        try:
            reply = await signed_in(request, {"op": "domain", "domain": name, "page": number})
        except PrivsepError as exc:
            if str(exc) == NOT_YOURS:
                return page("denied.html", request, 403)
            raise
        if reply is None:
            return RedirectResponse("/login", 303)
        return page("domain.html", request, name=name, d=reply, chart=chart(reply["history"]))

    async def action(request: Request):
        name, what = request.path_params["domain"], request.path_params["action"]
        if what not in ACTIONS or not _domain_name(name):
            return page("denied.html", request, 404 if what not in ACTIONS else 403)
        form = await csrf_ok(request)
        if form is None:
            return page("denied.html", request, 403)
        message = {"op": ACTIONS[what], "domain": name}
        if what == "relay":
            # "Use the provider's setting" sends the form without a relay
            relay = "" if "reset" in form else form.get("relay", "")
            relay = relay if isinstance(relay, str) else ""
            if len(relay) > MAX_RELAY:
                request.session["flash"] = (f"Nothing changed: a next hop is at most "
                                            f"{MAX_RELAY} characters.")
                return RedirectResponse(f"/domains/{name}", 303)
            message["relay"] = relay
        try:
            reply = await act(name, message, lambda m: signed_in(request, m))
        except PrivsepError as exc:
            if str(exc) == NOT_YOURS:
                return page("denied.html", request, 403)
            raise
        if reply is None and name in acting:
            request.session["flash"] = "An earlier request for this domain is still under way."
            return RedirectResponse(f"/domains/{name}", 303)
        if reply is None:
            return RedirectResponse("/login", 303)
        request.session["flash"] = {
            "release": lambda: outcome_words(reply["outcome"]),
            "pause": lambda: "Paused: nothing is delivered until you resume.",
            "resume": lambda: "Resumed: held mail goes out again when your server answers.",
            "return-refused": lambda: f"{reply['returned']} refused message(s) returned "
                                      "to their senders.",
            "relay": lambda: relay_words(reply),
        }[what]()
        return RedirectResponse(f"/domains/{name}", 303)

    # -- JSON API ----------------------------------------------------------
    def bearer(request: Request) -> str | None:
        kind, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        return token if kind.lower() == "bearer" and TOKEN.fullmatch(token) else None

    async def api_ask(request: Request, message: dict):
        token = bearer(request)
        if token is None:
            return _problem(401, "log in first: POST /api/v1/login, then "
                            "Authorization: Bearer TOKEN")
        if "domain" in message and not _domain_name(message["domain"]):
            return _problem(403, NOT_YOURS)
        try:
            return await ask({**message, "token": token})
        except PrivsepError as exc:
            if str(exc).startswith(LOGIN_GONE):
                return _problem(401, "the token expired or its login ended: log in again")
            if str(exc) == NOT_YOURS:
                return _problem(403, NOT_YOURS)
            raise

    async def api_login(request: Request):
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        if not isinstance(body.get("user"), str) or not isinstance(body.get("password"), str):
            return _problem(400, 'send {"user": ..., "password": ...}')
        grant, wait = await login_attempt(request, body["user"], body["password"])
        if grant is None:
            if wait:
                return _problem(429, "too many failed logins", {"Retry-After": str(wait)})
            return _problem(401, "wrong user name or password")
        return _json({"token": grant["token"], "user": grant["user"],
                      "admin": grant["admin"], "expires_in": int(settings.session_lifetime)})

    async def api_logout(request: Request):
        reply = await api_ask(request, {"op": "logout"})
        return reply if isinstance(reply, Response) else Response(status_code=204)

    async def api_domains(request: Request):
        reply = await api_ask(request, {"op": "overview"})
        return reply if isinstance(reply, Response) else _json(reply)

    async def api_domain(request: Request):
        reply = await api_ask(request, {"op": "domain", "domain": request.path_params["domain"],
                                        "page": _page_number(request.query_params.get("page"))})
        if isinstance(reply, Response):
            return reply
        reply["history"] = [{"hour": t, "messages": v} for t, v in reply["history"]]
        return _json(reply)

    async def api_action(request: Request):
        what = request.path_params["action"]
        if what not in ACTIONS:
            return _problem(404, "no such action")
        name = request.path_params["domain"]
        message = {"op": ACTIONS[what], "domain": name}
        if what == "relay":
            body = await _json_body(request)
            if isinstance(body, Response):
                return body
            if not isinstance(body.get("relay"), str):
                return _problem(400, 'send {"relay": "[host]:port"}, or {"relay": ""} for '
                                "the provider's setting")
            if len(body["relay"]) > MAX_RELAY:
                return _problem(400, f"a next hop is at most {MAX_RELAY} characters")
            message["relay"] = body["relay"]
        reply = await act(name, message, lambda m: api_ask(request, m))
        if reply is None:
            return _problem(429, "an earlier request for this domain is still under way",
                            {"Retry-After": "5"})
        if isinstance(reply, dict) and reply.get("refused"):
            if reply.get("busy"):
                return _problem(429, reply["refused"], {"Retry-After": "10"})
            return _problem(403 if reply.get("forbidden") else 400, reply["refused"])
        return reply if isinstance(reply, Response) else _json(reply)

    async def api_description(request: Request):
        return _json(openapi)

    async def failed(request: Request, exc: Exception):
        log.error("event=error path=%s reason=%r", request.url.path, str(exc))
        if request.url.path.startswith("/api/"):
            return _problem(503, "the service cannot answer now: try again shortly")
        return HTMLResponse("<h1>The service cannot answer now</h1><p>Please try again "
                            "shortly.</p>", status_code=503, headers=_SECURITY_HEADERS)

    routes = [
        Route("/", home, methods=["GET"]),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/domains", domains, methods=["GET"]),
        Route("/domains/{domain}", domain, methods=["GET"]),
        Route("/domains/{domain}/{action}", action, methods=["POST"]),
        Route("/api/v1/login", api_login, methods=["POST"]),
        Route("/api/v1/logout", api_logout, methods=["POST"]),
        Route("/api/v1/domains", api_domains, methods=["GET"]),
        Route("/api/v1/domains/{domain}", api_domain, methods=["GET"]),
        Route("/api/v1/domains/{domain}/{action}", api_action, methods=["POST"]),
        Route("/api/v1/openapi.json", api_description, methods=["GET"]),
    ]
    middleware = [Middleware(LimitBody), Middleware(SessionMiddleware, secret_key=secret or secrets.token_hex(32),
                             session_cookie="flushctl_session",
                             max_age=int(settings.session_lifetime), same_site="strict",
                             https_only=settings.secure_cookie)]
    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={PrivsepError: failed})


_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                               "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


_API_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def _json(data, status: int = 200, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(data, status_code=status, headers={**_API_HEADERS, **(headers or {})})


async def _json_body(request: Request) -> dict | Response:
    """The request's JSON object, or the problem to answer.  JSON only: a
    cross-site form (text/plain) cannot post it."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() \
            != "application/json":
        return _problem(415, "send application/json")
    try:
        body = await request.json()
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, dict):
        return _problem(400, "send a JSON object")
    return body


def _problem(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return _json({"error": detail}, status, headers)


def _domain_name(text: str) -> bool:
    """A domain name in canonical form (anything else is no domain of anyone's)."""
    try:
        return len(text) <= 253 and names.domain(text) == text
    except ValueError:
        return False


def _page_number(text) -> int:
    try:
        return max(1, min(int(text or 1), 10**6))
    except ValueError:
        return 1
