"""Fixtures for the console's browser tests (issue 13): headless Chromium
from Debian's package (``/usr/bin/chromium``) driven by Playwright for
Python -- never a browser Playwright downloads -- against a real
all-in-one ``twistd mppproxy`` whose release route is the real Postfix
backend of ``tests/realmta/conftest.py``.

Missing Chromium or Playwright (or Postfix) skips these tests, or fails
them with ``MPP_REQUIRE_SERVICES=1`` (CI), as every real-service test.
Like ``tests/realmta`` they are left out of the unit runs (tox.ini).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest

from realmta.conftest import (  # noqa: F401  (fixtures, used by name)
    postfix, postfix_backend, proxy_process, service_unavailable)

CHROMIUM = os.environ.get("MPP_CHROMIUM", "/usr/bin/chromium")
# As root (CI, this machine) Chromium runs only without its sandbox; no
# GPU, and /dev/shm may be small in containers.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--metrics-recording-only"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.realmta)


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    """Debian's Chromium, launched headless once for the session by
    Playwright (its own browsers are never downloaded or used)."""
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        service_unavailable(f"{CHROMIUM} missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        service_unavailable("playwright missing (pip install playwright, the test extra)")
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                        args=CHROMIUM_ARGS, timeout=30_000)
        except Exception as e:  # Playwright's own Error: the message says why
            service_unavailable(f"Chromium at {CHROMIUM} does not start: {e}")
        try:
            yield browser
        finally:
            browser.close()
