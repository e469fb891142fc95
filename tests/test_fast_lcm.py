"""Fast mode (pipelines/fast.py): LCM-LoRA with LCMScheduler for text to image and SDEdit, on a private tiny model
with a random LoRA of the LCM-LoRA SD1.5 layout (the modules diffusers' train_lcm_distill_lora_sd_wds.py targets),
saved in diffusers' LoRA format. Offline: the Hub id path is exercised with the Hub download pointed at the file."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipelines import fast
from pipelines.core.errors import InputError
from pipelines.core.events import Cancelled, CancelToken, run_to_end
from pipelines.core.metadata import read_metadata, save_png
from pipelines.core.models import EMBEDDED_ID
from pipelines.core.peft_state import tuner_layers
from pipelines.generate import GenerateParams, generate
from pipelines.sdedit import SDEditParams, sdedit
from tests.helpers import pixels
from tests.test_lora import make_peft_lora

# diffusers' train_lcm_distill_lora_sd_wds.py default lora_target_modules (the LCM-LoRA SD1.5 layout)
LCM_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
               "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
PROMPT = "a red circle"


def make_lcm_lora(unet, folder: Path, rank: int = 4, seed: int = 0) -> Path:
    """A peft LoRA over LCM_TARGETS with random non-zero weights, written by StableDiffusionPipeline.save_lora_weights
    (diffusers' format: pytorch_lora_weights.safetensors with unet.<module>.lora_A/lora_B keys)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(seed)
    student = UNet2DConditionModel.from_config(unet.config)
    student.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LCM_TARGETS, init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(student),
                                              safe_serialization=True)
    return folder / fast.LCM_LORA_FILE


@pytest.fixture(scope="module")
def model(_studio_cache):
    """A private tiny model: these tests attach the LCM adapter to its UNet."""
    from pipelines.core.models import load_model

    return run_to_end(load_model("tiny-random"))


@pytest.fixture(scope="module")
def probe(model):
    g = torch.Generator().manual_seed(5)
    x, cond = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)

    @torch.no_grad()
    def run():
        return model.unet(x, 500, encoder_hidden_states=cond).sample

    return run


@pytest.fixture(scope="module")
def base_out(model, probe):
    return probe()  # before any adapter is attached


@pytest.fixture(scope="module")
def lcm_dir(model, base_out, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lcm_lora")
    make_lcm_lora(model.unet, folder)
    return folder


@pytest.fixture
def lcm(lcm_dir, monkeypatch):
    monkeypatch.setenv(fast.LCM_ENV, str(lcm_dir))
    return lcm_dir


def gen(model, seed=7, **kw):
    p = GenerateParams(PROMPT, seed=seed, fast=True, **{"steps": 4, "guidance": 1.0, **kw})
    return run_to_end(generate(model, p))


def assert_restored(model, probe, base_out, config_before):
    """No adapter active (every peft layer disabled), the UNet computes its base output exactly, and the model's
    scheduler is the one it had."""
    layers = tuner_layers(model.unet)
    assert layers and all(layer.disable_adapters for layer in layers.values())
    assert torch.equal(probe(), base_out)
    assert dict(model.pipe.scheduler.config) == config_before
    assert type(model.pipe.scheduler).__name__ == "DDIMScheduler"


@pytest.fixture
def timesteps(model):
    """The timestep of every UNet call while the test runs."""
    seen = []
    handle = model.unet.register_forward_pre_hook(lambda mod, args: seen.append(int(args[1])))
    yield seen
    handle.remove()


# ------------------------------------------------------------------------------------------ the LoRA and loading
def test_the_test_lora_has_the_lcm_lora_layout(lcm_dir):
    from safetensors.torch import load_file

    keys = load_file(str(lcm_dir / fast.LCM_LORA_FILE))
    modules = {k.rsplit(".lora_", 1)[0] for k in keys}
    assert all(k.startswith("unet.") for k in keys)
    for kind in ("attn1.to_q", "attn2.to_k", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                 "resnets.0.conv1", "resnets.0.conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
                 "time_emb_proj"):
        assert any(m.endswith(kind) for m in modules), kind
    assert not any("conv_in" in m or "conv_out" in m or "time_embedding" in m for m in modules)
    assert all(v.abs().sum() > 0 for v in keys.values())


def test_folder_and_hub_id_load_the_same_adapter(model, lcm_dir, monkeypatch):
    import huggingface_hub

    asked = []

    def from_cache(repo, filename, **kw):  # the Hub download, offline: the same file from "the cache"
        asked.append((repo, filename))
        return str(lcm_dir / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", from_cache)
    monkeypatch.setattr(fast, "_files", {})
    file = lcm_dir / fast.LCM_LORA_FILE
    assert fast.lcm_lora_file(str(lcm_dir)) == file == fast.lcm_lora_file(fast.LCM_LORA_REPO)
    assert asked == [(fast.LCM_LORA_REPO, fast.LCM_LORA_FILE)]
    monkeypatch.delenv(fast.LCM_ENV, raising=False)
    assert fast.lcm_lora_source() == f"{fast.LCM_LORA_REPO}:{fast.LCM_LORA_FILE}"
    h = fast.ensure_lcm_lora(model)  # the default source: the Hub id
    assert model.loras[fast.LCM_ADAPTER] == str(file) and len(h) == 12
    assert fast.ensure_lcm_lora(model, str(lcm_dir)) == h  # the folder: already loaded, same file
    from safetensors.torch import load_file

    assert len(tuner_layers(model.unet)) == len({k.rsplit(".lora_", 1)[0] for k in load_file(str(file))})


def test_missing_sources_are_clear_and_load_nothing(model, tmp_path, monkeypatch):
    before = dict(model.loras)
    monkeypatch.setattr(fast, "_files", {})
    with pytest.raises(InputError, match="not in this machine's Hugging Face cache.*STUDIO_LCM_LORA"):
        fast.ensure_lcm_lora(model, "studio-tests/no-such-lcm-lora")
    with pytest.raises(InputError, match="was not found"):
        fast.ensure_lcm_lora(model, str(tmp_path / "nothing.safetensors"))
    with pytest.raises(InputError, match="no .safetensors"):
        fast.ensure_lcm_lora(model, str(tmp_path))
    (tmp_path / "lcm.bin").write_bytes(b"not a pickle we would ever open")
    with pytest.raises(InputError, match="Only a .safetensors"):
        fast.ensure_lcm_lora(model, str(tmp_path / "lcm.bin"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x08" + b"\0" * 7 + b"{}garbage")
    with pytest.raises(InputError, match="could not load its LCM-LoRA"):
        fast.ensure_lcm_lora(model, str(tmp_path / "broken.safetensors"))
    assert model.loras == before
    assert set(getattr(model.unet, "peft_config", None) or {}) == set(before)


def test_settings_are_checked_and_the_embedded_model_refused():
    tiny = SimpleNamespace(id="tiny-random")
    assert fast.check_fast(tiny, 4, 1.0) == (4, 1.0)
    with pytest.raises(InputError, match="1 to 8 steps"):
        fast.check_fast(tiny, 9, 1.0)
    with pytest.raises(InputError, match="guidance 0 to 2"):
        fast.check_fast(tiny, 4, 2.5)
    with pytest.raises(InputError, match="embedded model has no LCM-LoRA.*Instruct tab"):
        fast.check_fast(SimpleNamespace(id=EMBEDDED_ID), 4, 1.0)
    with pytest.raises(InputError, match="embedded model"):
        fast.ensure_lcm_lora(SimpleNamespace(id=EMBEDDED_ID, loras={}))


# ------------------------------------------------------------------------------------------ text to image
def test_lcm_scheduler_timesteps(model):
    cfg = model.scheduler_config
    assert fast.lcm_scheduler(cfg, 4).timesteps.tolist() == [999, 759, 499, 259]
    assert fast.lcm_scheduler(cfg, 1).timesteps.tolist() == [999]
    assert fast.lcm_scheduler(cfg, 2).timesteps.tolist() == [999, 499]


def test_fast_generate_runs_the_lcm_timesteps_deterministically(model, lcm, probe, base_out, timesteps):
    config = dict(model.pipe.scheduler.config)
    first = gen(model, seed=7)
    assert timesteps == [999, 759, 499, 259]  # one UNet call per step: guidance 1 has no CFG
    again, other = gen(model, seed=7), gen(model, seed=8)
    assert np.array_equal(pixels(first.image), pixels(again.image))
    assert not np.array_equal(pixels(first.image), pixels(other.image))
    assert pixels(first.image).std() > 0
    assert first.params["sampler"] == "LCM" and first.params["fast"] is True and first.params["steps"] == 4
    assert_restored(model, probe, base_out, config)


def test_the_adapter_changes_the_output_against_scale_zero(model, lcm, monkeypatch):
    on = gen(model, seed=3)
    real = fast.adapters_active
    monkeypatch.setattr(fast, "adapters_active", lambda unet, w: real(unet, {k: 0.0 for k in w}))
    off = gen(model, seed=3)
    diff = np.abs(pixels(on.image) - pixels(off.image))
    assert diff.mean() > 3, diff.mean()  # about 4.4 grey levels on the tiny model (its VAE dominates the pixels)


def test_cfg_only_above_one(model, lcm, timesteps):
    plain, with_neg = gen(model, seed=4), gen(model, seed=4, negative_prompt="blue")
    assert np.array_equal(pixels(plain.image), pixels(with_neg.image))  # at guidance 1 the negative does nothing
    assert len(timesteps) == 8
    batches = []
    handle = model.unet.register_forward_pre_hook(lambda mod, args: batches.append(args[0].shape[0]))
    try:
        a, b = gen(model, seed=4, guidance=1.5), gen(model, seed=4, guidance=1.5, negative_prompt="blue")
    finally:
        handle.remove()
    assert batches == [2] * 8  # CFG: conditional and unconditional in one call
    assert not np.array_equal(pixels(a.image), pixels(b.image))


def test_fast_with_a_user_lora_and_batches(model, lcm, tmp_path):
    from pipelines.core.lora import load_lora, unload_lora
    from pipelines.generate import generate_batch

    plain = gen(model, seed=11)
    style = load_lora(model, str(make_peft_lora(model.unet, tmp_path / "style.safetensors")), "style")
    try:
        styled = gen(model, seed=11, lora=style, lora_strength=1.0)
        assert not np.array_equal(pixels(plain.image), pixels(styled.image))
        assert styled.params["lora"] == "style" and styled.params["lora_hashes"].startswith("lcm: ")
        events = list(generate_batch(model, GenerateParams(PROMPT, seed=11, steps=4, guidance=1.0, fast=True), 2))
        assert [r.seed for r in events[-1].partial] == [11, 12]
        assert np.array_equal(pixels(events[-1].partial[0].image), pixels(plain.image))
    finally:
        unload_lora(model, style)


@pytest.mark.parametrize("how", ["cancel", "error"])
def test_cancel_or_error_mid_run_restores_the_unet(model, lcm, probe, base_out, how):
    config = dict(model.pipe.scheduler.config)
    fast.ensure_lcm_lora(model)
    token, calls = CancelToken(), []

    def hook(mod, args):
        calls.append(1)
        if len(calls) == 2:
            if how == "cancel":
                token.cancel()
            else:
                raise RuntimeError("boom in the UNet")

    handle = model.unet.register_forward_pre_hook(hook)
    try:
        with pytest.raises(Cancelled if how == "cancel" else RuntimeError):
            run_to_end(generate(model, GenerateParams(PROMPT, seed=1, steps=4, guidance=1.0, fast=True), token))
    finally:
        handle.remove()
    assert len(calls) == 2
    assert_restored(model, probe, base_out, config)


def test_png_metadata_records_the_mode_and_round_trips(model, lcm, tmp_path):
    r = gen(model, seed=9)
    path = save_png(r.image, tmp_path / "fast.png")
    text = r.image.info["parameters"]
    assert "Sampler: LCM" in text and "Fast: True" in text and 'Lora hashes: "lcm: ' in text
    assert "Eta DDIM" not in text
    back = read_metadata(path)
    assert back["sampler"] == "LCM" and back["fast"] is True and back["steps"] == 4 and back["seed"] == 9
    from pipelines.core.metadata import parse_parameters

    a1111 = parse_parameters(text)  # the A1111 text alone (another tool's reader) keeps them too
    assert a1111["sampler"] == "LCM" and a1111["fast"] == "True" and a1111["lora_hashes"].startswith("lcm: ")


# ------------------------------------------------------------------------------------------ SDEdit
def guide_image():
    img = np.full((64, 64, 3), 255, np.uint8)
    img[16:48, 8:40] = (220, 30, 30)
    return img


def test_fast_sdedit_runs_int_steps_times_strength(model, lcm, probe, base_out, timesteps):
    config = dict(model.pipe.scheduler.config)
    p = SDEditParams(PROMPT, strength=0.5, steps=4, guidance=1.0, seed=2, repeats=2, fast=True)
    res = run_to_end(sdedit(model, guide_image(), p))
    assert timesteps == [499, 259, 499, 259]  # 2 of the 4 LCM steps, per repeat
    assert res.params["steps_run"] == 2 and res.params["start_timestep"] == 499
    assert res.params["sampler"] == "LCM" and res.params["fast"] is True
    again = run_to_end(sdedit(model, guide_image(), p))
    assert all(np.array_equal(pixels(a.image), pixels(b.image)) for a, b in zip(res.images, again.images))
    assert not np.array_equal(pixels(res.images[0].image), pixels(res.images[1].image))
    masked = run_to_end(sdedit(model, guide_image(), p, mask=np.pad(np.ones((16, 16), bool), 24)))
    assert masked.mask is not None
    assert np.array_equal(pixels(masked.images[0].image)[~masked.mask], guide_image()[~masked.mask])
    assert_restored(model, probe, base_out, config)


def test_fast_sdedit_refuses_no_step(model, lcm, timesteps):
    p = SDEditParams(PROMPT, strength=0.2, steps=4, guidance=1.0, seed=2, fast=True)
    with pytest.raises(InputError, match=r"strength x steps gives no step \(int\(4 x 0.2\) = 0\).*at least 0.25"):
        run_to_end(sdedit(model, guide_image(), p))
    assert timesteps == []
    p = SDEditParams(PROMPT, strength=0.6, steps=20, guidance=1.0, seed=2, fast=True)
    with pytest.raises(InputError, match="1 to 8 steps"):
        run_to_end(sdedit(model, guide_image(), p))


# ------------------------------------------------------------------------------------------ the tabs
@pytest.fixture(scope="module")
def tabs(model):
    """The Generate and SDEdit tabs built over a Context on the private model."""
    import gradio as gr

    from app.context import Context
    from app.hosting import Hosting
    from app.sessions import SessionRegistry
    from app.tabs import generate as generate_tab
    from app.tabs import sdedit as sdedit_tab
    from pipelines.studio import Studio

    studio = Studio()
    studio.model = model
    ctx = Context(studio, SessionRegistry(), Hosting())
    with gr.Blocks() as demo:
        with gr.Tabs() as ctx.tabs:
            generate_tab.build(ctx)
            sdedit_tab.build(ctx)
    return ctx, demo


def _handlers(demo, box):
    """The checkbox's own listeners: {event name: fn}."""
    out = {}
    for fn in demo.fns.values():
        for block_id, event in fn.targets:
            if block_id == box._id:
                out[event] = fn.fn
    return out


@pytest.mark.parametrize("tab, usual_steps", [("generate", 30), ("sdedit", 50)])
def test_the_checkbox_switches_the_sliders_and_restores(tabs, tab, usual_steps):
    ctx, demo = tabs
    box = ctx.restore[tab].controls["fast"]
    handlers = _handlers(demo, box)
    skip, steps, guidance = handlers["input"](True)
    assert (steps["minimum"], steps["maximum"], steps["value"]) == (1, 8, 4)
    assert (guidance["minimum"], guidance["maximum"], guidance["value"]) == (0, 2, 1.0)
    _, steps, guidance = handlers["input"](False)
    assert steps["maximum"] > 8 and steps["value"] == usual_steps
    assert (guidance["maximum"], guidance["value"]) == (20, 7.5)
    steps, guidance = handlers["change"](True)  # a restored PNG: the ranges move, its values stay
    assert "value" not in steps and steps["maximum"] == 8 and "value" not in guidance
    params = {"prompt": PROMPT, "steps": 6, "guidance": 1.5, "fast": True, "sampler": "LCM",
              "lora_hashes": "lcm: 0123456789ab"}
    updates, note = ctx.restore_updates(tab, params)
    values = dict(zip(ctx.restore[tab].controls, updates))
    assert values["fast"]["value"] is True and values["steps"]["value"] == 6 and values["guidance"]["value"] == 1.5
    assert "Skipped" not in note


def test_the_checkbox_is_off_on_the_embedded_model(tabs):
    from app.fast_mode import availability

    ctx, demo = tabs
    note = availability(SimpleNamespace(id=EMBEDDED_ID))
    assert note["interactive"] is False and note["value"] is False and "Instruct tab" in note["info"]
    assert availability(SimpleNamespace(id="some/sd15"))["interactive"] is True
    box = ctx.restore["generate"].controls["fast"]
    assert any(c is box for c, _ in ctx.followers)
    real = ctx.studio.model
    ctx.studio.model = SimpleNamespace(id=EMBEDDED_ID)
    try:
        refused, steps, _ = _handlers(demo, box)["input"](True)
    finally:
        ctx.studio.model = real
    assert refused["value"] is False and refused["interactive"] is False and "value" not in steps


# ------------------------------------------------------------------------------------------ through the app
@pytest.fixture
def shared_lcm(studio, lcm_dir, monkeypatch):
    """The LCM-LoRA for the app's shared tiny model, unloaded again afterwards (the UNet is then as before)."""
    from pipelines.core.lora import unload_lora

    monkeypatch.setenv(fast.LCM_ENV, str(lcm_dir))
    yield studio.model
    if fast.LCM_ADAPTER in studio.model.loras:
        unload_lora(studio.model, fast.LCM_ADAPTER)


def test_fast_mode_through_the_app(app_url, shared_lcm, tmp_path):
    import json

    from PIL import Image

    from app import examples
    from tests.test_app_e2e import app_error, new_client
    from tests.test_app_editing_e2e import editor

    client = new_client(app_url, tmp_path)
    args = [PROMPT, "", 21, 4, 1.0, 64, 64, False, 1.0, None, 1, True]  # ..., adapter, batch count, fast
    _, path, seed, status = client.predict(*args, api_name="/generate")
    assert status.startswith("Done") and seed == 21
    with Image.open(path) as png:
        meta = json.loads(png.info["studio"])
    assert meta["sampler"] == "LCM" and meta["fast"] is True
    assert np.array_equal(pixels(Image.open(path)), pixels(gen(shared_lcm, seed=21).image))  # the Python API's
    args[3] = 30
    assert "1 to 8 steps" in app_error(lambda: client.predict(*args, api_name="/generate"))
    strokes, prompt, _ = examples.SDEDITS[0]
    out = client.predict(editor(strokes), prompt, "", 0.5, 4, 1.0, 3, 1, False, True, api_name="/sdedit")
    assert out[-1].startswith("Done") and "2 steps from t=499" in out[-1]
    # the tab's strength starts at 0.3: with 2 steps that is int(0.6) = 0 steps
    assert "gives no step" in app_error(lambda: client.predict(editor(strokes), prompt, "", 0.3, 2, 1.0, 3, 1, False,
                                                               True, api_name="/sdedit"))
