"""DragDiffusion (the pipelines/drag package) on private copies of the tiny model: the point functions on
synthetic feature maps, input checks, and whole drags, after which (finished, cancelled or closed) the UNet must
be exactly the module it was: same outputs bit for bit, same attention processors, no peft adapter or wrapper,
no parameter requiring grad. Also the per-image caches and the generated-image trajectory."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image
from safetensors.torch import save_file

from pipelines.core.cache import LRUCache
from pipelines.core.errors import InputError
from pipelines.core.events import Cancelled, CancelToken, run_to_end
from pipelines.core.lora import load_lora
from pipelines.drag import DragParams, DragSettings, check_points, drag, draw_points, prepare_drag_mask, validate_drag
from pipelines.drag.points import motion_supervision, reached, sample_patch, to_feature, to_image, track_points
from pipelines.drag.unet import (
    MutualAttnProcessor,
    feature_block_index,
    mutual_layer_start,
    mutual_self_attention,
    self_attention_layers,
)
from pipelines.drag.warp import displacement_field, warp_region
from pipelines.generate import GenerateParams, generate
from tests.helpers import forward_calls, pixels

FAST = dict(lora_steps=2, drag_iterations=3, steps=8, prompt="a red square")


@pytest.fixture(scope="module")
def model(_studio_cache):
    """A private tiny model: drags attach (and must remove) adapters and processors on its UNet."""
    from pipelines.core.models import load_model

    return run_to_end(load_model("tiny-random"))


@pytest.fixture(scope="module")
def image():
    rng = np.random.RandomState(0)
    arr = np.full((64, 64, 3), 40, np.uint8)
    arr[20:36, 14:30] = (220, 40, 40)
    return Image.fromarray(np.clip(arr + rng.randint(0, 20, arr.shape), 0, 255).astype(np.uint8))


def snapshot(unet):
    """Everything a drag may touch, for exact comparison."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4, 16, 16, generator=g)
    cond = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        out = unet(x, 400, encoder_hidden_states=cond).sample
    return {
        "out": out,
        "procs": {k: (type(v), id(v)) for k, v in unet.attn_processors.items()},
        "modules": [(n, type(m)) for n, m in unet.named_modules()],
        "grads": {n: p.requires_grad for n, p in unet.named_parameters()},
        "adapters": sorted(getattr(unet, "peft_config", None) or {}),
        "training": unet.training,
        "hooks": sum(len(m._forward_hooks) for m in unet.modules()),
    }


def assert_restored(unet, before):
    after = snapshot(unet)
    assert torch.equal(after["out"], before["out"])  # bit for bit
    assert after["procs"] == before["procs"]
    assert after["modules"] == before["modules"]
    assert after["grads"] == before["grads"]
    assert after["adapters"] == before["adapters"]
    assert after["training"] == before["training"] and after["hooks"] == before["hooks"]


# ------------------------------------------------------------------------------------------- points

def test_check_points_rejects_unpaired_outside_and_empty():
    assert check_points([(1, 2)], [(3.5, 4)], (64, 48)) == ([(1.0, 2.0)], [(3.5, 4.0)])
    cases = [
        (([], []), "No points"),
        (([(1, 2), (3, 4)], [(5, 6)]), "every handle needs exactly one target"),
        (([(1, 2)], []), "every handle needs exactly one target"),
        (([(64, 2)], [(5, 6)]), "outside the 64x48 image"),
        (([(1, 2)], [(5, 48)]), "Target point 1 at (5, 48) is outside"),
        (([(-1, 2)], [(5, 6)]), "outside"),
        (([("a", 2)], [(5, 6)]), "not an (x, y) pair"),
        (([(1, 2, 3)], [(5, 6)]), "not an (x, y) pair"),
        (([(float("nan"), 2)], [(5, 6)]), "not a number"),
    ]
    for (h, t), text in cases:
        with pytest.raises(InputError, match=text.replace("(", r"\(").replace(")", r"\)")):
            check_points(h, t, (64, 48))


def test_feature_coordinates_round_trip_and_clamp():
    for p in [(0, 0), (10, 30), (63, 63)]:
        f = to_feature(p, (64, 64), (32, 32))
        assert to_feature(to_image(f, (64, 64), (32, 32)), (64, 64), (32, 32)) == f
    assert to_feature((10, 30), (64, 64), (32, 32)) == (15, 5)   # (row, col)
    assert to_feature((63.9, 63.9), (64, 64), (32, 32)) == (31, 31)


def test_tracking_follows_a_known_shift():
    """f1 is f0 moved by (+2 rows, -3 cols): each handle is found at its old position plus that shift."""
    g = torch.Generator().manual_seed(0)
    f0 = torch.randn(1, 16, 32, 32, generator=g)
    f1 = torch.roll(f0, shifts=(2, -3), dims=(2, 3))
    initial = [(10, 12), (20, 25), (5, 6)]
    assert track_points(f0, f1, initial, initial, r2=3) == [(12, 9), (22, 22), (7, 3)]
    # a shift beyond r2 is out of reach in one step: the best match stays inside the window
    far = torch.roll(f0, shifts=(0, 6), dims=(2, 3))
    (r, c), = track_points(f0, far, [(10, 12)], [(10, 12)], r2=3)
    assert abs(r - 10) <= 3 and abs(c - 12) <= 3
    # tracking compares with the ORIGINAL feature at the INITIAL point, from wherever the handle is now
    assert track_points(f0, f1, [(10, 12)], [(11, 10)], r2=3) == [(12, 9)]
    # at the border the window is clipped, not wrapped
    assert track_points(f0, f0, [(0, 31)], [(0, 31)], r2=3) == [(0, 31)]


def test_motion_supervision_pulls_features_one_step_towards_the_target():
    # features = column index: moving the patch one column right changes each value by exactly 1
    cols = torch.arange(32, dtype=torch.float32).expand(1, 2, 32, 32).clone().requires_grad_(True)
    loss = motion_supervision(cols, [(10, 10)], [(10, 20)], r1=1)
    assert loss.item() == pytest.approx(9.0)              # (2 r1 + 1)^2 * mean |1|
    loss.backward()
    grad = cols.grad[0, 0]
    assert grad[9:12, 9].abs().sum() == 0 and grad[:, 13:].abs().sum() == 0  # the fixed patch is stop-gradient
    assert (grad[9:12, 12] != 0).all()                                       # the shifted one is pulled
    assert motion_supervision(cols, [(10, 10)], [(10, 11)], r1=1) is None   # within 2 px: nothing to do
    assert reached([(10, 10)], [(11, 11)]) and not reached([(10, 10)], [(10, 12)])
    f = torch.randn(1, 3, 8, 8)
    patch = sample_patch(f, torch.arange(2, 5, dtype=torch.float32), torch.arange(1, 4, dtype=torch.float32))
    assert torch.allclose(patch, f[:, :, 2:5, 1:4], atol=1e-6)


def test_draw_points_colours_and_leaves_the_input_alone(image):
    before = pixels(image).copy()
    out = pixels(draw_points(image, [(10, 10)], [(50, 50)]))
    assert out.shape == before.shape and np.array_equal(pixels(image), before)
    r, g, b = out[10, 10]
    assert r > 200 and g < 80 and b < 80          # red handle
    r, g, b = out[50, 50]
    assert b > 200 and r < 80                      # blue target
    assert (out[30, 30] > 200).all()               # white arrow between them
    now = pixels(draw_points(image, [(10, 10)], [(50, 50)], current=[(30, 30)]))
    assert now[30, 30][0] > 200 and now[30, 30][2] < 80   # the current handle, filled red


@pytest.mark.parametrize("background", [0, 255])
def test_the_arrow_shows_on_black_and_on_white(background):
    """Along the handle-to-target line, pixels far from the background's brightness, whatever it is."""
    plain = Image.new("RGB", (64, 64), (background,) * 3)
    out = pixels(draw_points(plain, [(10, 32)], [(54, 32)])).astype(int)
    lum = out.mean(-1)
    between = lum[28:37, 20:44]   # the shaft, away from the points at its ends
    assert (np.abs(between - background) > 150).sum(0).min() >= 1   # every column of the shaft crosses a contrast
    assert (np.abs(lum - background) > 150).sum() > 30


# ------------------------------------------------------------------------------------------- UNet helpers

def test_layer_and_block_mapping(model):
    names = self_attention_layers(model.unet)
    assert names[0].startswith("down_blocks.0") and names[2].startswith("mid_block")
    starts = [mutual_layer_start(16, 10), mutual_layer_start(7, 10), mutual_layer_start(7, 0),
              mutual_layer_start(7, 40)]
    assert starts == [10, 4, 0, 6]
    assert feature_block_index(model.unet, 2) == 0 and feature_block_index(model.unet, 3) == 1
    assert feature_block_index(model.unet, 0) == 0


def test_mutual_attention_uses_the_reference_keys_and_is_removed(model):
    unet = model.unet
    before = snapshot(unet)
    g = torch.Generator().manual_seed(3)
    a = torch.randn(1, 4, 16, 16, generator=g)
    cond = torch.randn(1, 77, 32, generator=g).expand(2, -1, -1)
    with torch.no_grad():
        alone = unet(a, 300, encoder_hidden_states=cond[:1]).sample
        with mutual_self_attention(unet, 0, 0) as (ctl, layers):
            assert len(layers) == len(self_attention_layers(unet))
            assert all(isinstance(unet.attn_processors[n], MutualAttnProcessor) for n in layers)
            pair = unet(torch.cat([a, a]), 300, encoder_hidden_states=cond).sample
            other = unet(torch.cat([a, torch.randn(1, 4, 16, 16, generator=g)]), 300, encoder_hidden_states=cond).sample
            ctl.step = -1  # before the start step: plain attention
            plain = unet(torch.cat([a, a * 0.5]), 300, encoder_hidden_states=cond).sample
    assert torch.allclose(pair[0], alone[0], atol=1e-5) and torch.allclose(pair[1], alone[0], atol=1e-5)
    assert torch.allclose(other[0], alone[0], atol=1e-5)   # the reference item never sees the edited one
    with torch.no_grad():
        half = unet(a * 0.5, 300, encoder_hidden_states=cond[:1]).sample
    assert torch.allclose(plain[1], half[0], atol=1e-5)
    assert_restored(unet, before)


# ------------------------------------------------------------------------------------------- inputs

def test_masks():
    assert prepare_drag_mask(None, (64, 64), 4) is None
    assert prepare_drag_mask(np.zeros((64, 64), bool), (64, 64), 4) is None      # empty: whole image
    assert prepare_drag_mask(np.ones((32, 32), np.uint8), (64, 64), 4) is None   # all: nothing to keep
    m = np.zeros((128, 128), np.uint8)
    m[0:32, 0:32] = 255                                                          # any size: resized
    img_mask, keep = prepare_drag_mask(Image.fromarray(m), (64, 64), 4)
    assert img_mask.shape == (64, 64) and img_mask[:16, :16].all() and not img_mask[16:].any()
    assert keep.shape == (1, 1, 16, 16) and keep[0, 0, :4, :4].sum() == 0 and keep[0, 0, 4:].min() == 1
    with pytest.raises(InputError, match="mask"):
        prepare_drag_mask("not a mask", (64, 64), 4)


def test_bad_inputs_fail_before_any_unet_call(model, image):
    bad = [
        (dict(handles=[(10, 10)], targets=[]), "every handle needs exactly one target"),
        (dict(handles=[(10, 10)], targets=[(70, 10)]), "outside the 64x64 image"),
        (dict(handles=[], targets=[]), "No points"),
        (dict(handles=[(1, 1)], targets=[(5, 5)], lora_rank=0), "LoRA rank"),
        (dict(handles=[(1, 1)], targets=[(5, 5)], inversion_strength=0.01), "inverts no step"),
        (dict(handles=[(1, 1)], targets=[(5, 5)], feature_block=5), "Feature block"),
        (dict(handles=[(1, 1)], targets=[(5, 5)], r2=0), "r2"),
        (dict(handles=[(1, 1)], targets=[(5, 5)], smooth_lora=True), "Smooth LoRA is not loaded"),
    ]
    with forward_calls(model.unet) as calls:
        for kw, text in bad:
            with pytest.raises(InputError, match=text):
                next(drag(model, image, DragParams(**kw)))
        with pytest.raises(InputError, match="No image"):
            next(drag(model, None, DragParams([(1, 1)], [(5, 5)])))
    assert not calls


def test_validated_settings_are_typed_and_frozen(model):
    s = validate_drag(model, DragParams([(1, 1)], [(5, 5)], prompt="  a cat ", lora_steps=4.0, r1="2", seed=-1,
                                        warm_start=1))
    assert isinstance(s, DragSettings)
    assert (s.prompt, s.lora_steps, s.r1, s.warm_start) == ("a cat", 4, 2, True)
    assert type(s.lora_steps) is int and type(s.r1) is int and 0 <= s.seed < 2**32
    with pytest.raises(AttributeError):
        s.steps = 3   # frozen: the job cannot change what it validated


def test_warm_start_carries_the_region_along_the_drag():
    # one pair: the whole field is its vector, in latent pixels (image px x 1/4)
    field = displacement_field([(10.0, 20.0)], [(18.0, 12.0)], (16, 16), 0.25)
    assert torch.allclose(field[0], torch.full((16, 16), 2.0)) and torch.allclose(field[1], torch.full((16, 16), -2.0))
    # two pairs: each dominates near its own target
    field = displacement_field([(4.0, 4.0), (50.0, 50.0)], [(12.0, 4.0), (50.0, 42.0)], (16, 16), 0.25)
    assert torch.allclose(field[:, 1, 3], torch.tensor([2.0, 0.0]), atol=0.02)
    assert torch.allclose(field[:, 10, 12], torch.tensor([0.0, -2.0]), atol=0.02)
    # a blob in the editable region moves by whole latent pixels exactly; outside the region nothing changes
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    z[:, :, 4:7, 3:6] = 5.0
    editable = torch.zeros(1, 1, 16, 16)
    editable[:, :, 2:10, 2:12] = 1
    out = warp_region(z, displacement_field([(18.0, 22.0)], [(30.0, 22.0)], (16, 16), 0.25), editable)
    assert torch.allclose(out[:, :, 4:7, 6:9], torch.full((1, 4, 3, 3), 5.0), atol=1e-5)  # arrived 3 px right
    assert (out[:, :, 4:7, 3:6] != 5.0).all()                                       # and left its old place
    assert torch.allclose(out[:, :, 4:7, 3:5], z[:, :, 4:7, 0:2], atol=1e-5)          # filled from behind (x - d)
    assert torch.equal(out * (1 - editable), z * (1 - editable))


@pytest.mark.slow
def test_warm_start_drag_starts_from_the_carried_latent(model, image):
    mask = np.zeros((64, 64), bool)
    mask[14:42, 10:52] = True
    p = DragParams([(22, 28)], [(38, 28)], **{**FAST, "drag_iterations": 1})
    cache = LRUCache(8)
    plain = run_to_end(drag(model, image, p, mask, cache))
    warm = run_to_end(drag(model, image, DragParams(**{**p.__dict__, "warm_start": True}), mask, cache))
    assert warm.params["warm_start"] is True and plain.params["warm_start"] is False
    assert warm.cached["lora"] and warm.cached["inversion"]              # same LoRA and inversion underneath
    assert not np.array_equal(pixels(warm.image.image), pixels(plain.image.image))
    # tracking starts at the target: one iteration leaves the handle near it, not near where it started
    (x, y), = warm.handles
    assert abs(x - 38) <= p.r2 + 1 and abs(y - 28) <= p.r2 + 1
    # with nothing painted there is no region to carry: skipped, and said so
    events = list(drag(model, image, DragParams(**{**p.__dict__, "warm_start": True}), None, cache))
    assert "warm start skipped" in events[0].message and events[-1].result.params["warm_start"] is False


# ------------------------------------------------------------------------------------------- whole drags

@pytest.mark.slow
def test_drag_streams_restores_the_unet_and_caches_per_image(model, image):
    unet = model.unet
    before = snapshot(unet)
    cache = LRUCache(8)
    p = DragParams([(22, 28)], [(34, 28)], **FAST)
    events = list(drag(model, image, p, cache=cache))
    stages = [e.stage for e in events]
    assert stages.count("training LoRA") == 2 and stages.count("inverting") == 6  # round(0.7 x 8)
    assert 1 <= stages.count("dragging") <= 3 and stages.count("denoising") == 6
    assert "whole image is editable" in events[0].message
    steps = [e.step for e in events]
    assert steps == sorted(steps) and events[-1].step == events[-1].total
    dragging = [e for e in events if e.stage == "dragging"]
    assert all(len(e.partial) == 1 and len(e.partial[0]) == 2 for e in dragging)
    assert dragging[-1].preview is not None and dragging[-1].preview.size == (64, 64)
    # every stage's previews are full decodes at the image's size (the linear preview is the 16x16 latent's)
    previews = [e.preview.size for e in events if e.stage in ("inverting", "denoising") and e.preview is not None]
    assert previews and set(previews) == {(64, 64)}
    r = events[-1].result
    assert r.image.image.size == (64, 64) and r.source.size == (64, 64)
    assert len(r.handles) == 1 and r.targets == [(34.0, 28.0)]
    assert set(r.timings) >= {"lora", "inversion", "drag", "denoise"} and all(v >= 0 for v in r.timings.values())
    assert r.cached == {"lora": False, "inversion": False, "trajectory": False}
    assert len(r.lora_losses) == 2 and r.params["task"] == "drag" and r.params["start_timestep"] > 0
    assert r.image.image.info["studio"]  # PNG metadata
    assert_restored(unet, before)

    again = list(drag(model, image, p, cache=cache))
    r2 = again[-1].result
    assert r2.cached == {"lora": True, "inversion": True, "trajectory": False}
    assert "training LoRA" not in [e.stage for e in again] and "inverting" not in [e.stage for e in again]
    assert np.array_equal(pixels(r2.image.image), pixels(r.image.image))  # cached LoRA = the trained one
    assert r2.handles == r.handles
    assert_restored(unet, before)

    # without any cache the same seed trains the same LoRA (peft's random init is seeded, the global RNG untouched)
    rng = torch.get_rng_state()
    fresh = run_to_end(drag(model, image, p))
    assert torch.equal(torch.get_rng_state(), rng)
    assert np.array_equal(pixels(fresh.image.image), pixels(r.image.image)) and fresh.lora_losses == r.lora_losses

    # other LoRA settings: trained anew; a mask turns the keep term on
    mask = np.zeros((64, 64), bool)
    mask[10:45, 10:50] = True
    r3 = run_to_end(drag(model, image, DragParams([(22, 28)], [(34, 28)], **{**FAST, "lora_steps": 1}), mask, cache))
    assert r3.cached["lora"] is False and r3.params["masked"] is True
    assert_restored(unet, before)


@pytest.mark.parametrize("stage", ["training LoRA", "inverting", "dragging", "denoising"])
def test_cancelled_drag_restores_the_unet(model, image, stage):
    unet = model.unet
    before = snapshot(unet)
    token = CancelToken()
    job = drag(model, image, DragParams([(22, 28)], [(40, 28)], **FAST), cancel=token)
    seen = None
    for ev in job:
        if ev.stage == stage:
            seen = ev
            if stage == "denoising":  # the mutual attention processors are in place right now
                assert any(isinstance(p, MutualAttnProcessor) for p in unet.attn_processors.values())
            assert "drag_image" in unet.peft_config
            token.cancel()
            break
    assert seen is not None
    with forward_calls(unet) as calls, pytest.raises(Cancelled):
        next(job)
    assert not calls  # the token is checked before the next UNet call
    assert_restored(unet, before)


def test_closing_the_job_midway_restores_the_unet(model, image):
    """A UI that stops iterating (GeneratorExit) must leave the UNet as clean as a cancel does."""
    before = snapshot(model.unet)
    job = drag(model, image, DragParams([(22, 28)], [(40, 28)], **FAST))
    for ev in job:
        if ev.stage == "denoising":
            break
    job.close()
    assert_restored(model.unet, before)


@pytest.mark.slow
def test_generated_image_keeps_its_trajectory(model):
    """Dragging an image generated with `trajectories=cache` starts from its own latents: no LoRA, no inversion;
    with the handle already at the target the result is the generated image itself."""
    before = snapshot(model.unet)
    cache = LRUCache(8)
    gen = run_to_end(generate(model, GenerateParams("a blue circle", seed=3, steps=10, guidance=5.0),
                              trajectories=cache))
    img = gen.image
    plain = run_to_end(generate(model, GenerateParams("a blue circle", seed=3, steps=10, guidance=5.0)))
    assert np.array_equal(pixels(plain.image), pixels(img)) and plain.params == gen.params  # recording changes nothing
    with forward_calls(model.unet) as calls:
        events = list(drag(model, img, DragParams([(30, 30)], [(30, 30)], lora_steps=5), cache=cache))
    r = events[-1].result
    assert r.cached == {"lora": False, "inversion": False, "trajectory": True}
    assert not {"training LoRA", "inverting"} & {e.stage for e in events}
    assert r.params["start"] == "trajectory" and r.params["steps"] == 10 and r.params["iterations_run"] == 0
    assert r.params["prompt"] == "a blue circle" and r.params["guidance"] == 5.0
    assert len(calls) == 7   # round(0.7 x 10) denoising steps, nothing else
    assert np.abs(pixels(r.image.image) - pixels(img)).max() <= 2
    # a real drag from the trajectory (guided features, concatenated as the reference's generated mode)
    moved = run_to_end(drag(model, img, DragParams([(30, 30)], [(42, 30)], drag_iterations=2), cache=cache))
    assert moved.cached["trajectory"] and moved.params["iterations_run"] == 2
    # the same pixels without that cache: a real image, inverted
    other = run_to_end(drag(model, img, DragParams([(30, 30)], [(30, 30)], **{**FAST, "lora_steps": 0})))
    assert other.cached["trajectory"] is False and other.params["start"] == "inversion"
    assert_restored(model.unet, before)


def _peft_lora_file(unet, path, rank=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in unet.attn_processors:
        module = name.rsplit(".processor", 1)[0]
        attn = unet.get_submodule(module)
        for proj, lin in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v), ("to_out.0", attn.to_out[0])):
            sd[f"unet.{module}.{proj}.lora_A.weight"] = torch.randn(rank, lin.in_features, generator=g) * 0.5
            sd[f"unet.{module}.{proj}.lora_B.weight"] = torch.randn(lin.out_features, rank, generator=g) * 0.5
    save_file(sd, str(path))
    return path


@pytest.mark.slow
def test_smooth_lora_is_used_during_the_drag_and_stays_loaded_and_off(image, tmp_path):
    from pipelines.core.models import load_model

    model = run_to_end(load_model("tiny-random"))
    load_lora(model, str(_peft_lora_file(model.unet, tmp_path / "smooth.safetensors")), "smooth")
    before = snapshot(model.unet)
    assert before["adapters"] == ["smooth"]
    wrapped = [n for n, m in model.unet.named_modules() if isinstance(m, BaseTunerLayer)]
    p = DragParams([(22, 28)], [(34, 28)], **FAST)
    plain = run_to_end(drag(model, image, p))
    assert_restored(model.unet, before)
    smooth = run_to_end(drag(model, image, DragParams([(22, 28)], [(34, 28)], **{**FAST, "smooth_lora": True})))
    assert smooth.params["smooth_lora"] is True
    assert not np.array_equal(pixels(smooth.image.image), pixels(plain.image.image))
    assert_restored(model.unet, before)
    assert [n for n, m in model.unet.named_modules() if isinstance(m, BaseTunerLayer)] == wrapped
    assert all(m.disable_adapters for m in model.unet.modules() if isinstance(m, BaseTunerLayer))
