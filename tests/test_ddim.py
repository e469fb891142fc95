"""The DDIM core on the tiny model: inversion round trip, equality with diffusers' own pipeline,
partial sampling, cancellation, and the preview events of `generate`."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import forward_calls, pixels
from PIL import Image

from pipelines.core import ddim
from pipelines.core.events import Cancelled, CancelToken, run_to_end
from pipelines.core.latents import decode_to_pil, encode_image, initial_noise
from pipelines.core.metrics import psnr
from pipelines.core.stream import PreviewOptions
from pipelines.core.text import encode_prompt
from pipelines.generate import GenerateParams, generate


def _smooth_picture(size: int = 64) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    rgb = np.stack([xx, yy, 0.5 * (1 - xx)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


@pytest.fixture
def unet_calls(tiny_model):
    """Counts UNet forward calls on the shared model (the hook is removed afterwards)."""
    with forward_calls(tiny_model.unet) as calls:
        yield calls


# --- inversion round trip -----------------------------------------------------------------------

@pytest.mark.slow
def test_inversion_round_trip_at_guidance_1_and_drift_at_7_5(tiny_model):
    m = tiny_model
    z0 = encode_image(m, _smooth_picture())
    cond, uncond = encode_prompt(m, "a photo"), encode_prompt(m, "")
    steps = 50

    states = list(ddim.invert(m.unet, z0, cond, uncond, 1.0, steps, m.scheduler_config))
    assert len(states) == steps
    x_T = states[-1].latents
    # The inversion really moved far from the clean latent (the random UNet's small noise predictions
    # make x_T ~0.1 std here, not unit variance; what matters is that sampling must undo 50 steps).
    assert float(((x_T - z0) ** 2).mean()) > 0.5

    def reconstruct(guidance):
        x = None
        for st in ddim.sample(m.unet, x_T, cond, uncond, guidance, steps, m.scheduler_config):
            x = st.latents
        return decode_to_pil(m, x)

    vae_only = decode_to_pil(m, z0)
    p1 = psnr(vae_only, reconstruct(1.0))
    p75 = psnr(vae_only, reconstruct(7.5))
    # Measured on this model/image: 25.3 dB at guidance 1 (29.3 dB with 100 steps), 15.6 dB at 7.5.
    assert p1 >= 24.0, p1
    assert p75 < p1 - 5.0, (p1, p75)


# --- our sampler == diffusers' StableDiffusionPipeline ------------------------------------------

@pytest.mark.parametrize("width,height", [(64, 64), (64, 48)])
def test_generate_matches_diffusers_pipeline_pixel_for_pixel(tiny_model, width, height):
    seed, prompt, negative, steps, guidance = 1234, "a red circle on a plain background", "blue", 8, 7.5
    ours = run_to_end(generate(tiny_model, GenerateParams(
        prompt, negative_prompt=negative, seed=seed, steps=steps, guidance=guidance, width=width, height=height)))
    theirs = tiny_model.pipe(
        prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
        width=width, height=height, generator=torch.Generator("cpu").manual_seed(seed),
        output_type="pil", eta=0.0,
    ).images[0]
    a, b = pixels(ours.image), pixels(theirs)
    assert a.shape == b.shape == (height, width, 3)
    assert np.abs(a - b).max() == 0  # measured: identical, no float noise at all
    assert a.std() > 1  # not a blank picture


def test_different_seeds_give_different_images(tiny_model):
    a = run_to_end(generate(tiny_model, GenerateParams("a cat", seed=1, steps=4)))
    b = run_to_end(generate(tiny_model, GenerateParams("a cat", seed=2, steps=4)))
    assert np.abs(pixels(a.image) - pixels(b.image)).mean() > 1


# --- start_index and cancellation -----------------------------------------------------------------

def test_sample_start_index_skips_the_noisiest_steps(tiny_model):
    m = tiny_model
    cond, uncond = encode_prompt(m, "a tree"), encode_prompt(m, "")
    x_T = initial_noise(m, 5, 64, 64)
    steps, k = 10, 3
    full = list(ddim.sample(m.unet, x_T, cond, uncond, 7.5, steps, m.scheduler_config))
    part = list(ddim.sample(m.unet, full[k - 1].latents, cond, uncond, 7.5, steps, m.scheduler_config, start_index=k))
    assert len(full) == steps and len(part) == steps - k
    assert [s.index for s in part] == list(range(steps - k))
    assert {s.total for s in part} == {steps - k}
    assert [s.timestep for s in part] == [s.timestep for s in full[k:]]
    # Resuming from the latent at timesteps[k] continues the same trajectory exactly.
    assert torch.equal(part[-1].latents, full[-1].latents)


def test_cancel_stops_sample_before_the_next_unet_call(tiny_model, unet_calls):
    m = tiny_model
    cond, uncond = encode_prompt(m, "a dog"), encode_prompt(m, "")
    token = CancelToken()
    gen = ddim.sample(m.unet, initial_noise(m, 0, 64, 64), cond, uncond, 7.5, 10, m.scheduler_config, token)
    next(gen)
    next(gen)
    assert len(unet_calls) == 2  # one batched (cond + uncond) call per step
    token.cancel()
    with pytest.raises(Cancelled):
        next(gen)
    assert len(unet_calls) == 2


def test_cancel_stops_invert_and_generate(tiny_model, unet_calls):
    m = tiny_model
    token = CancelToken()
    cond = encode_prompt(m, "")
    gen = ddim.invert(m.unet, encode_image(m, _smooth_picture()), cond, cond, 1.0, 10, m.scheduler_config, token)
    next(gen)
    token.cancel()
    with pytest.raises(Cancelled):
        next(gen)
    assert len(unet_calls) == 1

    token = CancelToken()
    events = []
    with pytest.raises(Cancelled):
        for ev in generate(m, GenerateParams("a dog", seed=3, steps=10), cancel=token):
            events.append(ev)
            if len(events) == 4:  # "encoding prompt" + 3 sampling steps
                token.cancel()
    assert len(unet_calls) == 1 + 3
    assert all(ev.result is None for ev in events)


# --- previews -------------------------------------------------------------------------------------

def _expected_pred_x0(m, p: GenerateParams):
    """Re-runs the sampler exactly as `generate` does, to know every step's predicted x0."""
    cond, uncond = encode_prompt(m, p.prompt), encode_prompt(m, p.negative_prompt)
    x_T = initial_noise(m, p.seed, 64, 64)
    return [s.pred_x0 for s in ddim.sample(m.unet, x_T, cond, uncond, p.guidance, p.steps, m.scheduler_config)]


def test_default_previews_on_every_step_and_final_image(tiny_model):
    m = tiny_model
    p = GenerateParams("a yellow star", seed=9, steps=4)
    events = list(generate(m, p))
    assert len(events) == 1 + p.steps + 1
    assert events[0].preview is None and events[0].step == 0
    steps = events[1:-1]
    assert [e.step for e in steps] == [1, 2, 3, 4] and {e.total for e in steps} == {p.steps + 1}
    expected = _expected_pred_x0(m, p)
    for ev, x0 in zip(steps, expected):
        assert ev.preview is not None
        # the cheap linear preview of this step's predicted x0, at latent resolution or scaled to the image
        assert ev.preview.size in {(16, 16), (64, 64)}
        cheap = m.previewer(x0)
        if cheap.size != ev.preview.size:
            cheap = cheap.resize(ev.preview.size, Image.BILINEAR)
        assert np.array_equal(pixels(ev.preview), pixels(cheap))
    final = events[-1]
    assert final.done and final.result is not None
    assert np.array_equal(pixels(final.preview), pixels(final.result.image))
    assert final.result.seed == 9 and final.result.params["steps"] == 4


def test_preview_every_0_gives_only_the_final_image(tiny_model):
    events = list(generate(tiny_model, GenerateParams("a cat", seed=4, steps=4), preview=PreviewOptions(every=0)))
    with_preview = [e for e in events if e.preview is not None]
    assert with_preview == [events[-1]]
    assert np.array_equal(pixels(events[-1].preview), pixels(events[-1].result.image))


def test_full_decode_previews(tiny_model):
    m = tiny_model
    p = GenerateParams("a house", seed=8, steps=4)
    events = list(generate(m, p, preview=PreviewOptions(every=0, full_decode_every=2)))
    expected = _expected_pred_x0(m, p)
    step_events = events[1:-1]
    for k, (ev, x0) in enumerate(zip(step_events, expected), start=1):
        if k % 2:
            assert ev.preview is None
        else:
            assert ev.preview.size == (64, 64)
            assert np.array_equal(pixels(ev.preview), pixels(decode_to_pil(m, x0)))
    # A full decode of the last step's x0 differs from the cheap linear preview of it.
    cheap = m.previewer(expected[-1]).resize((64, 64), Image.BILINEAR)
    assert not np.array_equal(pixels(step_events[-1].preview), pixels(cheap))
    assert np.array_equal(pixels(events[-1].preview), pixels(events[-1].result.image))
