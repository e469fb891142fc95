"""CoDi few-step editing: the sampler (pipelines/core/consistency.py CodiScheduler through the studio's one loop),
the studio's codi_edit (pipelines/codi.py), the evaluation's batched edits (training/evaluation.py) and the Instruct
tab's Fast mode, on the tiny model with a tiny CoDi adapter built here."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pipelines.core import consistency

ZERO_GATES = ("controlnet_cond_embedding.conv_out", "controlnet_down_blocks", "controlnet_mid_block")


def tiny_adapter(unet, seed: int = 0, gated: bool = True):
    """A condition adapter made from `unet` as the trainer makes it; gated=True gives its zero convolutions random
    weights, so the student's prediction depends on the image condition (a fresh adapter adds exactly nothing)."""
    from diffusers import UNet2DConditionModel

    # the UNet without LoRA wrappers another test of the session may have left on the shared tiny model
    plain = UNet2DConditionModel.from_config(unet.config)
    plain.load_state_dict({k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k})
    adapter = consistency.condition_adapter(plain).float().eval()
    if gated:
        gen = torch.Generator().manual_seed(seed)
        for name, param in adapter.named_parameters():
            if name.startswith(ZERO_GATES):
                param.data = torch.randn(param.shape, generator=gen) * 0.05
    return adapter.requires_grad_(False)


@pytest.fixture(scope="module")
def adapter(tiny_model):
    return tiny_adapter(tiny_model.unet)


# ------------------------------------------------------------------------------------------ the sampler
def test_scheduler_walks_the_grid_and_renoises_deterministically():
    a = consistency.schedule_alphas()
    sched = consistency.CodiScheduler(4, a)
    assert sched.timesteps.tolist() == [980, 740, 500, 260]
    assert consistency.CodiScheduler(1).timesteps.tolist() == [980]
    assert consistency.CodiScheduler(2).timesteps.tolist() == [980, 480]
    z, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    out = sched.step(eps, torch.tensor(740), z)
    x0 = consistency.consistency_x0(z, eps, torch.tensor([740, 740]), a)
    torch.testing.assert_close(out.pred_original_sample, x0)
    # the next timestep's latent: the same eps, no fresh noise
    torch.testing.assert_close(out.prev_sample, a[500].sqrt() * x0 + (1 - a[500]).sqrt() * eps)
    last = sched.step(eps, 260, z)
    torch.testing.assert_close(last.prev_sample, last.pred_original_sample)  # the last step returns x0
    torch.testing.assert_close(sched.step(eps, 740, z).prev_sample, out.prev_sample)


def test_a_fresh_adapter_leaves_the_student_equal_to_the_base_unet(tiny_model):
    """The zero gate: an adapter just made from the UNet adds nothing, so the student's eps (with or without text
    guidance) is the base UNet's, whatever the condition."""
    from pipelines.core.ddim import guided_eps

    unet = tiny_model.unet
    fresh = tiny_adapter(unet, gated=False)
    z, cond = torch.randn(1, 4, 16, 16), torch.randn(1, 77, unet.config.cross_attention_dim)
    uncond, condition = torch.randn_like(cond), torch.randn(1, 4, 16, 16) * 3
    with torch.no_grad():
        base = unet(z, 500, encoder_hidden_states=cond).sample
        torch.testing.assert_close(consistency.student_eps(unet, fresh, z, 500, cond, condition), base)
        torch.testing.assert_close(
            consistency.guided_student_eps(unet, fresh, z, 500, cond, uncond, condition, 3.0),
            guided_eps(unet, z, 500, cond, uncond, 3.0), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ evaluation
def world_inputs(count: int = 3):
    from training import world
    from training.evaluation import held_out_edits

    pairs = held_out_edits(count, "recolour")
    return np.stack([world.render(s) for s, _ in pairs]), [e.instruction for _, e in pairs]


def test_codi_edit_batch_is_the_sampler_per_seed_in_any_batch(tiny_model, adapter):
    from training.evaluation import codi_edit_batch

    m = tiny_model
    images, instructions = world_inputs(3)
    args = (m.unet, adapter, m.text_encoder, m.tokenizer, m.vae)
    together = codi_edit_batch(*args, images, instructions, [0, 1, 2], steps=2, guidance=2.0)
    apart = codi_edit_batch(*args, images, instructions, [0, 1, 2], steps=2, guidance=2.0, chunk=1)
    assert together.shape == (3, 64, 64, 3) and together.dtype == np.uint8
    assert np.abs(together.astype(int) - apart.astype(int)).max() <= 1  # batching changes nothing but rounding
    again = codi_edit_batch(*args, images[:1], instructions[:1], [0], steps=2, guidance=2.0)
    np.testing.assert_array_equal(again[0], apart[0])  # same seed, same batch size: the same pixels
    other_seed = codi_edit_batch(*args, images[:1], instructions[:1], [5], steps=2, guidance=2.0)
    assert np.abs(other_seed[0].astype(int) - together[0].astype(int)).max() > 0


def test_codi_edit_accuracy_scores_the_held_out_edits(tiny_model, adapter):
    from training.evaluation import codi_edit_accuracy

    m = tiny_model
    acc = codi_edit_accuracy(m.unet, adapter, m.text_encoder, m.tokenizer, m.vae, "background", count=2, steps=1,
                             guidance=1.0)
    assert set(acc) == {"success", "psnr_outside", "n"} and acc["n"] == 2
    assert 0.0 <= acc["success"] <= 1.0 and np.isfinite(acc["psnr_outside"])


# ------------------------------------------------------------------------------------------ the studio's edit
CONFIG = {"grid": 50, "sigma_data": 0.5, "timestep_scaling": 10, "guidance": 2.0, "default_steps": 4,
          "mode": "pe", "trained": {"steps": 3}}


def write_codi_folder(folder, unet, config=CONFIG, full: bool = False):
    """A model folder's codi/: the gated tiny adapter, codi.json, and for full=True a student UNet of its own."""
    import json

    tiny_adapter(unet).save_pretrained(folder / "controlnet", safe_serialization=True)
    if full:
        student = copy.deepcopy(unet)
        with torch.no_grad():
            student.conv_out.bias += 0.5  # another UNet than the base one
        student.save_pretrained(folder / "unet", safe_serialization=True)
    (folder / "codi.json").write_text(json.dumps(config))
    return folder


def model_with_codi(tiny_model, folder, **kwargs):
    """A copy of the tiny model's folder with a codi/ folder, loaded as a model."""
    import shutil

    from pipelines.core.events import run_to_end
    from pipelines.core.models import load_model

    shutil.copytree(tiny_model.folder, folder)
    write_codi_folder(folder / "codi", tiny_model.unet, **kwargs)
    return run_to_end(load_model(str(folder)))


@pytest.fixture(scope="module")
def codi_model(tiny_model, tmp_path_factory):
    return model_with_codi(tiny_model, tmp_path_factory.mktemp("codi") / "tiny-codi")


@pytest.fixture(scope="module")
def picture():
    from app import examples

    return examples.INSTRUCTIONS[0][0]


def edit(model, image, **kwargs):
    from pipelines.codi import CodiParams, codi_edit
    from pipelines.core.events import run_to_end

    return run_to_end(codi_edit(model, image, CodiParams(**{"instruction": "make it red", "seed": 3, **kwargs})))


class UNetCalls:
    """Records each call of a UNet: (batch size, timestep)."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_pre_hook(self.record)

    def record(self, _module, args):
        self.calls.append((args[0].shape[0], int(args[1])))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_codi_model_loads_from_the_folder(codi_model, tiny_model):
    from pipelines.core.models import CodiModel

    assert tiny_model.codi() is None and tiny_model.codi_config() is None  # no codi/ folder
    assert codi_model.codi_config()["guidance"] == 2.0
    codi = codi_model.codi()
    assert isinstance(codi, CodiModel) and codi_model.codi() is codi  # loaded once
    assert codi.unet is codi_model.unet  # no codi/unet: the student's UNet is the text-to-image one
    assert not codi.adapter.training and not any(p.requires_grad for p in codi.adapter.parameters())
    assert codi.config["trained"] == {"steps": 3}  # keys the sampler does not use are kept, ignored


def test_a_full_codi_student_brings_its_own_unet(tiny_model, tmp_path):
    model = model_with_codi(tiny_model, tmp_path / "full", full=True)
    codi = model.codi()
    assert codi.unet is not model.unet and codi.unet.config.in_channels == 4
    torch.testing.assert_close(codi.unet.conv_out.bias, model.unet.conv_out.bias + 0.5)


def test_same_seed_same_pixels_other_seed_or_image_other_pixels(codi_model, picture):
    from PIL import Image

    a, b = edit(codi_model, picture), edit(codi_model, picture)
    np.testing.assert_array_equal(np.asarray(a.edited.image), np.asarray(b.edited.image))
    other = edit(codi_model, picture, seed=4)
    assert np.abs(np.asarray(other.edited.image, int) - np.asarray(a.edited.image, int)).max() > 0
    flipped = edit(codi_model, Image.open(picture).transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert np.abs(np.asarray(flipped.edited.image, int) - np.asarray(a.edited.image, int)).max() > 0  # the condition


@pytest.mark.parametrize("guidance, batch", [(2.0, 2), (1.0, 1)])
def test_one_step_is_one_unet_call_and_the_consistency_x0_of_its_eps(codi_model, picture, guidance, batch):
    from pipelines.core.latents import encode_image
    from pipelines.core.text import encode_prompt

    codi = codi_model.codi()
    with UNetCalls(codi.unet) as unet_calls, UNetCalls(codi.adapter) as adapter_calls:
        r = edit(codi_model, picture, steps=1, guidance=guidance)
    assert unet_calls.calls == [(batch, 980)] and adapter_calls.calls == [(batch, 980)]  # both CFG branches batched
    z = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(3))
    condition = encode_image(codi_model, r.source)
    with torch.no_grad():
        eps = consistency.guided_student_eps(codi.unet, codi.adapter, z, torch.tensor(980),
                                             encode_prompt(codi_model, "make it red"), encode_prompt(codi_model, ""),
                                             condition, guidance)
    expected = consistency.consistency_x0(z, eps, torch.tensor([980]), consistency.schedule_alphas())
    torch.testing.assert_close(r.latents, expected, rtol=1e-4, atol=1e-5)
    assert r.params["steps"] == 1 and r.params["guidance"] == guidance


@pytest.mark.parametrize("steps, timesteps", [(2, [980, 480]), (4, [980, 740, 500, 260])])
def test_the_steps_walk_the_grid(codi_model, picture, steps, timesteps):
    with UNetCalls(codi_model.codi().unet) as calls:
        r = edit(codi_model, picture, steps=steps)  # guidance None: codi.json's 2.0, two branches a call
    assert calls.calls == [(2, t) for t in timesteps]
    assert r.params["guidance"] == 2.0


def test_previews_each_step_and_cancel_stops_before_the_next_unet_call(codi_model, picture):
    from pipelines.codi import CodiParams, codi_edit
    from pipelines.core.events import Cancelled, CancelToken, Kind

    token = CancelToken()
    events = []
    with UNetCalls(codi_model.codi().unet) as calls, pytest.raises(Cancelled):
        for ev in codi_edit(codi_model, picture, CodiParams("make it red", 4, seed=1), token):
            events.append(ev)
            if ev.stage == "editing" and ev.stage_step == 2:
                token.cancel()
    assert len(calls.calls) == 2  # no UNet call after the cancel
    assert events[0].kind == Kind.SOURCE and all(ev.preview is not None for ev in events)
    assert [ev.stage_step for ev in events[1:]] == [1, 2]


@pytest.mark.parametrize("steps", [3, 0, 8, "four", 2.5])
def test_other_step_counts_are_refused_before_any_weights_load(tiny_model, tmp_path, picture, steps):
    from pipelines.core.errors import InputError

    model = model_with_codi(tiny_model, tmp_path / "m")
    with pytest.raises(InputError, match="Steps|1, 2 or 4"):
        edit(model, picture, steps=steps)
    assert model._codi is None


def test_a_model_without_codi_says_so(tiny_model, picture):
    from pipelines.core.errors import InputError

    with pytest.raises(InputError, match="has no CoDi model.*Standard \\(InstructPix2Pix\\)"):
        edit(tiny_model, picture)


def test_an_empty_instruction_returns_the_input(codi_model, picture):
    with UNetCalls(codi_model.codi().unet) as calls:
        r = edit(codi_model, picture, instruction="  ")
    assert calls.calls == [] and r.latents is None
    np.testing.assert_array_equal(np.asarray(r.edited.image), np.asarray(r.source))


def test_png_parameters_round_trip(codi_model, picture, tmp_path):
    from pipelines.core.metadata import parse_parameters, read_metadata, save_png

    r = edit(codi_model, picture, steps=2, guidance=1.5)
    path = save_png(r.edited.image, tmp_path / "codi.png")
    params = read_metadata(path)
    assert params == {"task": "instruct", "mode": "codi", "instruction": "make it red", "seed": 3, "steps": 2,
                      "guidance": 1.5, "size": "64x64", "model": codi_model.id}
    text = parse_parameters(r.edited.image.info["parameters"])  # the A1111 text alone (another tool's reading)
    assert text["mode"] == "codi" and text["steps"] == "2" and text["prompt"] == ""
    assert "Mode: codi" in r.edited.image.info["parameters"]


# ------------------------------------------------------------------------------------------ the Instruct tab
@pytest.fixture(scope="module")
def tab_ctx(studio):
    """The Instruct tab built over its own Context, for its restore registry and the controls that follow the
    model."""
    import gradio as gr

    from app.context import Context
    from app.hosting import Hosting
    from app.sessions import SessionRegistry
    from app.tabs import instruct

    context = Context(studio, SessionRegistry(), Hosting())
    with gr.Blocks(), gr.Tabs() as context.tabs:
        instruct.build(context)
    return context


def restored(ctx, params: dict) -> tuple[dict, str]:
    updates, note = ctx.restore_updates("instruct", params)
    keys = list(ctx.restore["instruct"].controls)
    return {k: u["value"] for k, u in zip(keys, updates, strict=True) if isinstance(u, dict) and "value" in u}, note


def test_a_fast_edit_png_restores_fast_mode_and_its_own_controls(tab_ctx, codi_model, picture):
    from pipelines.core.metadata import parse_parameters

    r = edit(codi_model, picture, steps=2, guidance=1.5, seed=11)
    for params in (r.params, parse_parameters(r.edited.image.info["parameters"])):  # studio JSON, A1111 text
        got, note = restored(tab_ctx, params)
        assert got["mode"] == "codi" and got["fast_steps"] == 2 and got["fast_guidance"] == 1.5, got
        assert got["seed"] == 11 and got["seed_follows"] == "Fix seed" and got["instruction"] == "make it red"
        # InstructPix2Pix's own steps and sT stay as they are
        assert "steps" not in got and "text_guidance" not in got, got
        assert "Skipped" not in note, note
    ip2p, _ = restored(tab_ctx, {"task": "instruct", "instruction": "x", "steps": 30, "text_guidance": 5.0})
    assert ip2p["mode"] == "standard" and ip2p["steps"] == 30 and ip2p["text_guidance"] == 5.0
    assert "fast_steps" not in ip2p


def test_fast_mode_is_offered_only_for_a_model_with_codi(tab_ctx, studio, codi_model):
    from app.tabs.instruct import fast_guidance_update, mode_update

    without = mode_update(studio.model)  # the tiny model: no codi/
    assert without["interactive"] is False and without["value"] == "standard"
    assert "needs a CoDi model" in without["info"]
    with_codi = mode_update(codi_model)
    assert with_codi["interactive"] is True and "value" not in with_codi  # the user's choice stays
    assert fast_guidance_update(codi_model)["value"] == 2.0  # codi.json's guidance
    outputs = tab_ctx.recommended_outputs()
    assert outputs[-2].elem_id == "ip2p-mode" and outputs[-1].elem_id == "ip2p-fast-guidance"
    assert tab_ctx.recommended_updates()[-2]["interactive"] is False  # the active model (tiny) has none


@pytest.fixture
def codi_active(studio, codi_model):
    """The app's studio on the model with a CoDi model, for one test."""
    before = studio.model
    studio.model = codi_model
    try:
        yield codi_model
    finally:
        studio.model = before


@pytest.fixture(scope="module")
def client(app_url, tmp_path_factory):
    from test_app_e2e import new_client

    return new_client(app_url, tmp_path_factory.mktemp("codi_downloads"))


def fast(client, image, text="make it red", steps=2, seed_mode="Fix seed", seed=9, guidance=1.5):
    """/instruct_fast -> (preview, edited, seed used, guidance used, status)"""
    from gradio_client import handle_file

    return client.predict(handle_file(str(image)) if image else None, text, steps, seed_mode, seed, guidance,
                          api_name="/instruct_fast")


def test_fast_endpoint_is_the_python_api_edit(client, codi_active, picture):
    from PIL import Image
    from test_app_e2e import pixels

    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert [p["parameter_name"] for p in api["/instruct_fast"]["parameters"]] == [
        "image", "instruction", "steps", "seed_mode", "seed", "guidance"]
    assert len(api["/instruct"]["parameters"]) == 9  # the InstructPix2Pix endpoint as it was
    _, edited, seed, guidance, status = fast(client, picture)
    assert status.startswith("Done") and "2 steps" in status and (seed, guidance) == (9, 1.5)
    expected = edit(codi_active, picture, steps=2, guidance=1.5, seed=9)
    np.testing.assert_array_equal(pixels(edited), np.asarray(expected.edited.image.convert("RGB")))
    with Image.open(edited) as im:
        assert '"mode":"codi"' in im.info["studio"]
    _, _, drawn, *_ = fast(client, picture, seed_mode="Randomize seed", seed=9)
    assert drawn != 9  # randomized (the odds of drawing 9 are 1 in 2**32)


def test_fast_endpoint_messages(client, studio, codi_model, picture):
    from test_app_e2e import app_error

    assert "has no CoDi model" in app_error(lambda: fast(client, picture))  # the tiny model has none
    before = studio.model
    studio.model = codi_model
    try:
        assert "1, 2 or 4 steps" in app_error(lambda: fast(client, picture, steps=3))
        assert "Please upload" in app_error(lambda: fast(client, None))
    finally:
        studio.model = before


# ------------------------------------------------------------------------------------------ the eval rows
def test_the_eval_rows_compare_codi_with_its_teacher_on_the_same_edits(codi_model, monkeypatch):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "benchmarks"))
    import eval_embedded

    from pipelines.instruct import recommended_guidance
    from training import evaluation

    monkeypatch.setattr(eval_embedded, "CODI_TIMED", 1)
    monkeypatch.setattr(eval_embedded, "TEACHER_STEPS", 5)  # the tiny model: fewer teacher steps, a fast test
    monkeypatch.setattr(eval_embedded.Context, "n", lambda self, full, quick: 1)
    rows = eval_embedded.GROUPS["codi"](eval_embedded.Context(codi_model, quick=True))
    by = {r.metric: r for r in rows}
    assert len(by) == len(rows)
    names = ["CoDi 1 step", "CoDi 2 steps", "CoDi 4 steps", "IP2P 50 steps (teacher)", "IP2P 4 steps"]
    for name in names:
        assert by[f"{name}: success"].n == 5 and 0 <= by[f"{name}: success"].value <= 1  # one edit of each kind
        assert by[f"{name}: time per edit"].value > 0
    teacher = by["IP2P 50 steps (teacher): success"].value
    assert by["CoDi 4 steps: success"].target == f">= {teacher - 0.05:.3f}"
    assert by["CoDi 4 steps: PSNR outside the edit"].target == ">= 25"
    assert by["CoDi 4 steps - IP2P 4 steps: success"].value == pytest.approx(
        by["CoDi 4 steps: success"].value - by["IP2P 4 steps: success"].value)
    ratio = by["CoDi 4 steps / teacher time"]
    assert ratio.target == "<= 0.1" and ratio.value == pytest.approx(
        by["CoDi 4 steps: time per edit"].value / by["IP2P 50 steps (teacher): time per edit"].value)
    # the same edits, seeds and settings as the evaluation functions the trainer uses
    m, codi = codi_model, codi_model.codi()
    codi4 = evaluation.codi_edit_accuracy(codi.unet, codi.adapter, m.text_encoder, m.tokenizer, m.vae, "recolour",
                                          count=1, steps=4, guidance=2.0)
    assert by["CoDi 4 steps: recolour success"].value == codi4["success"]
    s_t, s_i = recommended_guidance(m)
    ip2p = evaluation.edit_accuracy(m.instruct_unet(), m.text_encoder, m.tokenizer, m.vae, m.scheduler_config,
                                    "recolour", count=1, steps=5, text_guidance=s_t, image_guidance=s_i)
    assert by["IP2P 50 steps (teacher): recolour success"].value == ip2p["success"]


def test_the_eval_rows_say_when_there_is_no_codi_model(tiny_model):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "benchmarks"))
    import eval_embedded

    rows = eval_embedded.GROUPS["codi"](eval_embedded.Context(tiny_model, quick=True))
    assert len(rows) == 1 and rows[0].passed is False


def test_the_condition_adapter_pools_text_like_the_unet_it_copies():
    """A UNet with the "text" addition embedding (as the embedded model's): the adapter's copy of it has the UNet's
    pooling heads and, fed the same text, gives the same embedding (ControlNetModel.from_unet alone would use 64
    heads, which a 32-wide text cannot even split)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8, addition_embed_type="text",
                                addition_embed_type_num_heads=4).eval()
    adapter = consistency.condition_adapter(unet).eval()
    assert adapter.config.addition_embed_type_num_heads == 4
    text = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(adapter.add_embedding(text), unet.add_embedding(text))
        # a fresh adapter adds nothing: the student is the UNet
        z, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
        got = consistency.student_eps(unet, adapter, z, t, text, torch.randn(2, 4, 8, 8))
        torch.testing.assert_close(got, unet(z, t, encoder_hidden_states=text).sample)
