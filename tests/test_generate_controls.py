"""Generate's controls as users expect them: typed sizes snap to the model's multiple, batch count with
consecutive seeds, seed reuse, and an idle server that idles."""
from __future__ import annotations

import asyncio
import threading

import gradio as gr
import numpy as np
import pytest

from app.context import snap_size, snapped_sizes
from app.hosting import PROGRESS_POLL_S, QUEUE_POLL_S, calm_queue
from pipelines.core.errors import InputError
from pipelines.core.events import Cancelled, CancelToken, Kind, run_to_end
from pipelines.core.validation import MAX_SEED
from pipelines.generate import GenerateParams, batch_seeds, generate, generate_batch


# ------------------------------------------------------------------------------------------ sizes
class _Model:
    size_multiple = 8


def test_snap_size_rounds_to_the_nearest_multiple():
    assert [snap_size(v, 8) for v in (100, 99, 104, 3, 8, 63.9, 1023)] == [104, 96, 104, 8, 8, 64, 1024]
    assert snap_size(100, 16) == 96 and snap_size(120, 16) == 128


def test_snapped_sizes_say_what_changed_and_leave_the_rest():
    assert snapped_sizes(_Model(), 100, 64) == (104, 64, "width 100 → 104")
    assert snapped_sizes(_Model(), 98, 30) == (96, 32, "width 98 → 96, height 30 → 32")
    assert snapped_sizes(_Model(), 64.0, 128) == (64, 128, "")
    # empty means the model's native size; nonsense goes to the pipeline, which names the problem
    assert snapped_sizes(_Model(), None, "") == (None, "", "")
    assert snapped_sizes(_Model(), -5, "abc") == (-5, "abc", "")


# ------------------------------------------------------------------------------------------ the idle queue
def test_the_idle_queue_polls_calmly(monkeypatch):
    """Gradio's queue loops sleep between polls while there is no work: 1 ms (and 10 ms) by default."""
    import gradio.queueing as queueing

    with gr.Blocks() as demo:
        gr.Button().click(lambda: None)
    demo.queue()
    default = demo._queue.sleep_when_free
    calm_queue(demo)
    queue = demo._queue
    assert QUEUE_POLL_S > default
    queue.active_jobs = [None]
    slept = []
    real_sleep, here = asyncio.sleep, threading.get_ident()

    async def one_turn(seconds, *args, **kwargs):  # the loop's first idle sleep ends it
        if threading.get_ident() != here:  # asyncio is one module: servers of other tests keep sleeping for real
            return await real_sleep(seconds, *args, **kwargs)
        slept.append(seconds)
        queue.stopped = True

    monkeypatch.setattr(queueing.asyncio, "sleep", one_turn)
    asyncio.run(queue.start_processing())
    queue.stopped = False
    asyncio.run(queue.start_progress_updates())
    assert slept == [QUEUE_POLL_S, PROGRESS_POLL_S]


# ------------------------------------------------------------------------------------------ batch count
def _pixels(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_a_batch_is_one_image_per_consecutive_seed(tiny_model):
    p = GenerateParams("a red circle", seed=41, steps=3, width=64, height=64)
    events = list(generate_batch(tiny_model, p, 3))
    finished = [ev for ev in events if ev.kind is Kind.RESULTS]
    assert [len(ev.partial) for ev in finished] == [1, 2, 3]       # streamed as each image finishes
    final = events[-1]
    assert final.done and [r.seed for r in final.partial] == [41, 42, 43] and final.result is final.partial[-1]
    # each image is exactly what a single generate with that seed makes
    for r in final.partial:
        alone = run_to_end(generate(tiny_model, GenerateParams("a red circle", seed=r.seed, steps=3)))
        assert np.array_equal(_pixels(alone.image), _pixels(r.image))
    assert not np.array_equal(_pixels(final.partial[0].image), _pixels(final.partial[1].image))
    # progress runs over the whole batch and says which image
    steps = [ev.step for ev in events]
    assert steps == sorted(steps) and final.step == final.total == 3 * 4
    assert any(ev.stage.startswith("image 2/3 · sampling") for ev in events)


def test_a_random_batch_seed_counts_up_and_wraps():
    seeds = batch_seeds(-1, 4)
    assert [s - seeds[0] for s in seeds] == [0, 1, 2, 3] or seeds[-1] < seeds[0]
    assert batch_seeds(MAX_SEED, 2) == [MAX_SEED, 0]


def test_batch_count_is_capped_before_any_work(tiny_model):
    p = GenerateParams("a red circle", steps=2)
    with pytest.raises(InputError, match="Batch count must be between 1 and 8"):
        next(generate_batch(tiny_model, p, 9))
    with pytest.raises(InputError, match="multiple of"):
        next(generate_batch(tiny_model, GenerateParams("a red circle", steps=2, width=100), 2))


def test_stop_between_images_ends_the_batch(tiny_model):
    token = CancelToken()
    seen = []
    with pytest.raises(Cancelled):
        for ev in generate_batch(tiny_model, GenerateParams("a red circle", seed=5, steps=2), 3, cancel=token):
            if ev.kind is Kind.RESULTS:
                seen.append(len(ev.partial))
                token.cancel()
    assert seen == [1]
