"""Every tab's main task in a real (headless) Chromium, done as a user does it: typing, moving sliders, uploading,
clicking points and painting with the mouse. Each test checks the pixels of what the page shows (fetched from the
<img> sources as the browser does), mostly against the Studio Python API run in-process on the same model with the
same settings. DiffEdit's paint-then-apply path is tests/test_browser_diffedit.py.

Runs against the `app_url` fixture (the tiny random model on 127.0.0.1); every other request is blocked. Elements
are found by elem_id or label, never by position, so layout changes do not break the tests.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from browser_support import fresh_page, launched_browser, needs_chromium
from PIL import Image

pytestmark = needs_chromium
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
expect = sync_api.expect

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
TRIANGLE = EXAMPLES / "blue_triangle_centre.png"       # 64x64: the tiny model's own size
CIRCLE = EXAMPLES / "yellow_circle_bottom_left.png"
PROMPT = "a small red circle on the left on a white background"
TIMEOUT_MS = 45_000   # generous: the box may be busy; each task takes a few seconds


@pytest.fixture(scope="module")
def browser():
    with launched_browser() as b:
        yield b


@pytest.fixture
def page(browser, app_url, tmp_path):
    """A fresh browser session (its own Gradio session) on the app; a screenshot is kept for a failing run."""
    with fresh_page(browser, app_url, TIMEOUT_MS, tmp_path / "page.png") as pg:
        yield pg


# ------------------------------------------------------------------ what a user does
def open_tab(pg, name: str) -> None:
    pg.get_by_role("tab", name=name).click()


def type_into(pg, elem_id: str, text: str) -> None:
    box = pg.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(str(text))
    box.press("Tab")


def set_slider(pg, elem_id: str, value) -> None:
    """Types into the slider's number box and leaves it (the value a user types next to the slider)."""
    box = pg.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")
    expect(pg.locator(f"#{elem_id} input[type=range]")).to_have_value(str(value))


def choose(pg, elem_id: str, label: str) -> None:
    pg.locator(f"#{elem_id}").get_by_label(label, exact=True).check()


def upload(pg, elem_id: str, path: Path) -> None:
    pg.locator(f"#{elem_id} input[type=file]").set_input_files(str(path))
    pg.locator(f"#{elem_id} img").first.wait_for()


def run(pg, button_id: str, status_id: str, done: str = "Done") -> str:
    pg.click(f"#{button_id}")
    expect(pg.locator(f"#{status_id}")).to_contain_text(done, timeout=TIMEOUT_MS)
    return pg.locator(f"#{status_id}").inner_text()


def paint(pg, canvas, strokes: list[tuple[float, float]]) -> None:
    """One brush stroke through `strokes` (fractions of the canvas element's box), with the mouse held down."""
    box = canvas.bounding_box()
    xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in strokes]
    pg.mouse.move(*xy[0])
    pg.mouse.down()
    for x, y in xy[1:]:
        pg.mouse.move(x, y, steps=2)
    pg.mouse.up()


# ------------------------------------------------------------------ what the page shows
def pixels(pg, img) -> np.ndarray:
    """The image an <img> shows, as the browser fetched it (RGB uint8)."""
    src = img.get_attribute("src")
    assert src, "the image has no source"
    body = pg.request.get(src).body()
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


def shown(pg, elem_id: str) -> np.ndarray:
    return pixels(pg, pg.locator(f"#{elem_id} img").first)


def rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def vae_round_trip(studio, path: Path) -> np.ndarray:
    """The best any inversion can reconstruct: the image through the model's VAE and back."""
    import torch

    from pipelines.core.latents import decode_to_pil, encode_image
    from pipelines.inversion import prepare_image

    with torch.no_grad():
        return rgb(decode_to_pil(studio.model, encode_image(studio.model, prepare_image(studio.model, path))))


def in_process(job):
    from pipelines.core.events import run_to_end

    return run_to_end(job)


# ------------------------------------------------------------------ the tabs
def test_generate_shows_what_the_python_api_makes(page, studio):
    from pipelines.generate import GenerateParams

    type_into(page, "gen-prompt", PROMPT)
    type_into(page, "gen-seed", 1234)
    set_slider(page, "gen-steps", 4)
    status = run(page, "gen-run", "gen-status")
    assert "seed 1234" in status, status
    result = shown(page, "gen-result")

    side = studio.model.resolution
    expected = in_process(studio.generate(GenerateParams(PROMPT, "", 1234, 4, 7.5, side, side))).image
    assert result.shape == (side, side, 3)   # served at native size
    assert np.array_equal(result, rgb(expected)), "the page shows another image than the API makes"


def test_interpolate_sequence_then_scrub_to_a_frame(page):
    open_tab(page, "Interpolate (seeds)")
    type_into(page, "int-prompt-a", PROMPT)
    set_slider(page, "int-steps", 3)
    set_slider(page, "int-frames", 4)
    run(page, "int-seq", "int-status", "4 frames")
    gallery = page.locator("#int-gallery img")
    expect(gallery).to_have_count(4)
    frames = [pixels(page, gallery.nth(k)) for k in range(4)]
    assert not np.array_equal(frames[0], frames[-1]), "seed A and seed B gave the same image"
    assert np.array_equal(shown(page, "int-frame-img"), frames[-1])   # the frame box shows the last frame

    # scrub: the slider released at eta = 0 renders seed A's frame, the sequence's first
    set_slider(page, "int-eta", 0)
    expect(page.locator("#int-status")).to_contain_text("Frame at eta=0.00", timeout=TIMEOUT_MS)
    assert np.array_equal(shown(page, "int-frame-img"), frames[0])


def test_real_image_interpolation_runs_from_one_upload_to_the_other(page, studio):
    open_tab(page, "Interpolate (real images)")
    upload(page, "rint-image-a", TRIANGLE)
    upload(page, "rint-image-b", CIRCLE)
    type_into(page, "rint-prompt-a", "a large blue triangle in the centre, yellow background")
    choose(page, "rint-method", "DDIM inversion")
    set_slider(page, "rint-steps", 5)
    set_slider(page, "rint-frames", 3)
    run(page, "rint-seq", "rint-status", "3 frames")
    gallery = page.locator("#rint-gallery img")
    expect(gallery).to_have_count(3)
    first, last = pixels(page, gallery.nth(0)), pixels(page, gallery.nth(2))
    a, b = vae_round_trip(studio, TRIANGLE), vae_round_trip(studio, CIRCLE)
    # the ends are the two inversions' reconstructions (through the tiny model's random VAE, so compared with
    # each image's VAE round trip)
    assert psnr(first, a) > psnr(first, b) + 5, (psnr(first, a), psnr(first, b))
    assert psnr(last, b) > psnr(last, a) + 5, (psnr(last, b), psnr(last, a))


# Null-text inversion (5 steps) on the tiny model reconstructs the VAE round trip at 31-32 dB; another image's
# round trip, or a decoded random latent, is at about 14 dB from it.
INVERT_FLOOR_DB = 25.0


def test_invert_reconstructs_the_upload(page, studio):
    open_tab(page, "Invert")
    upload(page, "inv-input", TRIANGLE)
    choose(page, "inv-method", "Null-text inversion (fast)")
    set_slider(page, "inv-steps", 5)
    run(page, "inv-run", "inv-status")
    source, recon = shown(page, "inv-source"), shown(page, "inv-result")
    assert np.array_equal(source, rgb(Image.open(TRIANGLE)))   # 64 px: the model sees the upload as it is
    assert psnr(recon, vae_round_trip(studio, TRIANGLE)) > INVERT_FLOOR_DB
    assert psnr(recon, vae_round_trip(studio, CIRCLE)) < INVERT_FLOOR_DB - 5


def test_edit_threshold_r_is_the_api_edit(page, studio):
    from pipelines.edit import EditParams

    source_prompt = "a large blue triangle in the centre, yellow background"
    target_prompt = "a large red triangle in the centre, yellow background"
    open_tab(page, "Edit (text)")
    upload(page, "edit-input", TRIANGLE)
    type_into(page, "edit-source-prompt", source_prompt)
    type_into(page, "edit-target-prompt", target_prompt)
    choose(page, "edit-method", "Threshold r (prompt switch)")
    set_slider(page, "edit-r", 0.6)
    choose(page, "edit-inv-method", "DDIM inversion")
    set_slider(page, "edit-steps", 5)
    status = run(page, "edit-run", "edit-status")
    assert "threshold r=0.6" in status, status
    edited = shown(page, "edit-result")

    p = EditParams(source_prompt, target_prompt, "threshold", 0.6, 5, 7.5, "ddim")
    assert np.array_equal(edited, rgb(in_process(studio.edit(str(TRIANGLE), p)).edited.image))
    # r reached the model: the tab's default r (0.8) and r = 0 (the reconstruction) give other pictures (on the
    # tiny model's random text encoder, a one-word change of prompt moves few pixels)
    for other_r in (0.8, 0.0):
        p.r = other_r
        assert not np.array_equal(edited, rgb(in_process(studio.edit(str(TRIANGLE), p)).edited.image)), other_r


def test_instruct_is_the_api_edit(page, studio):
    from pipelines.instruct import InstructParams

    instruction = "make the triangle red"
    open_tab(page, "Instruct (InstructPix2Pix)")
    upload(page, "ip2p-input", TRIANGLE)
    type_into(page, "ip2p-instruction", instruction)
    set_slider(page, "ip2p-steps", 4)
    choose(page, "ip2p-seed-mode", "Fix seed")
    type_into(page, "ip2p-seed", 77)
    text_g = float(page.locator("#ip2p-text-guidance input[type=number]").input_value())
    image_g = float(page.locator("#ip2p-image-guidance input[type=number]").input_value())
    run(page, "ip2p-run", "ip2p-status")
    edited = shown(page, "ip2p-result")

    p = InstructParams(instruction, text_g, image_g, 4, 77, "euler_a")
    expected = in_process(studio.instruct(str(TRIANGLE), p))
    assert np.array_equal(edited, rgb(expected.edited.image))
    assert not np.array_equal(edited, rgb(Image.open(TRIANGLE)))


def test_sdedit_turns_painted_strokes_into_candidates(page, studio):
    from pipelines.sdedit import SDEditParams

    open_tab(page, "SDEdit (strokes)")
    editor = page.locator("#sdedit-canvas")
    editor.get_by_label("Brush").first.click()   # the blank canvas needs the draw tool
    canvas = editor.locator("canvas").first
    canvas.wait_for()
    paint(page, canvas, [(0.35, 0.4), (0.5, 0.55), (0.65, 0.45)])
    type_into(page, "sdedit-prompt", PROMPT)
    set_slider(page, "sdedit-strength", 0.5)
    set_slider(page, "sdedit-steps", 8)
    set_slider(page, "sdedit-repeats", 2)
    type_into(page, "sdedit-seed", 3)
    status = run(page, "sdedit-run", "sdedit-status")
    assert "2 candidate(s)" in status, status
    gallery = page.locator("#sdedit-gallery img")
    expect(gallery).to_have_count(2)
    first, second = pixels(page, gallery.nth(0)), pixels(page, gallery.nth(1))
    assert not np.array_equal(first, second), "seeds 3 and 4 gave the same candidate"

    # the strokes painted here reached the model: the same run on other strokes (a grey patch on white paper)
    # gives another picture
    side = studio.model.resolution
    other = Image.new("RGB", (side, side), "white")
    other.paste((128, 128, 128), (4, 4, side // 4, side // 4))
    from_other = in_process(studio.sdedit(other, SDEditParams(PROMPT, "", 0.5, 8, 7.5, 3, 1))).images[0].image
    assert first.shape == (side, side, 3)
    assert np.abs(first.astype(int) - rgb(from_other).astype(int)).mean() > 2, "the strokes changed nothing"


def test_drag_marks_the_points_and_changes_the_region(page, studio):
    open_tab(page, "Drag (DragDiffusion)")
    upload(page, "drag-input", TRIANGLE)
    expect(page.locator("#drag-status")).to_contain_text("Image ready", timeout=TIMEOUT_MS)

    points = page.locator("#drag-points img")
    box = points.bounding_box()
    clicks = {"handle": (0.5, 0.5), "target": (0.75, 0.5)}
    for kind, (fx, fy) in clicks.items():
        before = points.get_attribute("src")
        points.evaluate("img => img.decode()")   # a click on a picture still loading has no coordinates
        page.mouse.click(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
        expect(page.locator("#drag-status")).to_contain_text(f"{kind} at", timeout=TIMEOUT_MS)
        expect(points).not_to_have_attribute("src", before, timeout=TIMEOUT_MS)
    marked = pixels(page, points).astype(int)
    h, w = marked.shape[:2]
    handle = marked[int(h * 0.5), int(w * 0.5)]
    target = marked[int(h * 0.5), int(w * 0.75)]
    assert handle[0] - max(handle[1], handle[2]) > 100, f"no red handle where clicked: {handle}"
    assert target[2] - max(target[0], target[1]) > 100, f"no blue target where clicked: {target}"

    # the editable region: one stroke through the middle of the picture, under both points
    mask = page.locator("#drag-mask")
    mask.get_by_label("Brush").first.click()
    paint(page, mask.locator("canvas").first, [(0.4, 0.5), (0.5, 0.5), (0.6, 0.5)])
    page.get_by_text("Drag settings").click()
    set_slider(page, "drag-lora-steps", 0)
    set_slider(page, "drag-iters", 5)
    set_slider(page, "drag-strength", 0.2)   # 10 of 50 steps inverted and denoised
    run(page, "drag-run", "drag-status")
    assert "no region painted" not in page.locator("#drag-status").inner_text()
    dragged = shown(page, "drag-result").astype(int)
    # The tiny model's random VAE changes every pixel, so the drag is measured against the source's VAE round
    # trip (what inverting and denoising alone give): the painted band around the points moved (1.5 measured),
    # rows far from it hardly did (0.1).
    side = dragged.shape[0]
    change = np.abs(dragged - vae_round_trip(studio, TRIANGLE).astype(int)).mean(axis=2)
    band = change[side // 2 - 4:side // 2 + 4, side // 2 - 4:side * 3 // 4 + 4].mean()
    far = np.concatenate([change[:8], change[-8:]]).mean()
    assert band > 0.5 and band > 4 * far, (band, far)
