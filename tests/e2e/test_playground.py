"""The web playground in a real headless Chromium against the real embedded service.

One user walks through the loop in file order (sign in → chat → compare and pick → train →
activate / roll back); each test arranges through the API whatever an earlier one would have left,
so a single test also runs alone (`-k`). What the browser did is checked through the API.
Set E2E_SCREENSHOTS=1 to also save each main screen to docs/screenshots/.
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from tests.e2e.pages import (
    TRAINING_TIMEOUT_S,
    doc_screenshot,
    open_screen,
    preference_pairs,
    sign_in,
    train_via_api,
)
from tests.e2e.service import ServiceApi
from tests.support import OPERATOR_KEY

pytestmark = pytest.mark.slow

USER = "e2e-alice"
HOSTILE_SCRIPT = "<script>window.__pwned = 1</script>"
HOSTILE_IMG = '<img src=x onerror="window.__pwned = 2">'
HOSTILE_SQL = "'); DROP TABLE users; --"
# Records every text length the newest assistant bubble goes through: more than one distinct
# non-empty length means the answer arrived in pieces (streamed), not in one go.
WATCH_STREAM = """() => {
  window.__lengths = [];
  const log = document.getElementById("chat-log");
  new MutationObserver(() => {
    const bubbles = log.querySelectorAll(".bubble.assistant .bubble-text");
    const last = bubbles[bubbles.length - 1];
    if (last) window.__lengths.push(last.textContent.length);
  }).observe(log, { subtree: true, childList: true, characterData: true });
}"""


@pytest.fixture(scope="module")
def user_key(service_api: ServiceApi) -> str:
    """The API key of the user who walks through the playground."""
    return service_api.create_user(USER)


def ensure_pairs(api: ServiceApi, user_id: str, at_least: int) -> None:
    """Top the user's pairs up to `at_least`."""
    missing = at_least - api.user(user_id)["pair_count"]
    if missing > 0:
        api.add_pairs(user_id, preference_pairs(missing, f"top-up {at_least}"))


def test_sign_in_with_a_key(page: Page, user_key: str) -> None:
    response = page.goto("/")
    assert response is not None
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy

    field = page.get_by_label("API key")
    field.fill("bapo_not-a-real-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#signin-error")).to_contain_text("Invalid API key")
    expect(page.locator("#workspace")).to_be_hidden()

    field.fill(user_key)
    field.press("Enter")
    expect(page.get_by_test_id("who")).to_have_text(f"Signed in as {USER}")
    expect(page.get_by_test_id("current-user")).to_have_text(USER)
    expect(page.get_by_role("tab", name="Operator")).to_be_hidden()
    assert page.evaluate("Object.values(sessionStorage)") == [user_key]
    assert page.evaluate("localStorage.length") == 0

    page.reload()  # the key lives in the tab's session storage
    expect(page.get_by_test_id("who")).to_have_text(f"Signed in as {USER}")
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("API key")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0


def test_keyboard_only(page: Page, user_key: str) -> None:
    page.goto("/")
    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    page.keyboard.press("Tab")
    expect(page.get_by_label("API key")).to_be_focused()
    page.keyboard.type(user_key)
    page.keyboard.press("Enter")
    expect(page.get_by_test_id("who")).to_have_text(f"Signed in as {USER}")

    chat = page.get_by_role("tab", name="Chat")
    chat.focus()
    for key, screen in [("ArrowRight", "compare"), ("End", "training"), ("Home", "chat")]:
        page.keyboard.press(key)
        tab = page.locator(f"#tab-{screen}")
        expect(tab).to_be_focused()
        expect(tab).to_have_attribute("aria-selected", "true")
        expect(page.locator(f"#panel-{screen}")).to_be_visible()
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("", "none"), "keyboard focus must be visible"


def test_chat_streams_the_answer(page: Page, user_key: str) -> None:
    sign_in(page, user_key)
    expect(page.locator("#panel-chat")).to_be_visible()
    page.locator("#panel-chat").get_by_label("Max tokens").fill("12")
    page.evaluate(WATCH_STREAM)
    message = page.get_by_label("Message")
    message.fill("What is the capital of France?")
    message.press("Enter")

    reply = page.locator("#chat-log .bubble.assistant").last
    expect(reply.locator(".bubble-meta")).to_contain_text("·", timeout=60_000)
    assert reply.locator(".bubble-text").inner_text().strip()
    lengths = {n for n in page.evaluate("window.__lengths") if n > 0}
    assert len(lengths) >= 2, f"the answer did not arrive token by token: {lengths}"
    expect(reply.locator(".bubble-meta")).not_to_contain_text("failed")
    expect(page.locator("#chat-log .bubble.user").first).to_have_text(
        re.compile("What is the capital of France")
    )
    doc_screenshot(page, "chat")

    page.get_by_label("Base model").check()
    message.fill("Say hello.")
    page.get_by_role("button", name="Send").click()
    second = page.locator("#chat-log .bubble.assistant").nth(1)
    expect(second.locator(".bubble-meta")).to_contain_text("base", timeout=60_000)
    expect(page.locator("#chat-error")).to_be_hidden()


def test_compare_and_pick_stores_a_pair(page: Page, user_key: str, service_api: ServiceApi) -> None:
    before = service_api.user(USER)["pair_count"]
    sign_in(page, user_key)
    open_screen(page, "compare")
    expect(page.get_by_test_id("pair-count")).to_have_text(str(before))
    prompt = "Suggest a name for a cat."
    page.get_by_label("Prompt").fill(prompt)
    page.locator("#panel-compare").get_by_label("Max tokens").fill("10")
    pick_a = page.get_by_role("button", name="A is better")
    for _attempt in range(3):  # two samples of a tiny model can coincide: ask again then
        page.get_by_role("button", name="Generate both").click()
        expect(page.get_by_test_id("pick-result")).not_to_be_empty(timeout=60_000)
        if pick_a.is_enabled():
            break
    expect(pick_a).to_be_enabled()
    expect(pick_a).to_be_focused()  # ready for the keyboard
    answer_a = page.get_by_test_id("answer-a").inner_text()
    answer_b = page.get_by_test_id("answer-b").inner_text()
    pick_a.click()

    expect(page.get_by_test_id("pick-result")).to_contain_text("Saved pair")
    expect(page.get_by_test_id("pair-count")).to_have_text(str(before + 1))
    stored = service_api.pairs(USER)[0]
    assert stored["messages"][-1] == {"role": "user", "content": prompt}
    assert (stored["chosen"].strip(), stored["rejected"].strip()) == (
        answer_a.strip(),
        answer_b.strip(),
    )
    assert stored["metadata"]["source"] == "playground"
    expect(page.get_by_test_id("pairs-list").locator("li").first).to_contain_text(prompt)
    expect(pick_a).to_be_disabled()  # one pick per comparison
    doc_screenshot(page, "compare")


def test_training_dashboard_shows_progress_and_the_new_adapter(
    page: Page, user_key: str, service_api: ServiceApi
) -> None:
    sign_in(page, user_key)
    open_screen(page, "training")
    if service_api.user(USER)["pair_count"] < 4:  # the API refuses, the page says why
        page.get_by_role("button", name="Start training").click()
        expect(page.locator("#train-error")).to_contain_text("at least 4 preference pairs")
    ensure_pairs(service_api, USER, 4)
    versions_before = len(service_api.adapters(USER))

    page.locator("summary", has_text="Hyperparameters").click()
    page.get_by_label("Max steps").fill("2")
    page.get_by_label("Base answer tokens").fill("8")
    page.get_by_label("LoRA rank").select_option("8")
    page.evaluate("""() => {
      window.__statuses = [];
      const badge = document.getElementById("job-status");
      new MutationObserver(() => window.__statuses.push(badge.textContent))
        .observe(badge, { childList: true, characterData: true, subtree: true });
    }""")
    page.get_by_role("button", name="Start training").click()
    status = page.get_by_test_id("job-status")
    expect(status).to_have_text(re.compile("queued|running|succeeded"))
    expect(page.get_by_test_id("chart-loss")).to_contain_text(
        "latest loss", timeout=TRAINING_TIMEOUT_S * 1000
    )
    expect(status).to_have_text("succeeded", timeout=TRAINING_TIMEOUT_S * 1000)

    assert "running" in page.evaluate("window.__statuses"), "the running state was never shown"
    job = service_api.jobs(USER)[0]
    assert job["status"] == "succeeded" and job["hyperparameters"]["max_steps"] == 2
    version = job["adapter_version"]
    assert version == versions_before + 1
    expect(page.get_by_test_id("job-adapter")).to_have_text(f"v{version}")
    expect(page.get_by_test_id("job-step")).to_have_text("2")
    assert page.get_by_test_id("chart-loss").locator("polyline").count() >= 1
    assert page.get_by_test_id("chart-accuracy").locator("polyline").count() == 1
    assert page.get_by_test_id("chart-anchor").locator("polyline").count() == 1

    row = page.get_by_test_id("adapters-table").locator(f"tr[data-version='{version}']")
    expect(row).to_have_attribute("data-active", "true")
    expect(row.locator(".badge")).to_have_text("active")
    expect(row).to_contain_text("%")  # preference accuracy and retention
    expect(row).to_contain_text("nats")  # anchor drift
    # The gate's figures: MC accuracy base → adapter, change ± paired stderr, n, threshold with z
    knowledge = row.get_by_test_id("adapter-knowledge")
    expect(knowledge).to_contain_text(
        re.compile(r"% → .*% \(.*pts ± .*pts, 4 questions; fails below")
    )
    expect(knowledge).to_contain_text(", z = 2)")
    expect(row.get_by_test_id("adapter-degenerate")).to_contain_text(
        re.compile(r"% vs base .*% \(2 prompts; fails above .*%\)")
    )
    expect(page.get_by_test_id("active-adapter")).to_have_text(f"v{version}")
    assert service_api.user(USER)["active_adapter_version"] == version
    doc_screenshot(page, "training")


def test_activate_rolls_back_and_forward(
    page: Page, user_key: str, service_api: ServiceApi
) -> None:
    ensure_pairs(service_api, USER, 4)
    while len(service_api.adapters(USER)) < 2:  # same pairs: base answers and log-probs cached
        train_via_api(service_api, USER, max_steps=1)
    newest = max(a["version"] for a in service_api.adapters(USER))
    older = newest - 1
    sign_in(page, user_key)
    open_screen(page, "training")
    table = page.get_by_test_id("adapters-table")
    expect(table.locator(f"tr[data-version='{newest}']")).to_have_attribute("data-active", "true")

    table.get_by_role("button", name=f"Roll back to v{older}").click()
    expect(page.get_by_test_id("active-adapter")).to_have_text(f"v{older}")
    expect(table.locator(f"tr[data-version='{older}']")).to_have_attribute("data-active", "true")
    assert service_api.user(USER)["active_adapter_version"] == older

    page.get_by_role("button", name="Use the base model").click()
    expect(page.get_by_test_id("active-adapter")).to_have_text("none (base model)")
    assert service_api.user(USER)["active_adapter_version"] is None

    table.get_by_role("button", name=f"Activate v{newest}").click()
    expect(page.get_by_test_id("active-adapter")).to_have_text(f"v{newest}")
    assert service_api.user(USER)["active_adapter_version"] == newest

    open_screen(page, "chat")  # the personalized chat is now served by that version
    page.locator("#panel-chat").get_by_label("Max tokens").fill("6")
    page.get_by_label("Message").fill("Hi!")
    page.get_by_role("button", name="Send").click()
    meta = page.locator("#chat-log .bubble.assistant .bubble-meta").last
    expect(meta).to_contain_text(f"v{newest}", timeout=60_000)


def test_operator_view_lists_users(page: Page, user_key: str, service_api: ServiceApi) -> None:
    summary = service_api.user(USER)
    jobs = service_api.jobs(USER)
    versions = sorted((a["version"] for a in service_api.adapters(USER)), reverse=True)
    sign_in(page, OPERATOR_KEY)
    expect(page.get_by_test_id("who")).to_have_text("Signed in as operator")
    open_screen(page, "operator")

    row = page.get_by_test_id("users-table").locator(f"tr[data-user='{USER}']")
    cells = row.locator("td")
    expect(cells.nth(0)).to_have_text(str(summary["pair_count"]))
    active = summary["active_adapter_version"]
    expect(cells.nth(1)).to_have_text(f"v{active}" if active else "—")
    expect(cells.nth(2)).to_have_text(jobs[0]["status"] if jobs else "—")
    expect(cells.nth(3)).to_have_text(", ".join(f"v{v}" for v in versions) or "none")

    page.get_by_label("New user id (optional)").fill("e2e-bob")
    page.get_by_role("button", name="Create user").click()
    expect(page.get_by_test_id("new-key")).to_have_text(re.compile(r"^bapo_\S{20,}$"))
    expect(page.get_by_test_id("users-table").locator("tr[data-user='e2e-bob']")).to_be_visible()
    assert service_api.user("e2e-bob")["pair_count"] == 0
    doc_screenshot(page, "operator")

    row.get_by_role("button", name=f"Open {USER}").click()
    expect(page.locator("#panel-training")).to_be_visible()
    expect(page.get_by_label("User", exact=True)).to_have_value(USER)
    expect(page.get_by_test_id("current-user")).to_have_text(USER)


def test_hostile_text_is_shown_verbatim_and_never_runs(page: Page, service_api: ServiceApi) -> None:
    key = service_api.create_user("e2e-mallory")
    service_api.add_pairs(
        "e2e-mallory", [{"prompt": HOSTILE_SCRIPT, "chosen": HOSTILE_IMG, "rejected": HOSTILE_SQL}]
    )
    sign_in(page, key)
    open_screen(page, "compare")
    pair = page.get_by_test_id("pairs-list").locator("li").first
    expect(pair.locator(".prompt .pair-text")).to_have_text(HOSTILE_SCRIPT)
    expect(pair.locator(".chosen .pair-text")).to_have_text(HOSTILE_IMG)
    expect(pair.locator(".rejected .pair-text")).to_have_text(HOSTILE_SQL)

    open_screen(page, "chat")
    page.locator("#panel-chat").get_by_label("Max tokens").fill("4")
    page.get_by_label("Message").fill(HOSTILE_IMG)
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#chat-log .bubble.user .bubble-text")).to_have_text(HOSTILE_IMG)
    expect(page.locator("#chat-log .bubble-meta").last).to_contain_text("·", timeout=60_000)

    assert page.locator("main img, main script").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert service_api.user("e2e-mallory")["pair_count"] == 1


def test_phone_width_layout(phone_page: Page, user_key: str) -> None:
    page = phone_page
    sign_in(page, user_key)
    width = page.viewport_size["width"] if page.viewport_size else 375
    for screen in ("chat", "compare", "training"):
        open_screen(page, screen)
        overflow = page.evaluate("document.documentElement.scrollWidth")
        assert overflow <= width, f"{screen}: the page scrolls sideways ({overflow}px > {width}px)"
    open_screen(page, "compare")
    a = page.locator("#answer-a").bounding_box()
    b = page.locator("#answer-b").bounding_box()
    assert a and b and b["y"] >= a["y"] + a["height"], "answers should stack on a phone"
    button = page.get_by_role("button", name="Generate both").bounding_box()
    assert button and button["x"] + button["width"] <= width and button["height"] >= 36
    open_screen(page, "training")
    chart = page.get_by_test_id("chart-loss").bounding_box()
    assert chart and chart["x"] >= 0 and chart["x"] + chart["width"] <= width
    doc_screenshot(page, "phone-training")


def test_api_errors_are_shown(page: Page, user_key: str) -> None:
    sign_in(page, user_key)
    page.locator("#panel-chat").get_by_label("Max tokens").fill("100000")
    page.get_by_label("Message").fill("Hello")
    page.get_by_role("button", name="Send").click()
    error = page.locator("#chat-error")
    expect(error).to_contain_text("max_tokens")
    expect(error).to_contain_text("HTTP 422")
    expect(error).to_have_attribute("role", "alert")
    expect(page.locator("#chat-log .bubble.assistant").last).to_have_class(re.compile("failed"))
    expect(page.get_by_role("button", name="Send")).to_be_enabled()


def test_stream_parser_handles_split_events(page: Page) -> None:
    page.goto("/")
    pieces = page.evaluate("""async () => {
      const { serverSentEvents, chunkText } = await import("/static/api.js");
      const wire = ['data: {"choices":[{"delta":{"content":"Hel"}}]}\\r\\n\\r\\nda',
                    'ta: {"choices":[{"delta":{"content":"lo <b>"}}]}\\n',
                    '\\n: keep-alive\\n\\ndata: [DONE]\\n\\n'];
      const body = new ReadableStream({ start(c) {
        for (const part of wire) c.enqueue(new TextEncoder().encode(part));
        c.close();
      } });
      const out = [];
      for await (const event of serverSentEvents(body)) {
        out.push(event.data === "[DONE]" ? "[DONE]" : chunkText(JSON.parse(event.data)));
      }
      return out;
    }""")
    assert pieces == ["Hel", "lo <b>", "[DONE]"]
