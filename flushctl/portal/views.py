"""What the portal's pages show and how: the templates, their filters, the chart, the words.

Pure: no requests, no helper.  ``assets`` reads the templates and the
OpenAPI description once, before the daemon gives up root.
"""

from __future__ import annotations

import json
import time
from importlib import resources

import jinja2

TEMPLATES = ("base.html", "login.html", "denied.html", "domains.html", "domain.html")
_ASSETS: list = []


def assets() -> tuple[jinja2.Environment, dict]:
    """The templates (each compiled now) and the OpenAPI description, read
    once: the daemon reads them before it gives up root."""
    if not _ASSETS:
        env = _environment()
        for name in TEMPLATES:
            env.get_template(name)
        with resources.files("flushctl.portal").joinpath("openapi.json").open("rb") as f:
            _ASSETS.extend((env, json.load(f)))
    return _ASSETS[0], _ASSETS[1]


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("flushctl.portal", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, auto_reload=False,
        cache_size=-1)
    env.filters["when"] = lambda t: "-" if t is None else time.strftime(
        "%Y-%m-%d %H:%M UTC", time.gmtime(t))
    env.filters["size"] = _size
    env.filters["age"] = _age
    return env


def _size(n) -> str:
    if n is None:
        return "-"
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _age(t) -> str:
    if t is None:
        return "-"
    s = max(0, time.time() - t)
    for unit, secs in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= secs:
            return f"{int(s // secs)} {unit}"
    return f"{int(s)} s"


def chart(history: list, width: int = 336, height: int = 60) -> dict:
    """A bar chart of hourly held counts as SVG geometry (no JavaScript)."""
    values = [v or 0 for _, v in history]
    top = max(values, default=0) or 1
    step = width / max(1, len(values))
    bars = [{"x": round(i * step, 2), "w": max(0.5, round(step - 0.3, 2)),
             "h": round(v / top * (height - 2), 2), "v": v, "t": t}
            for i, ((t, _), v) in enumerate(zip(history, values)) if v]
    return {"width": width, "height": height, "bars": bars, "top": top,
            "first": history[0][0] if history else None}


def outcome_words(outcome: dict) -> str:
    kind = outcome.get("kind")
    if kind == "released":
        if outcome.get("shared"):
            return "A delivery started moments ago is still under way; it takes this mail too."
        n = outcome.get("released", 0)
        return f"Delivery started: {n} message(s) on their way" + \
            (f" to {outcome['target']}." if outcome.get("target") else ".")
    if kind == "nothing held":
        return "Nothing is held: there is nothing to deliver."
    if kind == "unreachable":
        return "Your server does not answer; the mail stays held. " + outcome.get("detail", "")
    if kind == "paused":
        return "Deliveries are paused for this domain: resume them first."
    if kind == "nowhere":
        return "There is nowhere to deliver to: " + outcome.get("detail", "")
    return f"{kind}: {outcome.get('detail', '')}".strip()


def relay_words(reply: dict) -> str:
    if reply.get("refused"):
        return "Nothing changed: " + reply["refused"]
    where = reply.get("relay") or "your domain's own mail servers (its MX records)"
    text = f"Your mail goes to {where} from now on, the mail held here included."
    return text + (" " + reply["warning"] if reply.get("warning") else "")
