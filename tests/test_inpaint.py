"""Inpainting (pipelines/inpaint.py) on the tiny model: equality with diffusers' StableDiffusionInpaintPipeline for
the 9-channel UNet and the 4-channel latent blend, exact pixels outside the mask, Stop, bad input, shared state, and
loading inpainting models (a unet_inpaint/ folder, a Hub-style inpainting checkpoint as the model)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import forward_calls, pixels
from PIL import Image

from pipelines.core.errors import InputError
from pipelines.core.events import Cancelled, CancelToken, Kind, run_to_end
from pipelines.core.inpaint_inputs import hole_cells
from pipelines.core.latents import encode_image
from pipelines.core.masks import cells_to_image, grow_cells
from pipelines.core.metadata import read_metadata
from pipelines.inpaint import BLEND, UNET, InpaintParams, inpaint, masked_image_latent

STEPS = 4
PROMPT = "a red circle"


def tiny_inpaint_unet(tiny_model):
    """The tiny text-to-image UNet widened to 9 inputs, random numbers on the 5 new input channels (so the mask and
    the masked image act, unlike the zeros a fresh widening has)."""
    from diffusers import UNet2DConditionModel

    from pipelines.core.unet_inputs import widened_unet

    base = UNet2DConditionModel.from_pretrained(tiny_model.folder / "unet", use_safetensors=True)  # no LoRA layers
    unet = widened_unet(base, 9)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        unet.conv_in.weight[:, 4:] = 0.3 * torch.randn(unet.conv_in.weight[:, 4:].shape, generator=gen)
    return unet.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def unet9(tiny_model):
    return tiny_inpaint_unet(tiny_model)


@pytest.fixture(scope="module")
def model9(tiny_model, unet9):
    """The tiny model with an inpainting UNet, as a model folder's unet_inpaint/ gives it (a copy: the shared model
    is not changed)."""
    return dataclasses.replace(tiny_model, _inpaint=unet9)


@pytest.fixture(scope="module")
def picture():
    rng = np.random.default_rng(0)
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[...] = (30, 60, 200)
    arr[20:44, 10:30] = (220, 40, 40)
    arr += rng.integers(0, 20, arr.shape, dtype=np.uint8)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def mask():
    """Cell-aligned (4 px cells on the tiny model): every rule of pixels -> latent cells agrees on it."""
    m = np.zeros((64, 64), bool)
    m[16:40, 24:48] = True
    return m


def run(model, image, mask, **kw):
    return run_to_end(inpaint(model, image, mask, InpaintParams(**{"prompt": PROMPT, "steps": STEPS, "seed": 11,
                                                                   **kw})))


def diffusers_pipe(model, unet):
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=unet,
        scheduler=DDIMScheduler.from_config(model.scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def mask_image(mask):
    return Image.fromarray(mask.astype(np.uint8) * 255, "L")


@pytest.mark.parametrize("strength, guidance", [(1.0, 7.5), (0.75, 3.0), (1.0, 1.0)])
def test_nine_channel_equals_diffusers(model9, unet9, picture, mask, strength, guidance):
    ours = run(model9, picture, mask, strength=strength, guidance=guidance)
    assert ours.method == UNET
    cells = hole_cells(mask, model9.vae_factor)
    masked = masked_image_latent(model9, ours.source, cells)
    # the image as its posterior-mean latent (diffusers would sample the posterior with the generator)
    image = ours.source if strength == 1.0 else encode_image(model9, ours.source)
    theirs = diffusers_pipe(model9, unet9)(
        PROMPT, image=image, mask_image=mask_image(mask), masked_image_latents=masked, height=64, width=64,
        strength=strength, num_inference_steps=STEPS, guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(11), output_type="latent").images
    assert ours.latents.shape == theirs.shape
    assert torch.allclose(ours.latents, theirs, atol=1e-4), (ours.latents - theirs).abs().max()


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_latent_blend_equals_diffusers(tiny_model, picture, mask, strength):
    ours = run(tiny_model, picture, mask, strength=strength)
    assert ours.method == BLEND
    z = encode_image(tiny_model, ours.source)
    theirs = diffusers_pipe(tiny_model, tiny_model.unet)(
        PROMPT, image=z, mask_image=mask_image(mask), masked_image_latents=z, height=64, width=64,
        strength=strength, num_inference_steps=STEPS, guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(11), output_type="latent").images
    assert torch.allclose(ours.latents, theirs, atol=1e-4), (ours.latents - theirs).abs().max()
    keep = ~torch.from_numpy(hole_cells(mask, 4))[None, None].expand_as(z)
    assert torch.equal(ours.latents[keep], z[keep])  # the last blend is the clean image latent outside


def test_mask_and_masked_image_act(model9, picture, mask):
    a = run(model9, picture, mask).latents
    other = mask.copy()
    other[40:48, 24:48] = True
    b = run(model9, picture, other).latents
    c = run(model9, Image.fromarray(255 - np.asarray(picture)), mask).latents
    assert (a - b).abs().max() > 1e-3 and (a - c).abs().max() > 1e-3


@pytest.mark.parametrize("which", ["unet", "blend"])
def test_pixels_outside_the_grown_cells_come_back_exactly(model9, tiny_model, picture, which):
    m = np.zeros((64, 64), bool)
    m[21:30, 13:19] = True  # not cell-aligned: the cells any pixel touches
    model = model9 if which == "unet" else tiny_model
    r = run(model, picture, m)
    cells = hole_cells(m, 4)
    outside = ~cells_to_image(grow_cells(cells), 4)
    got, src = pixels(r.edited.image), pixels(picture)
    assert np.array_equal(got[outside], src[outside])
    assert np.abs(got[~outside] - src[~outside]).max() > 0
    assert not np.array_equal(pixels(r.decoded)[outside], src[outside])  # the VAE alone changes them
    assert np.array_equal(r.mask, cells_to_image(cells, 4))
    plain = run(model, picture, m, keep_unmasked=False)
    assert np.array_equal(pixels(plain.edited.image), pixels(plain.decoded))


def test_seed_metadata_and_previews(model9, picture, mask):
    events = list(inpaint(model9, picture, mask, InpaintParams(PROMPT, steps=STEPS, seed=5)))
    assert events[0].kind == Kind.SOURCE and [e.step for e in events] == list(range(STEPS + 2))
    assert all(e.preview is not None for e in events[1:])
    r = events[-1].result
    assert torch.equal(r.latents, run(model9, picture, mask, seed=5).latents)
    assert not torch.equal(r.latents, run(model9, picture, mask, seed=6).latents)
    meta = read_metadata(r.edited.image)
    assert meta["task"] == "inpaint" and meta["seed"] == 5 and meta["inpaint_method"] == UNET
    assert meta["prompt"] == PROMPT and meta["steps_run"] == STEPS


def test_strength_runs_fewer_steps(model9, picture, mask):
    with forward_calls(model9.inpaint_unet()) as calls:
        r = run(model9, picture, mask, strength=0.5)
    assert len(calls) == STEPS // 2 and r.params["steps_run"] == 2


def test_blend_can_be_asked_for(model9, tiny_model, picture, mask):
    r = run(model9, picture, mask, blend=True)
    assert r.method == BLEND
    assert torch.equal(r.latents, run(tiny_model, picture, mask).latents)


def test_empty_prompt_fills_from_context_with_the_inpainting_unet(model9, tiny_model, picture, mask):
    assert run(model9, picture, mask, prompt="  ").params["prompt"] == ""
    with pytest.raises(InputError, match="prompt"):
        run(tiny_model, picture, mask, prompt="")


@pytest.mark.parametrize("model_name", ["model9", "tiny_model"])
def test_cancel_stops_within_one_unet_call(request, model_name, picture, mask):
    model = request.getfixturevalue(model_name)
    unet = model.inpaint_unet() if model_name == "model9" else model.unet
    token = CancelToken()
    job = inpaint(model, picture, mask, InpaintParams(PROMPT, steps=10, seed=1), token)
    with forward_calls(unet) as calls:
        for ev in job:
            if ev.step == 3:
                token.cancel()
                with pytest.raises(Cancelled):
                    next(job)
                break
    assert len(calls) == 3


def transparent():
    return Image.new("RGBA", (64, 64), (255, 0, 0, 0))


@pytest.mark.parametrize("kw, mask_value, fragment", [
    ({}, None, "No mask"),
    ({}, np.zeros((64, 64), bool), "mask is empty"),
    ({}, "transparent", "fully transparent"),
    ({"steps": 0}, "mask", "Steps"),
    ({"steps": 10_000}, "mask", "Steps"),
    ({"guidance": -1}, "mask", "Guidance"),
    ({"strength": 0}, "mask", "Strength"),
    ({"strength": 0.1}, "mask", "too low"),
    ({"seed": 1.5}, "mask", "Seed"),
    ({"prompt": "x" * 5000}, "mask", "too long"),
    ({"blend": True, "prompt": ""}, "mask", "prompt"),
])
def test_bad_inputs_refused_before_any_unet_call(model9, picture, mask, kw, mask_value, fragment):
    value = {"mask": mask, "transparent": transparent()}.get(mask_value, mask_value) \
        if isinstance(mask_value, str) else mask_value
    with forward_calls(model9.inpaint_unet()) as calls, forward_calls(model9.vae) as vae_calls:
        with pytest.raises(InputError, match=fragment):
            run(model9, picture, value, **kw)
    assert not calls and not vae_calls


def test_bad_images(model9, mask, tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(InputError, match="not an image"):
        run(model9, str(bad), mask)
    with pytest.raises(InputError, match="No image"):
        run(model9, None, mask)


def test_mask_of_another_size_is_resized(model9, picture, mask):
    big = np.repeat(np.repeat(mask, 8, 0), 8, 1)  # the mask painted at display size (512 px)
    assert torch.equal(run(model9, picture, big).latents, run(model9, picture, mask).latents)


def test_shared_model_state_unchanged(model9, tiny_model, picture, mask):
    before = {k: v.clone() for k, v in model9.inpaint_unet().state_dict().items()}
    base = {k: v.clone() for k, v in tiny_model.unet.state_dict().items()}
    config = dict(tiny_model.scheduler_config)
    token = CancelToken()
    job = inpaint(model9, picture, mask, InpaintParams(PROMPT, steps=6, seed=1), token)
    next(job), next(job)
    token.cancel()
    with pytest.raises(Cancelled):
        list(job)
    run(tiny_model, picture, mask)
    after = model9.inpaint_unet().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(base[k], v) for k, v in tiny_model.unet.state_dict().items())
    assert dict(tiny_model.scheduler_config) == config
    assert not model9.inpaint_unet()._forward_hooks and not tiny_model.unet._forward_hooks
    assert tiny_model._inpaint is None  # the shared model was never given the test's UNet


def test_unet_inpaint_folder_and_inpainting_checkpoint_load(tiny_model, unet9, picture, mask, tmp_path):
    """A model folder with unet_inpaint/ loads it on first use; a Hub-style SD-inpainting checkpoint (its main UNet
    has 9 inputs) loads as the model: it inpaints the same, and text-to-image says why it cannot."""
    import shutil

    from pipelines.core.models import load_model
    from pipelines.generate import GenerateParams, generate

    folder = tmp_path / "with_inpaint"
    shutil.copytree(tiny_model.folder, folder)
    unet9.save_pretrained(folder / "unet_inpaint", safe_serialization=True)
    loaded = run_to_end(load_model(str(folder)))
    assert not loaded.is_inpaint and loaded.has_inpaint_unet() and loaded._inpaint is None
    a = run(loaded, picture, mask).latents
    assert loaded._inpaint is not None and loaded.inpaint_unet() is loaded.inpaint_unet()

    diffusers_pipe(tiny_model, unet9).save_pretrained(tmp_path / "sd_inpaint", safe_serialization=True)
    hub_like = run_to_end(load_model(str(tmp_path / "sd_inpaint")))
    assert hub_like.is_inpaint and hub_like.inpaint_unet() is hub_like.unet
    assert torch.allclose(run(hub_like, picture, mask).latents, a, atol=1e-5)
    with pytest.raises(InputError, match="inpainting model"):
        run_to_end(generate(hub_like, GenerateParams("a red circle", steps=2)))
    with pytest.raises(InputError, match="no text-to-image UNet"):
        run(hub_like, picture, mask, blend=True)
    assert not tiny_model.is_inpaint and not tiny_model.has_inpaint_unet()


# ------------------------------------------------------------------------------------------ the eval rows
def test_the_eval_rows_run_both_methods_on_the_same_cases(model9, tiny_model, monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import eval_embedded

    monkeypatch.setattr(eval_embedded, "INPAINT_STEPS", 2)
    monkeypatch.setattr(eval_embedded.Context, "n", lambda self, full, quick: 1)
    skipped = eval_embedded.GROUPS["inpaint"](eval_embedded.Context(tiny_model, quick=True))
    assert len(skipped) == 1 and "skipped" in skipped[0].metric and skipped[0].passed is None
    rows = eval_embedded.GROUPS["inpaint"](eval_embedded.Context(model9, quick=True))
    by = {(r.group, r.metric): r for r in rows}
    assert len(by) == len(rows)
    for kind in ("insert", "recolour", "remove"):
        for name in ("9-channel UNet, guidance 7.5", "4-channel blend, guidance 7.5"):  # no recommendation
            after = by[(f"inpaint {kind}", f"{name}: PSNR outside, after paste-back")]
            before = by[(f"inpaint {kind}", f"{name}: PSNR outside, before paste-back")]
            assert after.value == 100.0 and after.passed and before.value < 60
            assert 0 <= by[(f"inpaint {kind}", f"{name}: success")].value <= 1
            assert by[(f"inpaint {kind}", f"{name}: seam colour error")].value >= 0
    assert ("inpaint remove", "9-channel UNet, guidance 7.5: background error in the hole") in by
    assert by[("inpaint", "4-channel blend, guidance 7.5: success, all kinds")].n == 3
    assert len([r for r in rows if r.metric.endswith("success, all kinds")]) == 2


def test_seam_ring_is_the_inner_edge():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from eval_embedded import seam_ring

    region = np.zeros((16, 16), bool)
    region[4:12, 4:12] = True
    ring = seam_ring(region, 2)
    assert ring.sum() == 64 - 16 and ring[4, 4] and ring[5, 5] and not ring[6, 6] and not ring[3, 3]
    edge = np.zeros((16, 16), bool)
    edge[:, :8] = True  # along the image border there is no seam
    assert not seam_ring(edge, 2)[:, :6].any() and seam_ring(edge, 2)[:, 6:8].all()
