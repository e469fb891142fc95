"""The README's screenshots: the studio on the embedded model, each key tab's main task done in headless Chromium
as a user does it (typing, clicking, painting), one PNG per tab in docs/screenshots/.

    python docs/make_screenshots.py [--out docs/screenshots] [--only generate,drag]

Needs the Debian chromium at /usr/bin/chromium and the playwright Python package (no browser is downloaded); the
Debian package fonts-noto-color-emoji draws the seed buttons' icons. It runs offline on the CPU in a few minutes.
Each picture is cropped to the tab's content, down to its status line and results, and saved as a 256-colour
palette PNG, so it stays small.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
EXAMPLES = ROOT / "assets" / "examples"
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run", "--disable-sync"]
WIDTH = 1400
TIMEOUT_MS = 300_000


def serve_embedded() -> str:
    """The app on the embedded model on 127.0.0.1 (as `studio serve --model embedded`), in this process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from app.cli import launch
    from pipelines.core.models import EMBEDDED_ID
    from pipelines.studio import Studio

    demo = launch(Studio().start(EMBEDDED_ID), prevent_thread_lock=True, quiet=True)
    return demo.local_url.rstrip("/") + "/"


# ------------------------------------------------------------------ what a user does
class User:
    def __init__(self, page):
        self.pg = page

    def tab(self, name: str) -> None:
        self.pg.get_by_role("tab", name=name).click()

    def type(self, elem_id: str, text) -> None:
        box = self.pg.locator(f"#{elem_id} textarea, #{elem_id} input").first
        box.fill(str(text))
        box.press("Tab")

    def slider(self, elem_id: str, value) -> None:
        box = self.pg.locator(f"#{elem_id} input[type=number]")
        box.fill(str(value))
        box.press("Tab")

    def choose(self, elem_id: str, label: str) -> None:
        self.pg.locator(f"#{elem_id}").get_by_label(label, exact=True).check()

    def upload(self, elem_id: str, path: Path) -> None:
        self.pg.locator(f"#{elem_id} input[type=file]").set_input_files(str(path))
        self.pg.locator(f"#{elem_id} img").first.wait_for()

    def run(self, button_id: str, status_id: str, done: str = "Done") -> None:
        from playwright.sync_api import expect

        self.pg.click(f"#{button_id}")
        expect(self.pg.locator(f"#{status_id}")).to_contain_text(done, timeout=TIMEOUT_MS)
        self.pg.wait_for_timeout(800)   # images finish loading

    def paint(self, canvas, points: list[tuple[float, float]]) -> None:
        """One stroke through `points` (fractions of the canvas element's box, or of a box), mouse held down."""
        box = canvas if isinstance(canvas, dict) else canvas.bounding_box()
        xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
        self.pg.mouse.move(*xy[0])
        self.pg.mouse.down()
        for x, y in xy[1:]:
            self.pg.mouse.move(x, y, steps=4)
        self.pg.mouse.up()

    def picture_box(self, canvas) -> dict:
        """Where the picture lies inside an image editor's canvas (the editor centres and zooms it): the rows and
        columns mostly unlike the canvas's empty corner (the toolbar's few icons are not)."""
        import io

        import numpy as np
        from PIL import Image

        shot = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB")).astype(int)
        differs = np.abs(shot - shot[2, 2]).sum(axis=2) > 30
        x0, x1 = longest_run(differs.mean(axis=0) > 0.5)
        y0, y1 = longest_run(differs[:, x0:x1].mean(axis=1) > 0.5)
        box, k = canvas.bounding_box(), box_scale(canvas, shot)
        return {"x": box["x"] + x0 / k, "y": box["y"] + y0 / k, "width": (x1 - x0) / k, "height": (y1 - y0) / k}

    def click_on(self, img, fx: float, fy: float) -> None:
        img.evaluate("img => img.decode()")   # a click on a picture still loading has no coordinates
        box = img.bounding_box()
        self.pg.mouse.click(box["x"] + fx * box["width"], box["y"] + fy * box["height"])


# ------------------------------------------------------------------ one main task per tab
def generate(u: User) -> None:
    u.type("gen-prompt", "a large yellow star in the centre on a gradient from blue to purple background")
    u.type("gen-seed", 3)
    u.run("gen-run", "gen-status")


def interpolate(u: User) -> None:
    u.tab("Interpolate (seeds)")
    u.type("int-prompt-a", "a large red circle on the left on a white background")
    u.pg.get_by_label("Prompt B (optional; empty = prompt A)").fill("a large blue square on the right on a white "
                                                                    "background")
    u.slider("int-steps", 20)
    u.slider("int-frames", 5)
    u.run("int-seq", "int-status", "frames")


def edit(u: User) -> None:
    u.tab("Edit (text)")
    u.upload("edit-input", EXAMPLES / "blue_triangle_centre.png")
    u.type("edit-source-prompt", "a large blue triangle in the centre, yellow background")
    u.type("edit-target-prompt", "a large red triangle in the centre, yellow background")
    u.run("edit-run", "edit-status")


def diffedit(u: User) -> None:
    u.tab("DiffEdit (mask)")
    u.pg.locator("#diffedit-examples").get_by_text("a large red triangle").first.click()
    u.pg.wait_for_timeout(1500)
    u.run("diffedit-mask", "diffedit-status", "Mask estimated")
    u.run("diffedit-run", "diffedit-status")


def sdedit(u: User) -> None:
    from playwright.sync_api import expect

    u.tab("SDEdit (strokes)")
    editor = u.pg.locator("#sdedit-canvas")
    editor.get_by_label("Brush").first.click()
    canvas = editor.locator("canvas").first
    canvas.wait_for()
    # a rough red blob on the left, in a few overlapping strokes
    for dy in (-0.08, -0.04, 0.0, 0.04, 0.08):
        u.paint(canvas, [(0.3, 0.5 + dy), (0.36, 0.5 + dy * 1.3), (0.42, 0.5 + dy)])
    u.type("sdedit-prompt", "a large red circle on the left on a white background")
    u.slider("sdedit-repeats", 4)
    u.type("sdedit-seed", 1)
    u.run("sdedit-run", "sdedit-status")
    chosen = u.pg.locator("#sdedit-chosen img").first
    before = chosen.get_attribute("src") if chosen.count() else None
    u.pg.locator("#sdedit-gallery img").nth(1).click()   # pick the second candidate
    if before:
        expect(chosen).not_to_have_attribute("src", before, timeout=TIMEOUT_MS)


def drag(u: User) -> None:
    from playwright.sync_api import expect

    u.tab("Drag (DragDiffusion)")
    u.upload("drag-input", EXAMPLES / "blue_triangle_centre.png")
    expect(u.pg.locator("#drag-status")).to_contain_text("Image ready", timeout=TIMEOUT_MS)
    points = u.pg.locator("#drag-points img")
    # the triangle's centre (32, 32 of 64) to 12 px to its right
    for kind, (fx, fy) in (("handle", (0.5, 0.5)), ("target", (0.6875, 0.5))):
        u.click_on(points, fx, fy)
        expect(u.pg.locator("#drag-status")).to_contain_text(f"{kind} at", timeout=TIMEOUT_MS)
    mask = u.pg.locator("#drag-mask")
    picture = u.picture_box(mask.locator("canvas").first)
    mask.get_by_label("Brush").first.click()
    # the region: the triangle and the way to its target
    for k in range(12):
        fy = 0.25 + 0.045 * k
        u.paint(picture, [(0.25, fy), (0.5, fy), (0.82, fy)])
    u.type("drag-prompt", "a large blue triangle in the centre, yellow background")
    u.run("drag-run", "drag-status")


# each tab's task, its status and the results the picture must show (it is cropped below the lowest of them)
TABS = {
    "generate": (generate, "gen-status", ["gen-result"]),
    "interpolate": (interpolate, "int-status", ["int-gallery"]),
    "edit": (edit, "edit-status", ["edit-result", "edit-recon"]),
    "diffedit": (diffedit, "diffedit-status", ["diffedit-result", "diffedit-used"]),
    "sdedit": (sdedit, "sdedit-status", ["sdedit-gallery", "sdedit-chosen"]),
    "drag": (drag, "drag-status", ["drag-result"]),
}


def longest_run(flags) -> tuple[int, int]:
    """[start, end) of the longest run of True."""
    best, start = (0, 0), None
    for i, f in enumerate(list(flags) + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            best, start = max(best, (start, i), key=lambda r: r[1] - r[0]), None
    return best


def box_scale(element, shot) -> float:
    """Screenshot pixels per CSS pixel."""
    return shot.shape[1] / element.bounding_box()["width"]


def save_small(png: bytes, path: Path) -> int:
    """A 256-colour palette PNG (screenshots are flat UI colours and small pictures: no visible loss)."""
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    return path.stat().st_size


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    ap.add_argument("--only", default=",".join(TABS), help="comma-separated tabs: " + ", ".join(TABS))
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    url = serve_embedded()
    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        for name in args.only.split(","):
            # taller than any tab: nothing scrolls, so every picture is in view (lazy images load) and the
            # elements' boxes are page coordinates
            context = browser.new_context(viewport={"width": WIDTH, "height": 3400})
            context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url)
                          else route.abort())
            page = context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("#gen-prompt textarea")
            start = time.monotonic()
            task, status, results = TABS[name]
            task(User(page))
            for elem_id in results:
                page.locator(f"#{elem_id} img").first.evaluate("img => img.decode()")   # loaded and shown
            page.evaluate("window.scrollTo(0, 0)")
            page.wait_for_timeout(1000)
            panel = page.locator("[role=tabpanel]:visible").first.bounding_box()
            top = 0 if name == "generate" else panel["y"]   # the top picture: with the title and the tab strip
            bottom = max(page.locator(f"#{e}").bounding_box()["y"] + page.locator(f"#{e}").bounding_box()["height"]
                         for e in [status] + results)
            clip = {"x": panel["x"], "y": top, "width": panel["width"],
                    "height": min(panel["y"] + panel["height"], bottom + 16) - top}
            size = save_small(page.screenshot(clip=clip, animations="disabled"),
                              args.out / f"{name}.png")
            print(f"{name}: {size / 1024:.0f} KB, {time.monotonic() - start:.0f} s", flush=True)
            context.close()
        browser.close()


if __name__ == "__main__":
    main()
