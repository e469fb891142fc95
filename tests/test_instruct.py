"""InstructPix2Pix (pipelines/instruct.py) on the tiny model's 8-channel UNet: equality with diffusers'
pipeline, the guidance formula for every sI, the reference input sizing, randomisation, bad input, cancel."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import forward_calls, pixels
from PIL import Image

from pipelines.core import ddim
from pipelines.core.errors import InputError
from pipelines.core.events import Cancelled, CancelToken, run_to_end
from pipelines.core.latents import encode_image
from pipelines.core.text import encode_prompt
from pipelines.instruct import (
    RANDOM_SEED_MAX,
    InstructParams,
    instruct_edit,
    instruct_eps,
    instruct_size,
    prepare_input,
    size_multiple,
)

STEPS = 4


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(0)
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[...] = (30, 60, 200)
    arr[20:44, 10:30] = (220, 40, 40)
    arr += rng.integers(0, 20, arr.shape, dtype=np.uint8)
    return Image.fromarray(arr)


def edit(model, image, **kw):
    return run_to_end(instruct_edit(model, image, InstructParams(**{"instruction": "make it blue", "steps": STEPS,
                                                                    "seed": 3, **kw})))


@pytest.mark.parametrize("size, expected", [((1024, 768), (512, 384)), ((1920, 1080), (512, 320)),
                                            ((512, 512), (512, 512)), ((2048, 1024), (512, 256))])
def test_reference_input_sizes(size, expected):
    assert instruct_size(*size, 512, 64) == expected


@pytest.mark.parametrize("size, expected", [
    ((800, 530), (512, 320)),     # the reference: 576x384 (the short side rounded up pushes the long side over)
    ((1000, 300), (512, 128)),    # the reference: 640x192
    ((60000, 50), (512, 64)),     # the reference: 76800x64
    ((50, 60000), (64, 512)),
])
def test_sizes_never_exceed_the_resolution(size, expected):
    assert instruct_size(*size, 512, 64) == expected


def test_input_keeps_aspect_and_multiples(tiny_model):
    m = size_multiple(tiny_model)
    assert m == tiny_model.vae_factor * 2  # tiny UNet: 2 levels
    img = prepare_input(tiny_model, Image.new("RGB", (200, 100), "red"))
    assert max(img.size) == 64 and img.width % m == 0 and img.height % m == 0
    assert img.size == instruct_size(200, 100, 64, m) == (64, 32)


@pytest.mark.parametrize("scheduler", ["euler_a", "ddim"])
@pytest.mark.parametrize("s_i, s_t", [(1.5, 7.5), (1.0, 3.0)])
def test_equals_diffusers_pipeline(tiny_model, picture, scheduler, s_i, s_t):
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    m = tiny_model
    cls = EulerAncestralDiscreteScheduler if scheduler == "euler_a" else DDIMScheduler
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.instruct_unet(),
        scheduler=cls.from_config(m.scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ours = edit(m, picture, scheduler=scheduler, image_guidance=s_i, text_guidance=s_t, seed=11)
    theirs = pipe("make it blue", image=ours.source, num_inference_steps=STEPS, guidance_scale=s_t,
                  image_guidance_scale=s_i, generator=torch.Generator("cpu").manual_seed(11),
                  output_type="latent").images
    assert ours.latents.shape == theirs.shape
    assert torch.allclose(ours.latents, theirs, atol=1e-4), (ours.latents - theirs).abs().max()


def test_image_guidance_below_one_still_guides(tiny_model, picture):
    """sI < 1 keeps the three-way formula (diffusers would switch every guidance off)."""
    m, unet = tiny_model, tiny_model.instruct_unet()
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond, uncond = encode_prompt(m, "make it blue"), encode_prompt(m, "")
    img = encode_image(m, prepare_input(m, picture), scaled=False)
    t = torch.tensor(500)
    with torch.no_grad():
        got = instruct_eps(unet, x, t, cond, uncond, img, 7.5, 0.5)
        e_full = unet(torch.cat([x, img], 1), t, encoder_hidden_states=cond).sample
        e_img = unet(torch.cat([x, img], 1), t, encoder_hidden_states=uncond).sample
        e_none = unet(torch.cat([x, torch.zeros_like(img)], 1), t, encoder_hidden_states=uncond).sample
    want = e_none + 0.5 * (e_img - e_none) + 7.5 * (e_full - e_img)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(want, e_full, atol=1e-3)  # what an unguided single branch would give
    a = edit(m, picture, image_guidance=0.5, scheduler="ddim").latents
    b = edit(m, picture, image_guidance=1.0, scheduler="ddim").latents
    c = edit(m, picture, image_guidance=0.0, scheduler="ddim").latents
    assert (a - b).abs().max() > 1e-3 and (a - c).abs().max() > 1e-3


def test_image_conditioning_matters(tiny_model, picture):
    other = Image.fromarray(255 - np.asarray(picture))
    a = edit(tiny_model, picture, scheduler="ddim").latents
    b = edit(tiny_model, other, scheduler="ddim").latents
    assert (a - b).abs().mean() > 1e-3


def test_seed_reproduces_and_metadata(tiny_model, picture):
    a, b = edit(tiny_model, picture, seed=5), edit(tiny_model, picture, seed=5)
    assert torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents, edit(tiny_model, picture, seed=6).latents)
    info = a.edited.image.info
    assert "make it blue" in str(info) and a.params["seed"] == 5 and a.params["scheduler"] == "euler_a"


def test_randomize_seed_and_cfg(tiny_model, picture):
    for _ in range(3):
        r = edit(tiny_model, picture, randomize_seed=True, randomize_cfg=True, steps=1)
        assert 0 <= r.params["seed"] <= RANDOM_SEED_MAX
        assert 6.0 <= r.params["text_guidance"] <= 9.0 and 1.2 <= r.params["image_guidance"] <= 1.8  # reference
        assert round(r.params["text_guidance"], 2) == r.params["text_guidance"]
    fixed = edit(tiny_model, picture, seed=7, text_guidance=6.5, image_guidance=1.1, steps=1)
    assert (fixed.params["seed"], fixed.params["text_guidance"], fixed.params["image_guidance"]) == (7, 6.5, 1.1)


def test_unset_scales_follow_the_model_recommendation(tiny_model, picture, monkeypatch):
    """studio_model.json's instruct_guidance fills unset sT / sI and centres Randomize; an explicit value wins;
    a folder without (or with a broken) recommendation gets the paper's 7.5 / 1.5."""
    plain = edit(tiny_model, picture, steps=1)
    assert (plain.params["text_guidance"], plain.params["image_guidance"]) == (7.5, 1.5)
    monkeypatch.setattr(tiny_model, "info", {"instruct_guidance": {"text": 3.0, "image": 2.5}})
    r = edit(tiny_model, picture, steps=1)
    assert (r.params["text_guidance"], r.params["image_guidance"]) == (3.0, 2.5)
    assert not torch.equal(r.latents, plain.latents)
    assert edit(tiny_model, picture, steps=1, text_guidance=6.0).params["text_guidance"] == 6.0
    for _ in range(5):
        g = edit(tiny_model, picture, steps=1, randomize_cfg=True).params
        assert 2.4 <= g["text_guidance"] <= 3.6 and 2.0 <= g["image_guidance"] <= 3.0
    monkeypatch.setattr(tiny_model, "info", {"instruct_guidance": {"text": "lots"}})
    assert edit(tiny_model, picture, steps=1).params["text_guidance"] == 7.5


def test_empty_instruction_returns_the_input(tiny_model, picture):
    unet = tiny_model.instruct_unet()
    with forward_calls(unet) as calls:
        r = edit(tiny_model, picture, instruction="   ")
    assert not calls and r.latents is None
    assert np.array_equal(pixels(r.edited.image), pixels(r.source))


def test_cancel_stops_before_the_next_unet_call(tiny_model, picture):
    token = CancelToken()
    job = instruct_edit(tiny_model, picture, InstructParams("make it blue", steps=10, seed=1), token)
    with forward_calls(tiny_model.instruct_unet()) as calls:
        for ev in job:
            if ev.step == 3:
                token.cancel()
                with pytest.raises(Cancelled):
                    next(job)
                break
    assert len(calls) == 3


def test_previews_stream(tiny_model, picture):
    events = list(instruct_edit(tiny_model, picture, InstructParams("make it blue", steps=STEPS, seed=1)))
    assert [e.step for e in events] == list(range(STEPS + 2))
    assert all(e.preview is not None for e in events[1:])


@pytest.mark.parametrize("kw, fragment", [
    ({"text_guidance": -1}, "Text guidance"), ({"image_guidance": 99}, "Image guidance"),
    ({"steps": 0}, "Steps"), ({"scheduler": "plms"}, "scheduler"), ({"seed": 1.5}, "Seed"),
])
def test_bad_values(tiny_model, picture, kw, fragment):
    with pytest.raises(InputError, match=fragment):
        edit(tiny_model, picture, **kw)


def test_bad_images(tiny_model, tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(InputError, match="not an image"):
        edit(tiny_model, str(bad))
    with pytest.raises(InputError, match="No image"):
        edit(tiny_model, None)


def test_model_without_instruct_unet(tiny_model, picture):
    plain = dataclasses.replace(tiny_model, folder=None, _instruct=None)
    with pytest.raises(InputError, match="no InstructPix2Pix UNet"):
        edit(plain, picture)


def test_instruct_model_refuses_text_to_image(tiny_model):
    from pipelines.generate import GenerateParams, generate

    # an InstructPix2Pix model loaded as the main model (e.g. timbrooks/instruct-pix2pix): its UNet has 8 inputs
    ip2p_only = dataclasses.replace(tiny_model, pipe=type("Pipe", (), {})(), _instruct=None)
    ip2p_only.pipe.unet, ip2p_only.pipe.vae = tiny_model.instruct_unet(), tiny_model.vae
    assert ip2p_only.is_instruct and ip2p_only.instruct_unet() is ip2p_only.unet
    with pytest.raises(InputError, match="InstructPix2Pix model"):
        run_to_end(generate(ip2p_only, GenerateParams("a red circle", steps=2)))


def test_sampling_loop_is_the_ddim_core(tiny_model):
    """sample_with (DDIM) is sample_scheduled with a DDIM scheduler: identical latents."""
    m = tiny_model
    cond, uncond = encode_prompt(m, "a red circle"), encode_prompt(m, "")
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    a = ddim.sample(m.unet, x, cond, uncond, 7.5, 5, m.scheduler_config)
    sched = ddim.make_scheduler(m.scheduler_config, 5)
    b = ddim.sample_scheduled(lambda x_t, t, k: ddim.guided_eps(m.unet, x_t, t, cond, uncond, 7.5), x, sched, eta=0.0)
    for sa, sb in zip(a, b):
        assert torch.equal(sa.latents, sb.latents)


def test_an_instruct_pix2pix_folder_loads_as_the_model(tiny_model, picture, tmp_path):
    """A folder laid out as timbrooks/instruct-pix2pix (StableDiffusionInstructPix2PixPipeline, 8-channel UNet)
    loads through the studio's loader: it edits, and text-to-image says why it cannot."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from pipelines.core.models import load_model
    from pipelines.generate import GenerateParams, generate

    m = tiny_model
    StableDiffusionInstructPix2PixPipeline(
        vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.instruct_unet(),
        scheduler=m.pipe.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(tmp_path / "ip2p", safe_serialization=True)
    loaded = run_to_end(load_model(str(tmp_path / "ip2p")))
    assert loaded.is_instruct and loaded.instruct_unet() is loaded.unet
    ours = edit(loaded, picture, scheduler="ddim").latents
    assert torch.allclose(ours, edit(m, picture, scheduler="ddim").latents, atol=1e-5)
    with pytest.raises(InputError, match="InstructPix2Pix model"):
        run_to_end(generate(loaded, GenerateParams("a red circle", steps=2)))
