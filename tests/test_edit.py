"""Text editing on a real image (threshold r, Prompt-to-Prompt) and real-image interpolation, tiny model."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from pipelines import p2p
from pipelines.core import masks
from pipelines.core.cache import LRUCache
from pipelines.core.errors import InputError
from pipelines.core.events import Cancelled, CancelToken, run_to_end
from pipelines.edit import EditParams, source_steps, text_edit
from pipelines.interpolation import istd
from pipelines.inversion import InversionParams, invert_and_reconstruct
from pipelines.real_interpolation import RealInterpolationParams, real_interpolation_frame, real_interpolation_sequence
from tests.helpers import pixels

STEPS = 6


def _image(model, seed=0, size=None):
    w, h = size or (model.resolution, model.resolution)
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


def _edit(**kw):
    base = dict(source_prompt="a red circle on the left", target_prompt="a blue circle on the left", steps=STEPS,
                guidance=7.5, inversion="nti", inner_steps=2)
    base.update(kw)
    return EditParams(**base)


def test_source_steps_follow_t_greater_than_rT():
    assert source_steps(0.8, 50) == 10 and source_steps(1.0, 50) == 0 and source_steps(0.0, 50) == 50
    assert source_steps(0.7, 10) == 3 and source_steps(0.75, 10) == 3


@pytest.mark.slow
def test_r_that_never_switches_reproduces_the_nti_reconstruction_exactly(tiny_model):
    img = _image(tiny_model)
    cache = LRUCache(4)
    inv = run_to_end(invert_and_reconstruct(tiny_model, img, InversionParams(
        "a red circle on the left", STEPS, guidance=7.5, method="nti", inner_steps=2), cache))
    never = run_to_end(text_edit(tiny_model, img, _edit(r=0.0), cache))
    assert never.cached  # the edit reused the Invert tab's inversion
    assert np.array_equal(pixels(never.edited.image), pixels(inv.reconstruction.image))
    full = run_to_end(text_edit(tiny_model, img, _edit(r=1.0), cache))
    half = run_to_end(text_edit(tiny_model, img, _edit(r=0.5), cache))
    d_full = np.abs(pixels(full.edited.image) - pixels(inv.reconstruction.image)).mean()
    d_half = np.abs(pixels(half.edited.image) - pixels(inv.reconstruction.image)).mean()
    assert d_full > 0 and d_half > 0
    assert full.params["r"] == 1.0 and full.params["source_steps"] == 0 and half.params["source_steps"] == 3
    assert full.edited.image.info["parameters"]  # metadata travels with the PNG


@pytest.mark.slow
def test_p2p_edit_restores_processors_and_keeps_the_source_branch(tiny_model):
    unet = tiny_model.unet
    before = dict(unet.attn_processors)
    img = _image(tiny_model, 1)
    cache = LRUCache(4)
    res = run_to_end(text_edit(tiny_model, img, _edit(method="p2p", p2p=p2p.P2PSettings(
        cross_replace_steps=1.0, self_replace_steps=0.5)), cache))
    assert {k: type(v) for k, v in unet.attn_processors.items()} == {k: type(v) for k, v in before.items()}
    assert all(unet.attn_processors[k] is v for k, v in before.items())
    inv = run_to_end(invert_and_reconstruct(tiny_model, img, InversionParams(
        "a red circle on the left", STEPS, guidance=7.5, method="nti", inner_steps=2), cache))
    # The source branch is the reconstruction (up to batching), the target branch is edited.
    src_diff = np.abs(pixels(res.reconstruction) - pixels(inv.reconstruction.image)).mean()
    tgt_diff = np.abs(pixels(res.edited.image) - pixels(inv.reconstruction.image)).mean()
    assert src_diff < 0.5 < tgt_diff
    assert res.params["p2p_mode"] == "replace" and res.params["cross_replace_steps"] == 1.0


@pytest.mark.slow
def test_p2p_local_blend_pastes_the_input_back_outside_its_region(tiny_model):
    img = _image(tiny_model, 2)
    cache = LRUCache(4)
    # the random model's maps are nearly flat, hence the high threshold (a region that is neither empty nor all)
    blend = p2p.P2PSettings(blend_words=("red", "blue"), blend_threshold=0.94)
    kept = run_to_end(text_edit(tiny_model, img, _edit(method="p2p", p2p=blend), cache))
    plain = run_to_end(text_edit(tiny_model, img,
                                 _edit(method="p2p", p2p=replace(blend, keep_background=False)), cache))
    f = tiny_model.vae_factor
    cells = np.asarray(kept.mask)[::f, ::f] > 127
    assert 0 < cells.sum() < cells.size
    region = masks.cells_to_image(masks.grow_cells(cells), f)  # edited, grown one cell
    ramp = masks.grow_cells(region, f) & ~region                 # then f pixels of feathered seam
    outside = ~(region | ramp)
    assert outside.any() and ramp.any()
    src, out, dec = pixels(kept.source), pixels(kept.edited.image), pixels(plain.edited.image)
    assert np.array_equal(out[outside], src[outside])          # outside: the input, bit for bit
    assert np.array_equal(out[region], dec[region])            # inside: the plain decode of the edit
    lo, hi = np.minimum(src, dec)[ramp], np.maximum(src, dec)[ramp]
    assert ((out[ramp] >= lo) & (out[ramp] <= hi)).all()       # the seam lies between the two
    assert np.abs(dec[outside] - src[outside]).mean() > 1     # the decode alone would not have kept the outside
    assert kept.params["keep_background"] and not plain.params["keep_background"]
    # no local blend: nothing to paste, the plain decode
    none = run_to_end(text_edit(tiny_model, img, _edit(method="p2p"), cache))
    assert none.mask is None and not none.params["keep_background"]


def test_p2p_processors_restored_on_cancel_and_error(tiny_model, monkeypatch):
    unet = tiny_model.unet
    before = dict(unet.attn_processors)
    token = CancelToken()
    job = text_edit(tiny_model, _image(tiny_model, 2), _edit(method="p2p", inversion="npi"), cancel=token)
    with pytest.raises(Cancelled):
        for ev in job:
            if ev.stage.startswith("editing"):
                token.cancel()
    assert all(unet.attn_processors[k] is v for k, v in before.items())

    def boom(self, x, index):
        raise RuntimeError("blend failed")

    monkeypatch.setattr(p2p.AttentionController, "after_step", boom)
    with pytest.raises(RuntimeError, match="blend failed"):
        run_to_end(text_edit(tiny_model, _image(tiny_model, 2), _edit(method="p2p", inversion="npi")))
    assert all(unet.attn_processors[k] is v for k, v in before.items())


@pytest.mark.parametrize("kw, message", [
    (dict(source_prompt=""), "Please enter a source prompt"),
    (dict(target_prompt="  "), "Please enter a target prompt"),
    (dict(target_prompt="a red circle on the left"), "identical"),
    (dict(method="p2p", target_prompt="a big blue circle on the left"), "words"),
    (dict(r=1.5), "Threshold r must be between"),
    (dict(method="morph"), "Unknown edit method"),
    (dict(inversion="magic"), "Unknown inversion method"),
])
def test_bad_edit_inputs_give_clear_messages(tiny_model, kw, message):
    with pytest.raises(InputError, match=message):
        run_to_end(text_edit(tiny_model, _image(tiny_model), _edit(**kw)))


@pytest.mark.slow
def test_real_interpolation_endpoints_reconstruct_each_image(tiny_model, tmp_path):
    a, b = _image(tiny_model, 3), _image(tiny_model, 4, size=(48, 80))  # any sizes: B is resized to A's
    p = RealInterpolationParams("a red circle", "a blue square", steps=STEPS, guidance=7.5, inversion="nti",
                                inner_steps=2)
    cache = LRUCache(4)
    seq = run_to_end(real_interpolation_sequence(tiny_model, a, b, p, 3, cache, gif_dir=tmp_path))
    assert len(seq.frames) == 3 and all(f.size == a.size for f in seq.frames)
    assert seq.gif_path and seq.mp4_path and seq.istd == pytest.approx(istd(seq.frames))
    # Frame at eta=0 / eta=1 equals a single-frame render there, from the cached dual inversion.
    end = run_to_end(real_interpolation_frame(tiny_model, a, b, p, 1.0, cache))
    assert np.array_equal(pixels(end.image), pixels(seq.frames[-1]))
    assert end.params["inversion"] == "nti" and end.params["interpolation_eta"] == 1.0
    # Each endpoint reconstructs its own image (vs its VAE round trip: the tiny VAE is random), not the other.
    from pipelines.core.latents import decode_to_pil, encode_image
    from pipelines.core.metrics import psnr
    from pipelines.inversion import prepare_image

    vae_a, vae_b = (decode_to_pil(tiny_model, encode_image(tiny_model, prepare_image(tiny_model, x, a.size)))
                    for x in (a, b))
    assert psnr(vae_a, seq.frames[0]) > 25 and psnr(vae_b, seq.frames[-1]) > 25
    assert psnr(vae_a, seq.frames[0]) > psnr(vae_b, seq.frames[0]) + 5


def test_real_interpolation_bad_inputs(tiny_model):
    a = _image(tiny_model)
    p = RealInterpolationParams("", steps=2)
    with pytest.raises(InputError, match="prompt for image A"):
        run_to_end(real_interpolation_frame(tiny_model, a, a, p, 0.5))
    with pytest.raises(InputError, match="Interpolation ratio"):
        run_to_end(real_interpolation_frame(tiny_model, a, a, replace(p, prompt_a="x"), 2.0))
    with pytest.raises(InputError, match="not an image I can read"):
        run_to_end(real_interpolation_frame(tiny_model, a, b"junk", replace(p, prompt_a="x"), 0.5))
