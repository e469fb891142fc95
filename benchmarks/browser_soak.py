"""Soak test of one browser page: many Generate runs in the same page, printing what the page holds after each
batch (Chrome's own counters through CDP: JS heap, DOM nodes, event listeners, documents), so a growth that
would make a long session unresponsive shows as a trend. Not a test: it prints numbers.

    python benchmarks/browser_soak.py --runs 80 --every 10 --steps 20
    python benchmarks/browser_soak.py --tab invert --runs 30 --steps 10     # null-text inversion's loss plot

Runs the studio in this process on the tiny random model (as tests/conftest.py does, with app.py's queue and
launch settings) and drives Debian's Chromium (/usr/bin/chromium) headless with Playwright. Each measurement
follows a forced garbage collection, so it shows what the page keeps, not what it has yet to free.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("STUDIO_DEVICE", "cpu")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CHROMIUM = "/usr/bin/chromium"
PROMPT = "a small red circle on the left on a white background"
METRICS = ("JSHeapUsedSize", "Nodes", "JSEventListeners", "Documents", "Frames", "LayoutObjects")


def start_app(model: str):
    """The studio on a free 127.0.0.1 port, as app.py starts it; returns (demo, url)."""
    import torch

    from app.cli import launch
    from pipelines.studio import Studio

    torch.set_num_threads(1)
    demo = launch(Studio().start(model), prevent_thread_lock=True, quiet=True)
    return demo, demo.local_url.rstrip("/") + "/"


IDLE_S = 3.0   # seconds of an idle page measured after each batch: timers or animations left running show here


def metrics(cdp, page) -> dict:
    """The counters after a forced garbage collection, and the page's own busy time while idle (CDP's
    TaskDuration: ms of main-thread work per second)."""
    cdp.send("HeapProfiler.collectGarbage")
    got = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
    page.wait_for_timeout(IDLE_S * 1000)
    later = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
    out = {name: got.get(name, float("nan")) for name in METRICS}
    out["idle"] = 1000 * (later["TaskDuration"] - got["TaskDuration"]) / IDLE_S
    return out


# element kinds in the page (tag, id or first class of the element and of its nearest ancestor with an id)
KINDS_JS = """() => { const out = {};
  for (const el of document.querySelectorAll('*')) {
    const owner = el.closest('[id]');
    const key = el.tagName.toLowerCase() + (el.classList[0] ? '.' + el.classList[0] : '') +
                ' in #' + (owner ? owner.id : '-');
    out[key] = (out[key] || 0) + 1; }
  return out; }"""


def grown(before: dict, after: dict, top: int = 12) -> list[tuple[str, int]]:
    """The element kinds that grew most between two counts."""
    diff = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)}
    return sorted(((k, d) for k, d in diff.items() if d), key=lambda kd: -abs(kd[1]))[:top]


def setup_generate(page, args) -> tuple[str, str]:
    page.fill("#gen-prompt textarea", PROMPT)
    set_number(page, "gen-steps", args.steps)
    set_number(page, "gen-batch", args.batch_count)
    return "gen-run", "gen-status"


def setup_invert(page, args) -> tuple[str, str]:
    """Null-text inversion of a world picture, re-inverted on every run: its loss curve (a LinePlot) and
    previews update all run long."""
    import tempfile

    from PIL import Image

    from training.world import render, sample_scene

    picture = Path(tempfile.mkdtemp()) / "soak.png"
    Image.fromarray(render(sample_scene(3))).save(picture)
    page.get_by_role("tab", name="Invert").click()
    page.locator("#inv-input input[type=file]").set_input_files(str(picture))
    page.locator("#inv-input img").first.wait_for()
    page.locator("#inv-method").get_by_label("Null-text inversion (fast)", exact=True).check()
    page.get_by_label("Re-invert (ignore cached inversion)").check()
    set_number(page, "inv-steps", args.steps)
    return "inv-run", "inv-status"


SETUP = {"generate": setup_generate, "invert": setup_invert}


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


HEADER = (f"{'runs':>5} {'heap MB':>9} {'nodes':>7} {'listeners':>9} {'docs':>6} {'layout':>8} {'idle ms/s':>9} "
          f"{'s/run':>8}")


def row(n: int, m: dict, seconds: float) -> str:
    return (f"{n:5d} {m['JSHeapUsedSize'] / 2**20:9.2f} {m['Nodes']:7.0f} {m['JSEventListeners']:9.0f} "
            f"{m['Documents']:6.0f} {m['LayoutObjects']:8.0f} {m['idle']:9.1f} {seconds:8.2f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=80, help="Generate runs in the one page")
    parser.add_argument("--every", type=int, default=10, help="measure after this many runs")
    parser.add_argument("--steps", type=int, default=20, help="steps per run (each streams previews)")
    parser.add_argument("--batch-count", type=int, default=1, help="the Generate tab's batch count")
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--tab", choices=sorted(SETUP), default="generate",
                        help="generate, or invert (null-text inversion: a loss-curve plot updated all run long)")
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright

    demo, url = start_app(args.model)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--disable-sync"])
            context = browser.new_context(viewport={"width": 1400, "height": 1600})
            context.route("**/*", lambda r: r.continue_() if r.request.url.startswith(url) else r.abort())
            page = context.new_page()
            page.set_default_timeout(120_000)
            cdp = context.new_cdp_session(page)
            cdp.send("Performance.enable")
            page.goto(url, wait_until="domcontentloaded")
            page.wait_for_selector("#gen-prompt textarea")
            run_id, status_id = SETUP[args.tab](page, args)
            page.wait_for_timeout(500)
            # counts the runs that ended: the status turning to "Done ..." (a MutationObserver on the page: Gradio may
            # re-create the status element)
            page.evaluate("""(id) => { window.soakDone = 0; let was = false;
                new MutationObserver(() => { const status = document.getElementById(id);
                    const now = !!status && status.innerText.includes('Done');
                    if (now && !was) window.soakDone += 1; was = now; })
                  .observe(document.body, {subtree: true, childList: true, characterData: true}); }""", status_id)
            print(HEADER)
            print(row(0, metrics(cdp, page), 0.0), flush=True)
            kinds = None
            t0 = time.monotonic()
            for n in range(1, args.runs + 1):
                if n == args.every + 1:  # after the first batch: the page's steady state begins
                    kinds = page.evaluate(KINDS_JS)
                before = page.locator(f"#{status_id}").inner_text()
                page.click(f"#{run_id}")
                # this run's "Done": a new Done line (a random seed differs), or a Done after a progress line
                page.wait_for_function("([id, n, before]) => { const s = document.getElementById(id); "
                                       "const t = s ? s.innerText : ''; "
                                       "return t.includes('Done') && (t !== before || window.soakDone >= n); }",
                                       arg=[status_id, n, before], timeout=120_000)
                if n % args.every == 0 or n == args.runs:
                    print(row(n, metrics(cdp, page), (time.monotonic() - t0) / args.every), flush=True)
                    t0 = time.monotonic()
            if kinds is not None:
                print(f"elements that grew from run {args.every} to run {args.runs}:")
                for kind, d in grown(kinds, page.evaluate(KINDS_JS)):
                    print(f"  {d:+6d}  {kind}")
            browser.close()
    finally:
        demo.close()


if __name__ == "__main__":
    main()
