"""DiffEdit (pipelines/diffedit.py): mask estimation, masked DDIM decoding, cache, cancel, bad input, a
comparison with diffusers' deprecated StableDiffusionDiffEditPipeline, and one semantic check on the
embedded model."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from pipelines.core import ddim
from pipelines.core.cache import LRUCache
from pipelines.core.errors import InputError
from pipelines.core.events import Cancelled, CancelToken, drain, run_to_end
from pipelines.core.latents import decode_to_pil, encode_image
from pipelines.core.masks import latent_cells, user_mask
from pipelines.core.text import encode_prompt
from pipelines.diffedit import (
    DiffEditParams,
    diffedit_edit,
    diffedit_mask,
    difference_map,
    inversion_key,
    mask_timestep_index,
    masked_decode,
    normalise_map,
)
from pipelines.inversion import prepare_image
from tests.helpers import forward_calls, pixels

STEPS = 6
SRC, TGT = "a red circle on the left", "a blue square on the right"


def _image(model, seed=0):
    n = model.resolution
    return Image.fromarray((np.random.default_rng(seed).random((n, n, 3)) * 255).astype(np.uint8))


def _p(**kw):
    base = dict(target_prompt=TGT, source_prompt=SRC, steps=STEPS, mask_draws=4, encode_ratio=0.5)
    base.update(kw)
    return DiffEditParams(**base)


def _last(states) -> torch.Tensor:
    """The final latent of a DDIM core pass."""
    return list(states)[-1].latents


def _block(model, y0=16, y1=40, x0=8, x1=32):
    m = np.zeros((model.resolution, model.resolution), bool)
    m[y0:y1, x0:x1] = True
    return m


# ------------------------------------------------------------------------------------------------ 1. mask


def test_identical_prompts_give_a_zero_map_and_a_clear_error(tiny_model):
    m = tiny_model
    z0 = encode_image(m, prepare_image(m, _image(m)))
    sched = ddim.make_scheduler(m.scheduler_config, STEPS)
    emb = encode_prompt(m, SRC)
    noise = torch.randn((3, *z0.shape[1:]), generator=torch.Generator().manual_seed(0))
    raw = drain(difference_map(m.unet, z0, noise, sched.timesteps[3], emb, emb, sched))
    assert raw.shape == z0.shape[-2:] and torch.count_nonzero(raw) == 0
    with pytest.raises(InputError, match="no difference"):
        normalise_map(raw)
    with pytest.raises(InputError, match="identical"):
        run_to_end(diffedit_mask(m, _image(m), _p(target_prompt=SRC)))
    # Different text, same tokens (CLIP lower-cases): the map is all zeros -> the same clear error.
    with pytest.raises(InputError, match="no difference"):
        run_to_end(diffedit_mask(m, _image(m), _p(target_prompt=SRC.upper())))


def test_mask_is_non_empty_and_monotone_in_the_threshold(tiny_model):
    m, img = tiny_model, _image(tiny_model)
    res = run_to_end(diffedit_mask(m, img, _p(threshold=0.5)))
    f = m.vae_factor
    assert res.mask.dtype == bool and res.mask.shape == (64, 64) and res.heat.dtype == np.float32
    assert 0 < res.mask.sum() < res.mask.size and 0 <= res.heat.min() and res.heat.max() <= 1
    assert np.array_equal(res.mask, res.heat > 0.5)
    # nearest upsampling: constant over each latent cell, so the image mask is exactly the latent mask
    assert np.array_equal(res.mask, np.kron(latent_cells(res.mask, f), np.ones((f, f), bool)))
    sched = ddim.make_scheduler(m.scheduler_config, STEPS)
    assert res.overlay.size == img.size and res.params["mask_timestep"] == int(sched.timesteps[STEPS - STEPS // 2])
    masks = [res.heat > th for th in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)]
    assert all(not (hi & ~lo).any() for lo, hi in zip(masks, masks[1:]))  # higher threshold -> subset
    assert masks[0].sum() > res.mask.sum() > masks[-2].sum()
    assert np.array_equal(run_to_end(diffedit_mask(m, img, _p(threshold=0.3))).mask, masks[2])  # same seed
    empty = run_to_end(diffedit_mask(m, img, _p(threshold=1.0)))
    assert not empty.mask.any() and empty.params["mask_fraction"] == 0.0  # flagged, not an error
    paper = run_to_end(diffedit_mask(m, img, _p(normalisation="paper")))
    assert paper.heat.min() == 0 and paper.heat.max() == pytest.approx(1.0) and paper.mask.any()


# ------------------------------------------------------------------------------------------ 2. masked decoding


def test_background_latent_follows_the_inversion_at_the_same_noise_level(tiny_model):
    m, img = tiny_model, _image(tiny_model, 1)
    cache = LRUCache(4)
    block = _block(m)
    p = _p(keep_background=False)
    plain = run_to_end(diffedit_edit(m, img, p, mask=block, cache=cache))
    pasted = run_to_end(diffedit_edit(m, img, replace(p, keep_background=True), mask=block, cache=cache))
    assert pasted.cached and np.array_equal(plain.mask, block)
    source = prepare_image(m, img)
    path = cache.get(inversion_key(m, source, STEPS))
    n = STEPS // 2
    assert len(path.levels) == n
    lat = torch.from_numpy(latent_cells(block, m.vae_factor))[None, None]
    cond, uncond = encode_prompt(m, TGT), encode_prompt(m, SRC)
    states = list(masked_decode(m, path, n, lat, cond, uncond, 7.5, STEPS))
    assert len(states) == n
    out = ~lat.expand_as(path.z0)
    for j, st in enumerate(states):
        k = STEPS - n + j
        ref = path.z0 if k == STEPS - 1 else path.levels[STEPS - 2 - k]
        assert torch.equal(st.latents[out], ref[out])  # exact, and the level of the new latent (no lag)
    assert torch.equal(states[-1].latents[out], path.z0[out])
    # The job decodes exactly that latent ...
    assert np.array_equal(pixels(plain.edited.image), pixels(decode_to_pil(m, states[-1].latents)))
    # ... and with keep_background the input pixels come back, bit-exact, outside the edited cells + 1 cell ring.
    ring = np.zeros_like(block)
    ring[12:44, 4:36] = True
    assert np.array_equal(pixels(pasted.edited.image)[~ring], pixels(source)[~ring])
    assert np.array_equal(pixels(pasted.edited.image)[ring], pixels(plain.edited.image)[ring])
    assert np.abs(pixels(plain.edited.image)[block] - pixels(source)[block]).mean() > 1  # it did edit
    assert pasted.edited.image.info["parameters"] and pasted.params["encode_steps"] == n


def test_masked_levels_are_aligned_not_lagging(tiny_model):
    """With the inversion's own conditioning ("" at guidance 1), sampling retraces the inversion: inside the mask
    each new latent is nearest the inverted latent of its own level, which is the one the background takes.
    (The tiny random UNet's inversion error accumulates, so only the first half of the steps is compared:
    measured 0.05 vs 0.19, 0.09 vs 0.25, 0.13 vs 0.27 mean abs error, same level vs one step behind.)"""
    m = tiny_model
    cache = LRUCache(2)
    run_to_end(diffedit_edit(m, _image(m, 2), _p(encode_ratio=1.0), mask=_block(m), cache=cache))
    path = cache.get(inversion_key(m, prepare_image(m, _image(m, 2)), STEPS))
    lat = torch.from_numpy(latent_cells(_block(m), m.vae_factor))[None, None]
    empty = encode_prompt(m, "")
    inside = lat.expand_as(path.z0)
    for j, st in enumerate(masked_decode(m, path, STEPS, lat, empty, None, 1.0, STEPS)):
        same = path.z0 if j == STEPS - 1 else path.levels[STEPS - 2 - j]
        lagged = path.levels[STEPS - 1 - j]
        if j < STEPS // 2:
            assert (st.latents - same)[inside].abs().mean() < 0.6 * (st.latents - lagged)[inside].abs().mean()


# ------------------------------------------------------------------------------------ 3. r = 0, empty, full mask


def test_r0_empty_and_full_masks(tiny_model):
    m, img = tiny_model, _image(tiny_model, 3)
    with forward_calls(m.unet) as calls:
        same = run_to_end(diffedit_edit(m, img, _p(encode_ratio=0.0), mask=_block(m)))
    assert not calls and np.array_equal(pixels(same.edited.image), pixels(prepare_image(m, img)))
    assert same.params["encode_steps"] == 0
    with pytest.raises(InputError, match="mask is empty"):
        run_to_end(diffedit_edit(m, img, _p(), mask=np.zeros((64, 64), bool)))
    with pytest.raises(InputError, match="mask is empty"):
        run_to_end(diffedit_edit(m, img, _p(threshold=1.0)))
    # A full mask is plain DDIM decoding from the inverted latent (no background anywhere).
    cache = LRUCache(2)
    full = run_to_end(diffedit_edit(m, img, _p(), mask=np.full((64, 64), 255, np.uint8), cache=cache))
    path = cache.get(inversion_key(m, prepare_image(m, img), STEPS))
    n = STEPS // 2
    z = _last(ddim.sample(m.unet, path.levels[n - 1], encode_prompt(m, TGT), encode_prompt(m, SRC), 7.5, STEPS,
                          m.scheduler_config, start_index=STEPS - n))
    assert full.mask.all() and np.array_equal(pixels(full.edited.image), pixels(decode_to_pil(m, z)))


# ---------------------------------------------------------------------------------------------- 4. cancel


@pytest.mark.parametrize("k, stage", [(2, "estimating mask"), (5, "mask ready"), (9, "inverting"),
                                      (13, "editing (DiffEdit)")])
def test_cancel_stops_before_the_next_unet_call(tiny_model, k, stage):
    """25 draws = 3 mask calls; events: encode, 3x mask, mask ready, 6x inverting, 6x editing, done."""
    m = tiny_model
    token = CancelToken()
    stages, at_cancel = [], None
    with forward_calls(m.unet) as calls:
        job = diffedit_edit(m, _image(m), _p(mask_draws=25, encode_ratio=1.0), cancel=token)
        with pytest.raises(Cancelled):
            for ev in job:
                stages.append(ev.stage)
                if len(stages) == k:
                    token.cancel()
                    at_cancel = len(calls)
        assert at_cancel is not None and at_cancel > 0 and len(calls) == at_cancel
    assert len(stages) == k and stages[-1] == stage


# ----------------------------------------------------------------------------------------------- 5. cache


def test_second_edit_reuses_the_inversion(tiny_model):
    m, img = tiny_model, _image(tiny_model, 4)
    cache = LRUCache(4)
    n = STEPS // 2
    with forward_calls(m.unet) as first:
        a = run_to_end(diffedit_edit(m, img, _p(), cache=cache))
    assert len(first) == 1 + n + n and not a.cached          # mask (4 draws, one call), inversion, decoding
    with forward_calls(m.unet) as second:
        b = run_to_end(diffedit_edit(m, img, _p(target_prompt="a green star at the top"), mask=a.mask, cache=cache))
    assert len(second) == n and b.cached                     # decoding only
    with forward_calls(m.unet) as third:                     # smaller r: a prefix of the cached inversion
        c = run_to_end(diffedit_edit(m, img, _p(encode_ratio=1 / 3), mask=a.mask, cache=cache))
    assert len(third) == 2 and c.cached
    with forward_calls(m.unet) as fourth:                    # deeper r: inverted again (and stored)
        d = run_to_end(diffedit_edit(m, img, _p(encode_ratio=1.0), mask=a.mask, cache=cache))
    assert len(fourth) == 2 * STEPS and not d.cached
    assert len(cache.get(inversion_key(m, a.source, STEPS)).levels) == STEPS


# ----------------------------------------------------------------------------------- 6. diffusers comparison


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_model):
    import warnings

    from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionDiffEditPipeline

    m = tiny_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionDiffEditPipeline(
            vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
            scheduler=DDIMScheduler.from_config(m.scheduler_config), safety_checker=None, feature_extractor=None,
            inverse_scheduler=DDIMInverseScheduler.from_config(m.scheduler_config), requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_mask_matches_diffusers_generate_mask(tiny_model, diffusers_pipe):
    """Same z0 (a latent input skips diffusers' sampled encode), same generator -> same noise, timestep and map.
    diffusers returns only the binary mask, so its map is rebuilt from its own UNet call (captured by a hook)."""
    m, pipe, draws, seed = tiny_model, diffusers_pipe, 4, 7
    source = prepare_image(m, _image(m, 5))
    z0 = encode_image(m, source)
    seen = {}
    hook = m.unet.register_forward_hook(lambda mod, args, kw, out: seen.update(x=args[0], t=args[1], eps=out.sample),
                                        with_kwargs=True)
    try:
        theirs = pipe.generate_mask(image=z0, source_prompt=SRC, target_prompt=TGT, mask_encode_strength=0.5,
                                    num_maps_per_mask=draws, num_inference_steps=STEPS, guidance_scale=7.5,
                                    generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    finally:
        hook.remove()
    ours = run_to_end(diffedit_mask(m, source, _p(mask_draws=draws, seed=seed, normalisation="diffusers")))
    f = m.vae_factor
    sched = ddim.make_scheduler(m.scheduler_config, STEPS)
    t = sched.timesteps[mask_timestep_index(0.5, STEPS)]
    assert int(seen["t"]) == int(t) == ours.params["mask_timestep"]
    noise = randn_tensor((draws, *z0.shape[1:]), generator=torch.Generator("cpu").manual_seed(seed))
    assert torch.equal(seen["x"][:draws], sched.add_noise(z0.expand(draws, -1, -1, -1), noise, t))
    neg_s, s, neg_t, tg = seen["eps"].chunk(4)
    their_map = ((neg_t + 7.5 * (tg - neg_t)) - (neg_s + 7.5 * (s - neg_s))).abs().mean([0, 1])
    their_heat = (their_map.clamp(0, their_map.mean() * 3) / (their_map.mean() * 3)).numpy()
    our_heat = ours.heat[::f, ::f]
    assert np.abs(our_heat - their_heat).max() < 1e-4
    decided = np.abs(their_heat - 0.5) > 1e-4                     # pixels not on the threshold's edge
    assert theirs.shape == (1, *our_heat.shape) and theirs.any()
    assert np.array_equal(latent_cells(ours.mask, f)[decided], theirs[0].astype(bool)[decided])


def test_inversion_and_decoding_match_diffusers(tiny_model, diffusers_pipe):
    """Text-free inversion == invert(prompt="", guidance 1); full-mask decoding == __call__ with an all-ones mask;
    with a partial mask diffusers ends on the inverted x_1 outside the mask (its one-step lag), we on z0."""
    m, pipe = tiny_model, diffusers_pipe
    source = prepare_image(m, _image(m, 6))
    z0 = encode_image(m, source)
    r, n = 2 / 3, 4
    inv = pipe.invert(prompt="", image=z0, num_inference_steps=STEPS, inpaint_strength=r, guidance_scale=1.0).latents
    cache = LRUCache(2)
    ours = run_to_end(diffedit_edit(m, source, _p(encode_ratio=r), mask=np.ones((64, 64), bool), cache=cache))
    path = cache.get(inversion_key(m, source, STEPS))
    assert inv.shape[1] == n == len(path.levels)
    assert (torch.stack(path.levels[::-1], 1) - inv).abs().max() < 1e-4
    h = z0.shape[-1]
    kw = dict(prompt=TGT, negative_prompt=SRC, image_latents=inv, inpaint_strength=r, num_inference_steps=STEPS,
              guidance_scale=7.5, output_type="latent")
    theirs = pipe(mask_image=np.ones((1, h, h), np.float32), **kw).images
    z = _last(masked_decode(m, path, n, torch.ones((1, 1, h, h), dtype=torch.bool), encode_prompt(m, TGT),
                            encode_prompt(m, SRC), 7.5, STEPS))
    assert (z - theirs).abs().max() < 1e-4
    assert np.array_equal(pixels(ours.edited.image), pixels(decode_to_pil(m, z)))
    block = torch.from_numpy(latent_cells(_block(m), m.vae_factor))
    lagged = pipe(mask_image=block.float()[None].numpy(), **kw).images
    out = ~block[None, None].expand_as(z0)
    assert (lagged[out] - inv[0, -1][None].expand_as(z0)[out]).abs().max() < 1e-6   # diffusers: x_1 outside
    ours_z = _last(masked_decode(m, path, n, block[None, None], encode_prompt(m, TGT), encode_prompt(m, SRC), 7.5,
                                 STEPS))
    assert torch.equal(ours_z[out], z0[out]) and (lagged[out] - z0[out]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------- 7. semantic


def _recolour(scene, caption):
    from training import world

    obj = scene.objects[0]
    new = [c for c in world.allowed_object_colours(scene.background) if c != obj.colour][0]
    target = caption.replace(f"{obj.colour} {obj.shape}", f"{new} {obj.shape}")
    assert target != caption
    return target, new


@pytest.mark.slow
def test_recolour_mask_finds_the_object_on_the_embedded_model(embedded):
    """Recolouring the object of the first 8 held-out one-object scenes (source = the true caption; 20 steps,
    4 draws, strength 0.5, threshold 0.5). Measured IoU with the true object mask:
      diffusers normalisation  0.79 0.42 0.35 0.66 0.42 0.58 0.56 0.55  (mean 0.54), recall 0.92-1, <= 16% of image
      paper (min-max)          0.84 0.35 0.54 0.64 0.76 0.74 0.70 0.76  (mean 0.67), recall 0.36-1 (mean 0.70)
    The diffusers mask covers the object and a margin (latent cells are 4 px; the difference spreads about one
    cell); the min-max mask is tighter and sometimes misses part of the object."""
    from training import world
    from training.evaluation import held_out_scenes

    stats = {"diffusers": [], "paper": []}
    for caption, scene in held_out_scenes(8, 1):
        target, _ = _recolour(scene, caption)
        img, gt = world.render(scene), scene.mask(0)
        for norm, rows in stats.items():
            mk = run_to_end(diffedit_mask(embedded, img, DiffEditParams(
                target, caption, steps=20, mask_draws=4, normalisation=norm))).mask
            rows.append(((mk & gt).sum() / (mk | gt).sum(), (mk & gt).sum() / gt.sum(), mk.mean()))
    d, p = np.array(stats["diffusers"]), np.array(stats["paper"])
    assert d[:, 0].mean() > 0.5 and d[:, 0].min() > 0.3              # IoU
    assert d[:, 1].min() > 0.85 and d[:, 2].max() < 0.2              # covers the object, not the image
    assert p[:, 0].mean() > 0.6 and p[:, 0].mean() > d[:, 0].mean()  # the paper's rescale: tighter


@pytest.mark.slow
def test_recolour_edit_changes_the_object_and_keeps_the_background(embedded):
    """Three held-out scenes recoloured to red (measured: cyan, cyan and white objects read red; black reads
    orange): at least two must read the new colour, and every output is the input, bit-exact, outside the edit."""
    from training import world
    from training.checker import check
    from training.evaluation import held_out_scenes

    recoloured = 0
    for caption, scene in held_out_scenes(3, 1):
        target, new = _recolour(scene, caption)
        img = world.render(scene)
        res = run_to_end(diffedit_edit(embedded, img, DiffEditParams(target, caption, steps=20, mask_draws=4)))
        out = np.asarray(res.edited.image)
        found = check(out)["objects"]
        cx, cy = scene.objects[0].centre
        nearest = min(found, key=lambda o: (o["centre"][0] - cx) ** 2 + (o["centre"][1] - cy) ** 2)
        recoloured += nearest["colour"] == new
        lat = latent_cells(res.mask, embedded.vae_factor)
        grown = np.pad(lat, 1)
        grown = np.any([grown[1 + dy:1 + dy + lat.shape[0], 1 + dx:1 + dx + lat.shape[1]]
                        for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
        ring = np.kron(grown, np.ones((embedded.vae_factor,) * 2, bool))
        assert ring.mean() < 0.5 and np.array_equal(out[~ring], img[~ring])   # the input, bit-exact, outside
    assert recoloured >= 2


# ------------------------------------------------------------------------------------------- 8. bad input


@pytest.mark.parametrize("kw, message", [
    (dict(target_prompt="  "), "Please enter a target prompt"),
    (dict(threshold=1.5), "Mask threshold must be between"),
    (dict(encode_ratio=-0.1), "Encoding ratio r must be between"),
    (dict(mask_strength=0), "Mask encode strength must be above 0"),
    (dict(mask_draws=0), "Mask noise draws must be between"),
    (dict(mask_draws=2.5), "whole number"),
    (dict(steps=0), "Steps must be between"),
    (dict(normalisation="median"), "Unknown mask normalisation"),
])
def test_bad_parameters_give_clear_messages(tiny_model, kw, message):
    with forward_calls(tiny_model.unet) as calls:
        with pytest.raises(InputError, match=message):
            run_to_end(diffedit_edit(tiny_model, _image(tiny_model), _p(**kw)))
        with pytest.raises(InputError, match=message):
            run_to_end(diffedit_mask(tiny_model, _image(tiny_model), _p(**kw)))
    assert not calls


@pytest.mark.parametrize("mask, message", [
    ("mask.png", "must be an image or an array, got str"),
    (np.zeros((4, 4, 2), np.uint8), "must be a 2-D image"),
    (np.array([["a"]], dtype=object), "must be an image or an array"),
    (np.zeros((8, 8), np.float32), "mask is empty"),
])
def test_bad_masks_give_clear_messages(tiny_model, mask, message):
    with forward_calls(tiny_model.unet) as calls:
        with pytest.raises(InputError, match=message):
            run_to_end(diffedit_edit(tiny_model, _image(tiny_model), _p(), mask=mask))
    assert not calls


def test_mask_formats(tiny_model):
    size = (64, 64)
    small = np.zeros((16, 16), np.uint8)
    small[4:8, 2:6] = 200
    up = user_mask(small, size)
    assert up.shape == (64, 64) and up.sum() == 16 * 16 and up[16:32, 8:24].all()
    assert np.array_equal(user_mask(small > 0, size), up)
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[10:20, 10:20, 3] = 255
    assert user_mask(Image.fromarray(rgba, "RGBA"), size).sum() == 100
    assert user_mask(Image.fromarray(rgba[..., 3], "L"), size).sum() == 100
    assert user_mask(rgba, size).sum() == 100
