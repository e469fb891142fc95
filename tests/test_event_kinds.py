"""Typed event kinds (pipelines/core/events.py Kind): what an event's preview/partial holds is told by its kind, so the
UI never parses stage or message text."""
from __future__ import annotations

import numpy as np
from PIL import Image

from pipelines.core.cache import LRUCache
from pipelines.core.events import Kind
from pipelines.interpolation import InterpolationParams, interpolation_sequence
from pipelines.inversion import InversionParams, invert_and_reconstruct
from pipelines.real_interpolation import RealInterpolationParams, real_interpolation_frame
from pipelines.sdedit import SDEditParams, sdedit


def _photo(seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def test_inversion_sends_its_source_then_a_growing_loss_curve(tiny_model):
    events = list(invert_and_reconstruct(tiny_model, _photo(0), InversionParams(
        prompt="a red circle", steps=3, guidance=7.5, method="nti", inner_steps=2)))
    assert events[0].kind is Kind.SOURCE and events[0].preview.size == (64, 64)
    curves = [ev.partial for ev in events if ev.kind is Kind.LOSSES]
    assert [len(c) for c in curves] == [1, 2, 3] and all(np.isfinite(c).all() for c in curves)
    assert all(ev.partial is None for ev in events if ev.kind is Kind.STEP)


def test_sequences_send_the_frames_so_far_and_repeats_their_results(tiny_model):
    p = InterpolationParams("a red circle", "a blue square", seed_a=1, seed_b=2, steps=2)
    events = list(interpolation_sequence(tiny_model, p, n_frames=3))
    frames = [ev.partial for ev in events if ev.kind is Kind.FRAMES]
    assert [len(f) for f in frames] == [1, 2, 3, 3]  # after each frame, then with the result
    assert all(isinstance(im, Image.Image) for im in frames[-1])
    events = list(sdedit(tiny_model, _photo(1), SDEditParams(prompt="a red circle", steps=4, strength=0.5, seed=3,
                                                              repeats=2)))
    assert [len(ev.partial) for ev in events if ev.kind is Kind.RESULTS][:2] == [1, 2]


def test_the_drag_sends_its_handles_as_points(tiny_model):
    from pipelines.drag import DragParams, drag

    p = DragParams(handles=[(20, 20)], targets=[(28, 20)], lora_steps=0, drag_iterations=2, steps=4)
    events = list(drag(tiny_model, _photo(4), p))
    points = [ev.partial for ev in events if ev.kind is Kind.POINTS]
    assert len(points) >= 2 and all(len(pts) == 1 and len(pts[0]) == 2 for pts in points)
    assert events[-1].done and events[-1].kind is Kind.POINTS


def test_a_reused_inversion_is_flagged_on_the_event(tiny_model):
    cache = LRUCache(4)
    p = RealInterpolationParams("a red circle", "a blue square", steps=2, inversion="ddim")
    first = list(real_interpolation_frame(tiny_model, _photo(2), _photo(3), p, 0.5, cache))[-1]
    again = list(real_interpolation_frame(tiny_model, _photo(2), _photo(3), p, 0.25, cache))[-1]
    assert first.done and not first.cached and again.done and again.cached
