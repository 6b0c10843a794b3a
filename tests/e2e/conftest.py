"""Browser fixtures: the embedded service, Debian's headless Chromium driven by Playwright, a page
per test (its JavaScript errors and CSP violations fail the test; a screenshot is kept on failure).

Chromium comes from apt (`apt-get install -y chromium`): Playwright's own browser download does not
work here, so `playwright install` is never run.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, Playwright, sync_playwright

from tests.e2e.service import REPO_ROOT, EmbeddedService, ServiceApi

CHROMIUM = os.environ.get("E2E_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ARTIFACTS = REPO_ROOT / "test-artifacts" / "e2e"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 375, "height": 740}
# The page probes /whoami without a key once (for servers that allow anonymous local use).
EXPECTED_CONSOLE = re.compile(r"status of (401|403|404|409|422)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item, so fixtures can tell whether the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(scope="package")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedService]:
    """The embedded service (API + Celery worker + beat) for the whole e2e session."""
    running = EmbeddedService(tmp_path_factory.mktemp("e2e-data")).start()
    yield running
    running.stop()


@pytest.fixture(scope="package")
def service_api(service: EmbeddedService) -> Iterator[ServiceApi]:
    """Direct API access to arrange state and to check what the browser stored."""
    client = ServiceApi(service.url)
    yield client
    client.close()


@pytest.fixture(scope="package")
def playwright_driver() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="package")
def browser(playwright_driver: Playwright) -> Iterator[Browser]:
    """Debian's Chromium, headless."""
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: install it with `apt-get install -y chromium`")
    launched = playwright_driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield launched
    launched.close()


def _new_page(
    browser: Browser, service: EmbeddedService, request: pytest.FixtureRequest, viewport: Any
) -> Iterator[Page]:
    context = browser.new_context(base_url=service.url, viewport=viewport)
    page = context.new_page()
    page.set_default_timeout(20_000)
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on(
        "console",
        lambda msg: (
            problems.append(f"console {msg.type}: {msg.text}")
            if msg.type == "error" and not EXPECTED_CONSOLE.search(msg.text)
            else None
        ),
    )
    yield page
    failed = getattr(request.node, "report_call", None)
    if failed is not None and failed.failed:
        _save_artifacts(page, request.node.name, service)
    context.close()
    assert not problems, f"the page logged errors: {problems}"


@pytest.fixture
def page(
    browser: Browser, service: EmbeddedService, request: pytest.FixtureRequest
) -> Iterator[Page]:
    """A fresh desktop-sized page (own session storage) on the service."""
    yield from _new_page(browser, service, request, DESKTOP)


@pytest.fixture
def phone_page(
    browser: Browser, service: EmbeddedService, request: pytest.FixtureRequest
) -> Iterator[Page]:
    """A fresh phone-sized (375 px wide) page."""
    yield from _new_page(browser, service, request, PHONE)


def _save_artifacts(page: Page, name: str, service: EmbeddedService) -> None:
    """Screenshot, page HTML and the service log of a failed test, in test-artifacts/e2e/."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    try:
        page.screenshot(path=str(ARTIFACTS / f"{safe}.png"), full_page=True)
        (ARTIFACTS / f"{safe}.html").write_text(page.content())
    except Exception as exc:  # a crashed page must not hide the test's own failure
        (ARTIFACTS / f"{safe}.txt").write_text(f"no screenshot: {exc}")
    (ARTIFACTS / f"{safe}.service.log").write_text(service.log_tail(400))
