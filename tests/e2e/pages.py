"""What a person does on the playground, as reusable steps (sign in, open a screen, screenshots)."""

from __future__ import annotations

import os
import time
from typing import Any

from playwright.sync_api import Page, expect

from tests.e2e.service import REPO_ROOT, ServiceApi

DOC_SCREENSHOTS = REPO_ROOT / "docs" / "screenshots"
TAB_NAMES = {
    "chat": "Chat",
    "compare": "Compare & pick",
    "training": "Training",
    "operator": "Operator",
}
TRAINING_TIMEOUT_S = 240


def sign_in(page: Page, key: str) -> None:
    """Open the page and sign in with `key` (typed, then Enter)."""
    page.goto("/")
    field = page.get_by_label("API key")
    field.fill(key)
    field.press("Enter")
    expect(page.get_by_test_id("who")).to_contain_text("Signed in as")


def open_screen(page: Page, screen: str) -> None:
    """Click a screen's tab and wait until its panel shows."""
    page.get_by_role("tab", name=TAB_NAMES[screen], exact=True).click()
    expect(page.locator(f"#panel-{screen}")).to_be_visible()


def doc_screenshot(page: Page, name: str) -> None:
    """With E2E_SCREENSHOTS=1, save the page as docs/screenshots/<name>.png (for the README)."""
    if os.environ.get("E2E_SCREENSHOTS", "") not in ("", "0"):
        DOC_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(DOC_SCREENSHOTS / f"{name}.png"), full_page=True)


def wait_for_job(api: ServiceApi, user_id: str, timeout_s: float = TRAINING_TIMEOUT_S) -> Any:
    """Poll the API until the user's newest job has finished; return it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = api.jobs(user_id)[0]
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise AssertionError(f"training of {user_id} did not finish in {timeout_s}s")


def train_via_api(api: ServiceApi, user_id: str, **hyperparameters: Any) -> Any:
    """Train one adapter through the API (arranging state a test needs); return the job."""
    body = {"hyperparameters": hyperparameters} if hyperparameters else {}
    response = api.http.post(f"/users/{user_id}/train", json=body, headers=api.operator)
    assert response.status_code in (200, 202), response.text
    job = wait_for_job(api, user_id)
    assert job["status"] == "succeeded", job
    return job


def preference_pairs(count: int, topic: str) -> list[dict[str, str]]:
    """`count` short, distinct pairs (tiny: training on them takes seconds)."""
    return [
        {
            "prompt": f"{topic} question {i}: what is {i} plus {i}?",
            "chosen": f"{i} plus {i} is {2 * i}.",
            "rejected": "I don't know.",
        }
        for i in range(1, count + 1)
    ]
