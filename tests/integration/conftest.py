"""Fixtures for integration tests: a private Postfix, our daemons, smtp-sink
(the machinery lives in tests/stack.py, shared with the benchmarks)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from instance import free_port  # noqa: E402,F401
from stack import (Sink, Stack, build_stack, default_domains, wait_until,  # noqa: E402,F401
                   write_config)

pytestmark = pytest.mark.integration


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0 or shutil.which("postfix", path="/usr/sbin:/usr/bin") is None:
        skip = pytest.mark.skip(reason="needs root and an installed Postfix")
        for item in items:
            if "integration" in str(item.fspath):
                item.add_marker(skip)


# Lifetimes of seconds: what would expire or bounce does so within a test.
SHORT_LIFETIMES = {
    "maximal_queue_lifetime": "4s",
    "bounce_queue_lifetime": "4s",
    "minimal_backoff_time": "1s",
    "maximal_backoff_time": "2s",
    "queue_run_delay": "1s",
}


def bounce_lines(stack) -> list[str]:
    """Log lines of mail that expired, bounced or made a sender notification
    (not Postfix's own notices to the postmaster, e.g. of a full disk, which
    the private instance has nowhere to deliver)."""
    return [line for line in stack.pf.log().splitlines()
            if ("status=expired" in line or "status=bounced" in line
                or "non-delivery notification" in line)
            and "orig_to=<postmaster>" not in line]



@pytest.fixture
def make_stack():
    """Build running stacks (see stack.build_stack); each is torn down at the end."""
    built = []

    def build(**kwargs):
        stack = build_stack(**kwargs)
        built.append(stack)
        return stack

    yield build
    # every daemon a test did not stop itself must still be serving at its end
    died = [line for stack in built for line in stack.dead_daemons()]
    for stack in built:
        stack.destroy()
    assert not died, died


@pytest.fixture
def stack(make_stack):
    return make_stack()


# -- a real browser (the portal's tests) ---------------------------------------

def _browser():
    """Headless Chromium from Debian's packages, through its chromedriver
    (nothing downloaded: Selenium is given both paths)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    chromium = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("chromium and chromium-driver (Debian packages) are needed")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=420,1400", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


@pytest.fixture
def browser():
    b = _browser()
    b.set_page_load_timeout(60)
    yield b
    b.quit()
