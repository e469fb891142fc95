"""What every browser test module shares: Debian's Chromium launched headless with the flags this machine needs,
and a page on the app that may reach nothing but the app (no fonts, CDNs or telemetry from the outside world).
Playwright's own browsers are never downloaded."""
from __future__ import annotations

import os
from contextlib import contextmanager

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 1600}
needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM}")


@contextmanager
def launched_browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


def app_only(context, app_url: str):
    """Requests to anything but the app are aborted."""
    context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(app_url)
                  else route.abort())
    return context


def open_app(context, app_url: str, timeout_ms: int):
    """A new page of `context` on the app, once its first tab is drawn."""
    app_only(context, app_url)
    pg = context.new_page()
    pg.set_default_timeout(timeout_ms)
    pg.goto(app_url, wait_until="domcontentloaded")
    pg.wait_for_selector("#gen-prompt textarea")
    # the page script (studio.js: Ctrl+Enter, crisp small results) runs after the first draw: a key pressed
    # before it has installed its listener would do nothing
    pg.wait_for_function("() => window.studioKeysInstalled === true")
    return pg


@contextmanager
def fresh_page(browser, app_url: str, timeout_ms: int, screenshot):
    """A page in a new browser context (its own Gradio session); a full-page screenshot is saved to `screenshot`
    when it closes, for looking at a failed run."""
    context = browser.new_context(viewport=VIEWPORT)
    pg = open_app(context, app_url, timeout_ms)
    try:
        yield pg
    finally:
        try:
            pg.screenshot(path=str(screenshot), full_page=True)
        finally:
            context.close()
