"""What a running job shows (app/streaming.py, app/runner.py): the status line's step counters for every
method, the progress bar with elapsed time and ETA, enlarged previews, the outputs a new job clears, and the
status after an error."""
from __future__ import annotations

import re

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from app.runner import Outputs, progress_on_status, render_job, run
from app.sessions import SessionRegistry
from app.streaming import JobClock, enlarged_preview, progress_status, status_line
from pipelines.core.cache import LRUCache
from pipelines.core.errors import InputError
from pipelines.core.events import Progress
from pipelines.edit import EditParams
from pipelines.generate import GenerateParams
from pipelines.inversion import InversionParams

STEPS = 3
COUNTER = re.compile(r"^(?P<stage>.+?): step (?P<k>\d+)/(?P<n>\d+)")


def counters(events) -> dict[str, list[tuple[int, int]]]:
    """The (k, n) counters the status lines show, by stage, in order."""
    out: dict[str, list[tuple[int, int]]] = {}
    for ev in events:
        m = COUNTER.match(status_line(ev))
        if m:
            out.setdefault(m["stage"], []).append((int(m["k"]), int(m["n"])))
    return out


def assert_counts(seen: list[tuple[int, int]], n: int):
    """A stage's counter reads 1/n, 2/n, ... n/n: it starts at 1, never passes n and ends at n/n."""
    assert seen == [(k, n) for k in range(1, n + 1)], seen


def picture(model, seed=0) -> Image.Image:
    r = model.resolution
    return Image.fromarray((np.random.default_rng(seed).random((r, r, 3)) * 255).astype(np.uint8))


# ------------------------------------------------------------------------------------------ step counters
def test_generate_counts_its_steps_not_the_prompt_encoding(studio):
    events = list(studio.generate(GenerateParams("a red circle", seed=1, steps=STEPS)))
    assert status_line(events[0]).startswith("encoding prompt") and "step" not in status_line(events[0])
    assert counters(events) == {"sampling": [(k, STEPS) for k in range(1, STEPS + 1)]}
    # the job's own progress (the bar) also ends full, and never goes back
    steps = [ev.fraction for ev in events]
    assert steps == sorted(steps) and steps[-1] == 1.0


@pytest.mark.parametrize("method, stages", [("ddim", ("inverting", "reconstructing")),
                                            ("nti", ("inverting", "fitting null-text")),
                                            ("npi", ("inverting", "reconstructing"))])
def test_invert_counts_each_stage(studio, method, stages):
    p = InversionParams("a circle", STEPS, method=method, inner_steps=1)
    seen = counters(studio.invert(picture(studio.model), p))
    assert list(seen) == list(stages)
    for stage in stages:
        assert_counts(seen[stage], STEPS)


def test_edit_counts_from_one_when_the_inversion_is_cached(studio):
    """The edit stage reads 1/N .. N/N whether the inversion ran or came from the cache (it read 102/150)."""
    cache, image = LRUCache(4), picture(studio.model, 1)
    p = EditParams("a circle", "a square", "threshold", 0.5, STEPS, 7.5, "ddim", 1)
    first = counters(studio.edit(image, p, cache))
    assert_counts(first["inverting"], STEPS) and assert_counts(first["editing"], STEPS)
    events = list(studio.edit(image, p, cache))
    assert any(ev.stage == "inversion (cached)" for ev in events)
    assert counters(events) == {"editing": [(k, STEPS) for k in range(1, STEPS + 1)]}


@pytest.mark.slow  # five jobs, a drag among them: several seconds
def test_every_method_counts_each_stage_from_one_to_its_end(studio):
    """Instruct, DiffEdit, SDEdit (two repeats), an interpolation sequence and a drag: every counted stage reads
    1/n .. n/n, and the job's bar only moves forward and ends full."""
    from pipelines.diffedit import DiffEditParams
    from pipelines.drag import DragParams
    from pipelines.instruct import InstructParams
    from pipelines.interpolation import InterpolationParams
    from pipelines.sdedit import SDEditParams

    image = picture(studio.model, 2)
    jobs = {
        "instruct": studio.instruct(image, InstructParams("make it blue", steps=STEPS, seed=1)),
        "diffedit": studio.diffedit(image, DiffEditParams("a blue square", "a red circle", steps=4, mask_draws=2),
                                    None, LRUCache(2)),
        "sdedit": studio.sdedit(image, SDEditParams("a circle", steps=6, strength=0.5, repeats=2, seed=3)),
        "sequence": studio.interpolation_sequence(InterpolationParams("a red circle", steps=2), 2, LRUCache(2)),
        "drag": studio.drag(image, DragParams([(20, 28)], [(30, 28)], prompt="a square", lora_steps=2,
                                              drag_iterations=2, steps=6), None, LRUCache(2)),
    }
    expected = {"instruct": {"editing": STEPS}, "diffedit": {"inverting": 3, "editing (DiffEdit)": 3},
                "sdedit": {"repeat 1/2: denoising": 3, "repeat 2/2: denoising": 3},
                "sequence": {"frame 1/2": 2, "frame 2/2": 2}, "drag": {"inverting": 4, "denoising": 4}}
    for name, job in jobs.items():
        events = list(job)
        seen = counters(events)
        assert {stage: runs[-1][1] for stage, runs in seen.items()} == expected[name], (name, seen)
        for stage, n in expected[name].items():
            assert_counts(seen[stage], n)
        done = [ev.fraction for ev in events]
        assert done == sorted(done) and done[-1] == 1.0, name
    # the drag's LoRA steps and iterations are counted in their messages
    lines = [status_line(ev) for ev in events]
    assert any(line.startswith("training LoRA · LoRA step 2/2") for line in lines), lines
    assert any(line.startswith("dragging · iteration 2/2") for line in lines), lines


def test_status_line_without_a_stage_counter_shows_the_stage_and_message():
    assert status_line(Progress("loading LoRA", 0, 1, message="Loading x.safetensors")) == \
        "loading LoRA · Loading x.safetensors"
    assert status_line(Progress("editing", 102, 150, stage_step=2, stage_total=50)) == "editing: step 2/50"


# ------------------------------------------------------------------------------------------ bar, elapsed, ETA
class FakeTime:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_eta_uses_the_current_stage_rate_and_skips_cached_work():
    now = FakeTime()
    clock = JobClock(now)
    now.t += 0.5
    clock.tick(Progress("encoding image", 0, 150))
    assert clock.left is None  # nothing measured yet
    now.t += 0.1
    clock.tick(Progress("inversion (cached)", 100, 150))   # 100 units of skipped work, in no time
    assert clock.left is None
    for k in range(1, 5):                                  # then 2 s per editing step
        now.t += 2.0
        clock.tick(Progress("editing", 100 + k, 150, stage_step=k, stage_total=50))
    assert clock.left == pytest.approx(2.0 * 46)
    assert clock.elapsed() == pytest.approx(0.6 + 8.0)
    status = progress_status(Progress("editing", 104, 150, stage_step=4, stage_total=50), clock)
    line, bar = status.split("\n\n")
    assert line == "editing: step 4/50"
    assert '<progress class="studio-progress" value="104" max="150">' in bar
    assert "8.6 s" in bar and "about 1 min 32 s left" in bar


def test_eta_keeps_the_last_rate_when_a_stage_starts():
    now = FakeTime()
    clock = JobClock(now)
    for k in range(1, 4):
        now.t += 1.0
        clock.tick(Progress("frame 1/2", k, 6, stage_step=k, stage_total=3))
    assert clock.left == pytest.approx(3.0)
    now.t += 1.0
    clock.tick(Progress("frame 2/2", 4, 6, stage_step=1, stage_total=3))  # measured from the last frame's end
    assert clock.left == pytest.approx(2.0)


def test_status_escapes_what_a_visitor_typed():
    status = progress_status(Progress("loading LoRA", 0, 1, message="Loading <img src=x>"), JobClock())
    assert "<img" not in status and "&lt;img src=x&gt;" in status


# ------------------------------------------------------------------------------------------ previews
@pytest.mark.parametrize("side, factor", [(8, 32), (16, 16), (64, 4), (100, 3), (256, 1), (512, 1)])
def test_previews_are_enlarged_by_a_whole_factor_nearest_neighbour(side, factor):
    small = Image.fromarray(np.random.default_rng(side).integers(0, 256, (side // 2, side, 3), dtype=np.uint8))
    big = enlarged_preview(small)
    assert big.size == (side * factor, side // 2 * factor) and max(big.size) >= 256
    a = np.asarray(big)
    assert np.array_equal(a[::factor, ::factor], np.asarray(small))  # every cell a block of its own colour
    assert np.array_equal(a[factor - 1::factor, factor - 1::factor], np.asarray(small))


# ------------------------------------------------------------------------------------------ outputs a job clears
@pytest.fixture(scope="module")
def components():
    with gr.Blocks():
        c = dict(preview=gr.Image(interactive=False), result=gr.Image(interactive=False),
                 gallery=gr.Gallery(), seed_used=gr.Number(interactive=False), seed=gr.Number(),
                 editor=gr.ImageEditor(), plot=gr.LinePlot(x="a", y="b"), metrics=gr.JSON(),
                 guidance=gr.Slider(), status=gr.Markdown())
    return c


def test_a_job_clears_results_but_never_inputs(components):
    out = Outputs(**components)
    assert out.cleared() == dict(preview=None, result=None, gallery=None, seed_used=None, plot=None, metrics=None)
    assert out.keep("plot").cleared().keys() == {"preview", "result", "gallery", "seed_used", "metrics"}
    with pytest.raises(ValueError):
        out.keep("nothing")
    # results are marked for the page's styles (shown enlarged), the status for its bar
    assert all("studio-result" in components[k].elem_classes for k in ("preview", "result", "gallery"))
    assert "studio-status" in components["status"].elem_classes
    assert not components["editor"].elem_classes or "studio-result" not in components["editor"].elem_classes


def test_progress_and_errors_go_on_the_status_only():
    with gr.Blocks() as demo:
        image, status, button = gr.Image(interactive=False), gr.Markdown(), gr.Button()
        out = Outputs(result=image, status=status)
        with_status = button.click(lambda: None, None, out)
        without = button.click(lambda: None, None, [image])
    progress_on_status(demo)
    first, second = demo.fns[with_status["id"]], demo.fns[without["id"]]
    assert first.show_progress_on == [status] and first.show_progress == "minimal"
    assert second.show_progress == "hidden"


def named(out: Outputs, update) -> dict:
    return {name: update[start] for name, (start, _) in out._slots.items()}


def test_a_failed_job_shows_nothing_stale_and_says_what_failed(components):
    """A run starts from cleared results; when it then fails, its status says why (the error still goes up)."""
    out = Outputs(preview=components["preview"], result=components["result"], seed=components["seed"],
                  status=components["status"])
    preview = Image.new("RGB", (8, 8), "red")

    def work(session, token):
        yield Progress("sampling", 1, 4, preview=preview, stage_step=1, stage_total=3)
        raise InputError("The Smooth LoRA is not loaded.")

    updates = []
    with pytest.raises(gr.Error) as failure:
        for update in run(SessionRegistry(), None, out, work, lambda ev, s: {}):
            updates.append(named(out, update))
    assert "The Smooth LoRA is not loaded." in failure.value.message
    start, step, failed = updates
    assert start["preview"] is None and start["result"] is None and start["status"].startswith("Starting")
    assert isinstance(start["seed"], dict) and start["seed"].get("__type__") == "update"  # an input: untouched
    assert step["status"].startswith("sampling: step 1/3") and step["preview"].size == (256, 256)
    assert failed["status"] == "Failed: The Smooth LoRA is not loaded."
    assert isinstance(failed["result"], dict) and failed["result"].get("__type__") == "update"  # stays cleared


def test_a_finished_job_shows_the_full_bar():
    with gr.Blocks():
        out = Outputs(result=gr.Image(interactive=False), status=gr.Markdown())

    def job():
        yield Progress("sampling", 1, 2, stage_step=1, stage_total=2)
        yield Progress("done", 2, 2, result="r")

    *_, final = list(render_job(job(), out, lambda ev: dict(result=None, status="Done · seed 5")))
    assert final[1].startswith("Done · seed 5\n\n") and 'value="2" max="2"' in final[1] and "took" in final[1]
