"""Seed interpolation: slerp/lerp maths, ISTD, frames equal to plain generations at the ends, endpoint
caching, and the full sequence job."""
from __future__ import annotations

import math

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from helpers import forward_calls, pixels
from PIL import Image

from pipelines.core.cache import LRUCache
from pipelines.core.events import run_to_end
from pipelines.generate import GenerateParams, generate
from pipelines.interpolation import (
    InterpolationParams,
    adjacent_distances,
    interpolation_frame,
    interpolation_sequence,
    istd,
    lerp,
    slerp,
)

# --- slerp / lerp ---------------------------------------------------------------------------------

def test_slerp_endpoints_are_exact():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    assert torch.equal(slerp(a, b, 0.0), a)
    assert torch.equal(slerp(a, b, 1.0), b)
    mid = slerp(a, b, 0.5)
    assert mid.shape == a.shape and not torch.equal(mid, a) and not torch.equal(mid, b)


def test_slerp_of_orthogonal_unit_vectors_stays_on_the_circle():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = slerp(a, b, 0.5)
    c = math.cos(math.pi / 4)
    torch.testing.assert_close(mid, torch.tensor([c, c]), atol=1e-6, rtol=0)
    assert abs(float(mid.norm()) - 1.0) < 1e-6
    third = slerp(a, b, 1 / 3)  # 30 degrees from a
    torch.testing.assert_close(third, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]), atol=1e-6, rtol=0)
    # lerp would shrink the norm to cos 45 deg
    assert abs(float(lerp(a, b, 0.5).norm()) - c) < 1e-6


def test_slerp_falls_back_to_lerp_for_parallel_inputs():
    a = torch.tensor([1.0, 2.0, 3.0])
    b = 2 * a  # exactly parallel: arccos would give theta 0 and a 0/0 division
    out = slerp(a, b, 0.25)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, 1.25 * a, atol=1e-6, rtol=0)
    nearly = a + torch.tensor([1e-4, 0.0, 0.0])
    torch.testing.assert_close(slerp(a, nearly, 0.5), (a + nearly) / 2, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_slerp_and_lerp_preserve_dtype(dtype):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 5, generator=g).to(dtype), torch.randn(3, 5, generator=g).to(dtype)
    assert slerp(a, b, 0.3).dtype == dtype
    assert lerp(a, b, 0.3).dtype == dtype


def test_lerp_is_exact_at_both_ends():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    assert torch.equal(lerp(a, b, 0.0), a)
    assert torch.equal(lerp(a, b, 1.0), b)  # a + (b - a) * 1 misses b by an ulp in places
    torch.testing.assert_close(lerp(a, b, 0.25), 0.75 * a + 0.25 * b)


# --- ISTD -----------------------------------------------------------------------------------------

def _const(value: float, size: int = 4) -> Image.Image:
    return Image.fromarray(np.full((size, size, 3), round(value * 255), dtype=np.uint8))


def test_equal_steps_give_istd_zero():
    frames = [_const(v) for v in (0.0, 0.2, 0.4, 0.6)]  # 51 grey levels apart each
    d = adjacent_distances(frames)
    expected = math.sqrt(4 * 4 * 3) * 51 / 255  # L2 over 48 values of 51/255 each
    np.testing.assert_allclose(d, [expected] * 3, rtol=1e-12)
    assert istd(frames) == pytest.approx(0.0, abs=1e-12)


def test_uneven_steps_give_the_hand_computed_std():
    levels = [0, 51, 153, 153]  # steps of 51, 102 and 0 grey levels
    frames = [Image.fromarray(np.full((2, 2, 3), v, dtype=np.uint8)) for v in levels]
    unit = math.sqrt(12) / 255  # one grey level over 2x2x3 values
    d = adjacent_distances(frames)
    np.testing.assert_allclose(d, [51 * unit, 102 * unit, 0.0], rtol=1e-12)
    mean = (51 + 102 + 0) / 3 * unit
    std = math.sqrt(((51 * unit - mean) ** 2 + (102 * unit - mean) ** 2 + mean**2) / 3)
    assert istd(frames) == pytest.approx(std, rel=1e-12)
    assert istd(frames[:1]) == 0.0


# --- frames on the tiny model ---------------------------------------------------------------------

PARAMS = dict(prompt_a="a red circle", prompt_b="a blue square on a plain background", negative_prompt="green",
              seed_a=11, seed_b=22, steps=5, guidance=7.5)


@pytest.mark.parametrize("eta,side", [(0.0, "a"), (1.0, "b")])
def test_frame_at_the_ends_equals_plain_generation(tiny_model, eta, side):
    p = InterpolationParams(**PARAMS)
    frame = run_to_end(interpolation_frame(tiny_model, p, eta))
    prompt, seed = (p.prompt_a, p.seed_a) if side == "a" else (p.prompt_b, p.seed_b)
    plain = run_to_end(generate(tiny_model, GenerateParams(
        prompt, negative_prompt=p.negative_prompt, seed=seed, steps=p.steps, guidance=p.guidance)))
    assert np.array_equal(pixels(frame.image), pixels(plain.image))
    assert frame.params["interpolation_eta"] == eta


def test_middle_frame_differs_from_both_ends(tiny_model):
    p = InterpolationParams(**{**PARAMS, "steps": 3})
    a, mid, b = (pixels(run_to_end(interpolation_frame(tiny_model, p, e)).image) for e in (0.0, 0.5, 1.0))
    assert np.abs(mid - a).mean() > 1 and np.abs(mid - b).mean() > 1


@pytest.fixture
def text_encoder_calls(tiny_model):
    with forward_calls(tiny_model.text_encoder) as calls:
        yield calls


def test_endpoints_are_cached(tiny_model, text_encoder_calls):
    cache = LRUCache(maxsize=2)
    p = InterpolationParams(**{**PARAMS, "steps": 2})
    first = run_to_end(interpolation_frame(tiny_model, p, 0.3, cache=cache))
    assert len(text_encoder_calls) == 3  # prompt A, prompt B, negative
    second = run_to_end(interpolation_frame(tiny_model, p, 0.3, cache=cache))
    other_eta = run_to_end(interpolation_frame(tiny_model, p, 0.7, cache=cache))
    assert len(text_encoder_calls) == 3  # no new encoding for the same endpoints
    assert np.array_equal(pixels(first.image), pixels(second.image))
    assert not np.array_equal(pixels(first.image), pixels(other_eta.image))
    uncached = run_to_end(interpolation_frame(tiny_model, p, 0.3))
    assert np.array_equal(pixels(first.image), pixels(uncached.image))
    assert len(text_encoder_calls) == 6


def test_endpoint_cache_stays_bounded(tiny_model, text_encoder_calls):
    cache = LRUCache(maxsize=2)
    for seed_b in (101, 102, 103):
        p = InterpolationParams(**{**PARAMS, "steps": 1, "seed_b": seed_b})
        run_to_end(interpolation_frame(tiny_model, p, 0.5, cache=cache))
        assert len(cache) <= 2
    assert len(cache) == 2 and len(text_encoder_calls) == 9
    # The oldest endpoints (seed_b 101) were evicted: they are encoded again; the newest are still cached.
    run_to_end(interpolation_frame(tiny_model, InterpolationParams(**{**PARAMS, "steps": 1, "seed_b": 103}), 0.5,
                                   cache=cache))
    assert len(text_encoder_calls) == 9
    run_to_end(interpolation_frame(tiny_model, InterpolationParams(**{**PARAMS, "steps": 1, "seed_b": 101}), 0.5,
                                   cache=cache))
    assert len(text_encoder_calls) == 12 and len(cache) == 2


def test_interpolation_sequence(tiny_model, tmp_path):
    p = InterpolationParams(**{**PARAMS, "steps": 3})
    events = list(interpolation_sequence(tiny_model, p, n_frames=5, gif_dir=tmp_path))
    partial_lengths = [len(e.partial) for e in events if e.partial is not None]
    assert partial_lengths == [1, 2, 3, 4, 5, 5]  # one per finished frame, then the final event
    assert [e.step for e in events if e.partial is not None and not e.done] == [3, 6, 9, 12, 15]
    res = events[-1].result
    assert len(res.frames) == 5 and res.etas == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert len(res.distances) == 4
    np.testing.assert_allclose(res.distances, adjacent_distances(res.frames), rtol=1e-12)
    assert res.istd == pytest.approx(float(np.std(res.distances)), rel=1e-12)
    assert min(res.distances) > 0
    # The first frame is the eta=0 frame.
    first = run_to_end(interpolation_frame(tiny_model, p, 0.0))
    assert np.array_equal(pixels(res.frames[0]), pixels(first.image))
    assert res.gif_path and res.gif_path.endswith(".gif")
    with Image.open(res.gif_path) as gif:
        assert gif.n_frames == 5 and gif.size == (64, 64)
    # the MP4 (pipelines/core/video.py): H.264 with the same 5 frames, 64 px scaled up 4x for the player
    assert res.mp4_path and res.mp4_path.endswith(".mp4")
    assert imageio_ffmpeg.count_frames_and_secs(res.mp4_path)[0] == 5
    reader = imageio_ffmpeg.read_frames(res.mp4_path)
    meta = next(reader)
    reader.close()
    assert meta["codec"].startswith("h264") and meta["size"] == (256, 256)
