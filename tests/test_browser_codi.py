"""Instruct's Fast (CoDi) mode in a real (headless) Chromium, as a user uses it: with a model that has a CoDi model
the Mode radio offers Fast, and typing the instruction or choosing other Fast steps re-runs the edit without a
click; what the page shows is the Python API's edit with the same settings. Without a CoDi model, Fast is
disabled."""
from __future__ import annotations

import numpy as np
import pytest
from browser_support import fresh_page, launched_browser, needs_chromium
from test_browser_tabs import TRIANGLE, choose, open_tab, rgb, shown, type_into, upload
from test_codi import model_with_codi

pytestmark = needs_chromium
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
expect = sync_api.expect
TIMEOUT_MS = 45_000


@pytest.fixture(scope="module")
def browser():
    with launched_browser() as b:
        yield b


@pytest.fixture(scope="module")
def codi_model(tiny_model, tmp_path_factory):
    return model_with_codi(tiny_model, tmp_path_factory.mktemp("browser_codi") / "tiny-codi")


def api_edit(studio, instruction: str, steps: int, seed: int, guidance: float) -> np.ndarray:
    from pipelines.codi import CodiParams
    from pipelines.core.events import run_to_end

    return rgb(run_to_end(studio.instruct_fast(str(TRIANGLE), CodiParams(instruction, steps, guidance, seed)))
               .edited.image)


def test_fast_mode_re_runs_as_the_instruction_and_steps_change(browser, app_url, studio, codi_model, tmp_path):
    before = studio.model
    studio.model = codi_model  # the page loads with it: the Mode radio offers Fast
    try:
        with fresh_page(browser, app_url, TIMEOUT_MS, tmp_path / "page.png") as page:
            open_tab(page, "Instruct (InstructPix2Pix)")
            choose(page, "ip2p-mode", "Fast (CoDi)")
            expect(page.locator("#ip2p-fast-steps")).to_be_visible()
            expect(page.locator("#ip2p-steps")).to_be_hidden()
            expect(page.locator("#ip2p-run-fast")).to_be_visible()
            guidance = float(page.locator("#ip2p-fast-guidance input[type=number]").input_value())
            assert guidance == 2.0  # codi.json's
            choose(page, "ip2p-seed-mode", "Fix seed")
            type_into(page, "ip2p-seed", 21)
            upload(page, "ip2p-input", TRIANGLE)
            status = page.locator("#ip2p-status")
            type_into(page, "ip2p-instruction", "make the triangle red")  # no click: the edit runs
            expect(status).to_contain_text("Done", timeout=TIMEOUT_MS)
            expect(status).to_contain_text("4 steps")
            first = shown(page, "ip2p-result")
            assert np.array_equal(first, api_edit(studio, "make the triangle red", 4, 21, guidance))

            choose(page, "ip2p-fast-steps", "1")  # another step count: the edit runs again
            expect(status).to_contain_text("1 step ·", timeout=TIMEOUT_MS)
            expect(status).to_contain_text("Done", timeout=TIMEOUT_MS)
            one_step = shown(page, "ip2p-result")
            assert np.array_equal(one_step, api_edit(studio, "make the triangle red", 1, 21, guidance))
            assert not np.array_equal(one_step, first)
    finally:
        studio.model = before


def test_without_a_codi_model_fast_is_disabled(browser, app_url, tmp_path):
    with fresh_page(browser, app_url, TIMEOUT_MS, tmp_path / "page.png") as page:
        open_tab(page, "Instruct (InstructPix2Pix)")
        mode = page.locator("#ip2p-mode")
        expect(mode).to_contain_text("needs a CoDi model")
        expect(mode.get_by_label("Fast (CoDi)", exact=True)).to_be_disabled()
        expect(page.locator("#ip2p-fast-steps")).to_be_hidden()
