"""The customers' web portal on a private Postfix with the milter, the
helper and the portal running: the JSON API with urllib, the pages in a
real browser (Debian's chromium and chromedriver, driven by Selenium).

Attacks: a wrong password, a form without the session's CSRF token,
another customer's domain (403, the same as a domain that does not
exist), a token that ended, login floods from one address.
"""

import json
import os
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port, wait_until

PASSWORD = "portal secret 1"
OTHER_PASSWORD = "other secret 2"
ADMIN_PASSWORD = "admin secret 3"
ARTIFACTS = Path(os.environ.get("FLUSHCTL_TEST_ARTIFACTS",
                                Path(__file__).resolve().parent.parent / "artifacts"))


def portal_domains(sink_port: int) -> str:
    return f"""
[domains."customer.test"]
relay = "[127.0.0.1]:{sink_port}"
users = ["cust1"]

[domains."other.test"]
relay = "[127.0.0.1]:{sink_port}"
users = ["cust2"]
quota_messages = 100
"""


def portal_section(extra: str = "") -> str:
    return f"""
[portal]
listen = "127.0.0.1:{free_port()}"
admins = ["ops"]
secure_cookie = false   # plain HTTP on loopback in the tests
login_failures = 4
page_size = 5
{extra}
"""


def start(make_stack, extra=""):
    stack = make_stack(domains=portal_domains, extra=portal_section(extra))
    for user, password in (("cust1", PASSWORD), ("cust2", OTHER_PASSWORD),
                           ("ops", ADMIN_PASSWORD)):
        stack.flushctl("user", "add", user, input=password + "\n")
    stack.start_portal()
    return stack


@pytest.fixture
def portal_stack(make_stack):
    return start(make_stack)


def call(stack, method, path, body=None, token=None, headers=None):
    """(status, JSON body or text) of one API call."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(stack.portal_url + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, raw, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        status, raw, ctype = exc.code, exc.read(), exc.headers.get("Content-Type", "")
    return status, (json.loads(raw) if "json" in ctype and raw else raw.decode())


def login(stack, user="cust1", password=PASSWORD) -> str:
    status, body = call(stack, "POST", "/api/v1/login", {"user": user, "password": password})
    assert status == 200, body
    return body["token"]


def test_api_shows_exactly_what_is_held_and_delivers_it(portal_stack):
    stack = portal_stack
    for i in range(7):
        stack.send(["alice@customer.test", "carol@customer.test"], subject=f"note {i}")
        stack.send(["bob@other.test"], subject=f"other {i}")
    wait_until(lambda: stack.status("customer.test")[0]["messages"] == 7, 30, what="held")
    token = login(stack)
    status, body = call(stack, "GET", "/api/v1/domains", token=token)
    assert status == 200, body
    assert [d["domain"] for d in body["domains"]] == ["customer.test"]   # not other.test
    assert body["domains"][0]["messages"] == 7
    status, body = call(stack, "GET", "/api/v1/domains/customer.test?page=2", token=token)
    assert status == 200, body
    held = body["held"]
    assert (held["total"], held["page"], held["pages"]) == (7, 2, 2)
    assert len(held["messages"]) == 2
    queue = {e["queue_id"] for e in stack.queue()}
    for m in held["messages"]:
        assert m["queue_id"] in queue
        assert sorted(m["recipients"]) == ["alice@customer.test", "carol@customer.test"]
        assert re.fullmatch(r"note \d", m["subject"]) and m["sender"] == "someone@sender.test"
    # another customer's domain and one that does not exist: the same 403
    for name in ("other.test", "nosuch.test", "..", "x" * 300):
        status, body = call(stack, "GET", f"/api/v1/domains/{name}", token=token)
        assert (status, body) == (403, {"error": "no such domain"}), name
        status, _ = call(stack, "POST", f"/api/v1/domains/{name}/release", token=token)
        assert status == 403
    assert stack.status("other.test")[0]["messages"] == 7
    stack.sink.start()
    status, body = call(stack, "POST", "/api/v1/domains/customer.test/release", token=token)
    assert status == 200 and body["outcome"]["kind"] == "released", body
    wait_until(lambda: stack.status("customer.test")[0]["messages"] == 0, 60, what="delivered")
    assert len([m for m in stack.sink.messages() if "alice@customer.test" in m]) == 7
    assert stack.status("other.test")[0]["messages"] == 7   # the other customer's stays
    status, body = call(stack, "GET", "/api/v1/domains/customer.test", token=token)
    assert body["status"]["last_flush_trigger"] == "portal"


def test_api_refuses_without_a_valid_token(portal_stack):
    stack = portal_stack
    assert call(stack, "GET", "/api/v1/domains")[0] == 401
    assert call(stack, "GET", "/api/v1/domains", token="0" * 32)[0] == 401
    assert call(stack, "POST", "/api/v1/login", {"user": "cust1", "password": "wrong"})[0] == 401
    token = login(stack)
    assert call(stack, "POST", "/api/v1/logout", token=token)[0] == 204
    assert call(stack, "GET", "/api/v1/domains", token=token)[0] == 401
    token = login(stack)
    stack.flushctl("user", "passwd", "cust1", input="a new password\n")
    assert call(stack, "GET", "/api/v1/domains", token=token)[0] == 401   # the login changed


def test_login_floods_from_one_address_wait(portal_stack):
    stack = portal_stack
    for _ in range(4):
        assert call(stack, "POST", "/api/v1/login", {"user": "nobody-here", "password": "x"}
                    )[0] == 401
    status, body = call(stack, "POST", "/api/v1/login", {"user": "cust1", "password": PASSWORD})
    assert status == 429, body   # even the right password, from this address, for now


def test_admin_sees_and_steers_every_domain(portal_stack):
    stack = portal_stack
    token = login(stack, "ops", ADMIN_PASSWORD)
    status, body = call(stack, "GET", "/api/v1/domains", token=token)
    assert [d["domain"] for d in body["domains"]] == ["customer.test", "other.test"]
    assert call(stack, "POST", "/api/v1/domains/other.test/pause", token=token)[0] == 200
    assert stack.status("other.test")[0]["paused"] is True
    assert call(stack, "POST", "/api/v1/domains/other.test/resume", token=token)[0] == 200
    assert stack.status("other.test")[0]["paused"] is False


def test_openapi_description_matches_the_served_routes(portal_stack):
    from flushctl.portal.app import build
    from starlette.routing import Route
    status, spec = call(portal_stack, "GET", "/api/v1/openapi.json")
    assert status == 200 and spec["openapi"].startswith("3.")
    described = {(re.sub(r"\{[^}]+\}", "{}", path), method.upper())
                 for path, ops in spec["paths"].items() for method in ops}
    app = build(None, portal_stack.cfg.portal)
    served = set()
    for route in app.routes:
        if isinstance(route, Route) and route.path.startswith("/api/"):
            for method in route.methods - {"HEAD"}:
                if route.path.endswith("{action}"):
                    from flushctl.portal.app import ACTIONS
                    served |= {(route.path.replace("{domain}", "{}")
                                .replace("{action}", a), method) for a in ACTIONS}
                else:
                    served.add((re.sub(r"\{[^}]+\}", "{}", route.path), method))
    assert described == served
    # and each described call answers as described (no 404/405 for any of them)
    token = login(portal_stack)
    for path, method in sorted(described):
        status, _ = call(portal_stack, method, path.replace("{}", "customer.test"),
                         body={} if method == "POST" and "login" not in path else None,
                         token=None if path.endswith("openapi.json") else token)
        assert status not in (404, 405), (path, method, status)
