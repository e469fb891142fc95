"""SingDiffusion's singular step (pipelines/singdiffusion.py): the jump, the official guidance form, the Euler
correction, when it does nothing, the module loader's key checks, the .bin converter, and the studio paths that
use it (text-to-image, seed interpolation), on tiny modules."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel

from pipelines import singdiffusion as sd
from pipelines.core.errors import InputError
from pipelines.core.events import run_to_end

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            clip_sample=False, set_alpha_to_one=False, steps_offset=1)
# the official layout (an SD UNet config), tiny, and fitting the tiny model (4 latent channels, 32-wide text)
TINY_MODULE = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                   norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
                   down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


class Stub(torch.nn.Module):
    """A module whose prediction is fixed per text state: y_c where the states are 1, y_u where they are 0;
    it records the batch sizes it was called with."""

    def __init__(self, y_c, y_u):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.y_c, self.y_u, self.calls = y_c, y_u, []

    def forward(self, x, t, encoder_hidden_states):
        self.calls.append(len(x))
        is_c = encoder_hidden_states[:, 0, 0].view(-1, 1, 1, 1) > 0.5
        return SimpleNamespace(sample=torch.where(is_c, self.y_c, self.y_u).expand_as(x).clone())


class Refuses(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, *args, **kwargs):
        raise AssertionError("the module must not run when the step does not apply")


def scheduler(cls, steps: int, **config):
    """`cls` on SD1.5's schedule (from its DDIM config, as the studio makes its schedulers), timesteps set."""
    sched = cls.from_config(DDIMScheduler(**SD15).config, **config)
    sched.set_timesteps(steps)
    return sched


def states(value: float) -> torch.Tensor:
    return torch.full((1, 77, 8), value)


def tiny_module(seed: int = 0):
    torch.manual_seed(seed)
    return sd.remove_time_conditioning(UNet2DConditionModel(**TINY_MODULE)).eval()


@pytest.fixture
def x1():
    return torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------ the math


@pytest.mark.parametrize("cls", [DDIMScheduler, PNDMScheduler])
def test_jump_is_add_noise_at_the_first_timestep(cls, x1):
    sched = scheduler(cls, 50)
    y = torch.full_like(x1, 0.3)
    out = sd.jump(sched, y, x1)
    t0 = int(sched.timesteps[0])
    a = sched.alphas_cumprod[t0]
    assert t0 == 981 and abs(float(a.sqrt()) - 0.0760) < 5e-4  # SD1.5's "1 - eps" with 50 leading steps
    torch.testing.assert_close(out, a.sqrt() * y + (1 - a).sqrt() * x1)
    torch.testing.assert_close(out, sched.add_noise(y, x1, torch.tensor([t0])))


def test_official_guidance_normalisation_and_its_switch(x1):
    y_c, y_u = torch.tensor(2.0), torch.tensor(0.5)
    cond, uncond = states(1.0), states(0.0)
    w = 7.5
    stub = Stub(y_c, y_u)
    y = sd.guided_mean(stub, x1, cond, uncond, w)
    assert stub.calls == [2]  # both branches in one call
    torch.testing.assert_close(y, torch.full_like(x1, (0.5 + w * 1.5) / w))
    torch.testing.assert_close(y, torch.full_like(x1, 2.0 - (1 - 1 / w) * 0.5))  # y_c - 0.867 y_u
    plain = sd.guided_mean(stub, x1, cond, uncond, w, normalise=False)
    torch.testing.assert_close(plain, torch.full_like(x1, 0.5 + w * 1.5))
    for no_cfg in (1.0, 0.0):  # w <= 1: the conditional prediction alone, one branch
        stub.calls.clear()
        torch.testing.assert_close(sd.guided_mean(stub, x1, cond, uncond, no_cfg), torch.full_like(x1, 2.0))
        assert stub.calls == [1]


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_euler_gets_the_sigma_space_start(spacing, x1):
    sched = scheduler(EulerDiscreteScheduler, 30, timestep_spacing=spacing)
    assert sd.is_sigma_scheduler(sched) and float(sched.init_noise_sigma) > 10
    y = torch.randn(x1.shape, generator=torch.Generator().manual_seed(1))
    start = sd.singular_start(Stub(y, y), sched, x1, states(1.0), None, 7.5)
    assert start.applied
    # what a diffusers pipeline does with `latents=`: times init_noise_sigma; that must be the VE start y + sigma x1
    torch.testing.assert_close(start.latents * sched.init_noise_sigma, y + sched.sigmas[0] * x1)
    if spacing == "leading":  # there init_noise_sigma = 1 / sqrt(abar_t0): exactly the VP tensor
        vp = scheduler(DDIMScheduler, 30)
        assert int(vp.timesteps[0]) == int(sched.timesteps[0])
        torch.testing.assert_close(start.latents, sd.jump(vp, y, x1), rtol=1e-4, atol=1e-5)


def test_zero_terminal_snr_and_noised_starts_are_left_alone(x1):
    zero = scheduler(DDIMScheduler, 25, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    start = sd.singular_start(Refuses(), zero, x1, states(1.0), states(0.0), 7.5)
    assert not start.applied and torch.equal(start.latents, x1) and "zero terminal SNR" in start.note
    euler_zero = scheduler(EulerDiscreteScheduler, 25, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    assert "zero terminal SNR" in sd.refusal(euler_zero)
    sched = scheduler(DDIMScheduler, 25)
    start = sd.singular_start(Refuses(), sched, x1, states(1.0), states(0.0), 7.5, strength=0.6)
    assert not start.applied and torch.equal(start.latents, x1) and "strength 0.6" in start.note
    assert sd.refusal(sched) == ""


# ------------------------------------------------------------------------------------------------ the module


def test_time_conditioning_is_gone_and_the_module_ignores_the_timestep(x1):
    from diffusers.models.resnet import ResnetBlock2D

    module = tiny_module()
    blocks = [b for b in module.modules() if isinstance(b, ResnetBlock2D)]
    assert blocks and all(b.time_emb_proj is None and b.time_embedding_norm is None for b in blocks)
    text = torch.randn((1, 77, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = module(x1, 1, encoder_hidden_states=text).sample
        b = module(x1, 900, encoder_hidden_states=text).sample
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_loader_key_checks(tmp_path, x1):
    from safetensors.torch import load_file, save_file

    module = tiny_module()
    folder = sd.save_module(module, tmp_path / "ok")
    loaded = sd.load_module(folder)
    text = torch.randn((1, 77, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x1, 1, encoder_hidden_states=text).sample,
                                   module(x1, 1, encoder_hidden_states=text).sample)
    state = load_file(str(folder / sd.WEIGHTS))
    assert not any("time_emb_proj" in k for k in state)

    def write(name, tensors):
        target = tmp_path / name
        target.mkdir()
        (target / sd.CONFIG).write_text((folder / sd.CONFIG).read_text())
        save_file(tensors, str(target / sd.WEIGHTS))
        return target

    # the official file may still hold the time layers (saved before the surgery), or not the time embedding:
    # both load
    full = UNet2DConditionModel(**TINY_MODULE).state_dict()
    assert any("time_emb_proj" in k for k in full)
    sd.load_module(write("with_time", {k: v.contiguous() for k, v in full.items()}))
    sd.load_module(write("no_time_embedding", {k: v for k, v in state.items() if not k.startswith("time_embedding.")}))
    # anything else missing or unexpected is refused, saying which
    with pytest.raises(InputError, match=r"1 missing \(e\.g\. conv_out\.weight\)"):
        sd.load_module(write("missing", {k: v for k, v in state.items() if k != "conv_out.weight"}))
    with pytest.raises(InputError, match=r"1 unexpected \(e\.g\. extra\.weight\)"):
        sd.load_module(write("unexpected", {**state, "extra.weight": torch.zeros(3)}))
    with pytest.raises(InputError, match=r"1 tensors of another shape \(e\.g\. conv_in\.weight"):
        sd.load_module(write("shape", {**state, "conv_in.weight": torch.zeros(1, 1, 1, 1)}))
    # a module that does not fit the model, and folders without what is needed
    with pytest.raises(InputError, match="32-wide text states; this model's text encoder gives 768"):
        sd.load_module(folder, expect_channels=4, expect_text_dim=768)
    with pytest.raises(InputError, match="needs config.json"):
        sd.load_module(tmp_path / "nothing")
    bare = tmp_path / "only_bin"
    bare.mkdir()
    (bare / sd.CONFIG).write_text((folder / sd.CONFIG).read_text())
    (bare / sd.PICKLED).write_bytes(b"")
    with pytest.raises(InputError, match="singdiffusion_convert"):
        sd.load_module(bare)


class NotATensor:
    pass


def test_converter_reads_the_pickle_with_weights_only(tmp_path, x1):
    from pipelines.singdiffusion_convert import convert, main

    module = tiny_module(seed=3)
    release = tmp_path / "SingDiffusion"
    release.mkdir()
    config = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.21.4",
              **json.loads(json.dumps(dict(UNet2DConditionModel(**TINY_MODULE).config), default=list))}
    (release / sd.CONFIG).write_text(json.dumps(config))
    # as the official release: the whole state dict (time layers included) pickled with torch.save
    full = UNet2DConditionModel(**TINY_MODULE).state_dict()
    full.update(module.state_dict())
    torch.save(full, release / sd.PICKLED)
    assert main([str(release / sd.PICKLED), str(tmp_path / "out"), "--fp16"]) == 0
    loaded = sd.load_module(tmp_path / "out")
    assert next(loaded.parameters()).dtype == torch.float32  # float16 on disk, the dtype asked for in memory
    text = torch.randn((1, 77, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x1, 1, encoder_hidden_states=text).sample,
                                   module(x1, 1, encoder_hidden_states=text).sample, rtol=2e-2, atol=2e-2)
    report = convert(release / sd.PICKLED, tmp_path / "out32")
    assert any("time_emb_proj" in k for k in report["dropped_keys"])
    # a pickle holding anything but tensors is refused by weights_only, before any of it could run
    torch.save({"conv_in.weight": torch.zeros(1), "evil": NotATensor()}, tmp_path / "evil.bin")
    (tmp_path / sd.CONFIG).write_text(json.dumps(config))
    with pytest.raises(InputError, match="tensor-only checkpoint"):
        convert(tmp_path / "evil.bin", tmp_path / "never")
    assert not (tmp_path / "never").exists()
    # a pickle whose keys do not fit the config
    torch.save({"conv_in.weight": torch.zeros(32, 4, 3, 3)}, tmp_path / "wrong.bin")
    with pytest.raises(InputError, match="missing"):
        convert(tmp_path / "wrong.bin", tmp_path / "never")


# ------------------------------------------------------------------------------------------------ the studio


@pytest.fixture
def with_module(tiny_model, tmp_path):
    """The shared tiny model with a SingDiffusion module given for it (restored afterwards)."""
    folder = sd.save_module(tiny_module(seed=4), tmp_path / "singdiffusion")
    before = tiny_model.singdiffusion_path
    tiny_model.singdiffusion_path = folder
    yield tiny_model
    tiny_model.singdiffusion_path = before


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def test_generate_with_the_singular_step(with_module, monkeypatch):
    from pipelines.core import ddim
    from pipelines.core.latents import initial_noise
    from pipelines.core.metadata import read_metadata
    from pipelines.core.text import encode_prompt
    from pipelines.generate import GenerateParams, generate

    model = with_module
    p = GenerateParams("a red circle", seed=3, steps=4, guidance=5.0, singular_step=True)
    first = run_to_end(generate(model, p))
    again = run_to_end(generate(model, p))
    plain = run_to_end(generate(model, GenerateParams("a red circle", seed=3, steps=4, guidance=5.0)))
    assert np.array_equal(pixels(first.image), pixels(again.image))  # the same seed, the same image
    assert np.abs(pixels(first.image) - pixels(plain.image)).mean() > 1
    assert first.params["singular_step"] is True and plain.params["singular_step"] is False
    assert read_metadata(first.image)["singular_step"] is True
    # the DDIM run starts from the jump of the module's guided mean at x1 = the seed's CPU-generator noise
    seen = []
    real_sample = ddim.sample
    monkeypatch.setattr(ddim, "sample", lambda unet, x, *a, **k: seen.append(x) or real_sample(unet, x, *a, **k))
    off = run_to_end(generate(model, GenerateParams("a red circle", seed=3, steps=4, guidance=5.0,
                                                    singular_step=True, singular_normalise=False)))
    assert off.params["singular_normalise"] is False
    x1 = initial_noise(model, 3, 64, 64)
    cond, uncond = encode_prompt(model, "a red circle"), encode_prompt(model, "")
    y = sd.guided_mean(model.singdiffusion(), x1, cond, uncond, 5.0, normalise=False)
    sched = ddim.make_scheduler(model.scheduler_config, 4)
    a = sched.alphas_cumprod[int(sched.timesteps[0])]
    torch.testing.assert_close(seen[0], a.sqrt() * y + (1 - a).sqrt() * x1)


def test_generate_without_a_module_says_where_to_put_one(tiny_model):
    from pipelines.generate import GenerateParams, generate_batch

    assert tiny_model.singdiffusion_source() is None
    with pytest.raises(InputError, match="has no SingDiffusion module: put one"):
        next(generate_batch(tiny_model, GenerateParams("a red circle", steps=2, singular_step=True), 2))


def test_seed_interpolation_frames_take_the_jump(with_module):
    from pipelines.generate import GenerateParams, generate
    from pipelines.interpolation import InterpolationParams, interpolation_frame

    model = with_module
    p = InterpolationParams("a red circle", "a blue square", seed_a=5, seed_b=6, steps=3, singular_step=True)
    on = run_to_end(interpolation_frame(model, p, 0.5))
    off = run_to_end(interpolation_frame(model, InterpolationParams("a red circle", "a blue square", seed_a=5,
                                                                    seed_b=6, steps=3), 0.5))
    assert on.params["singular_step"] is True and "singular_step" not in off.params
    assert np.abs(pixels(on.image) - pixels(off.image)).mean() > 1
    # the first frame is text-to-image of prompt A and seed A, singular step included
    end = run_to_end(interpolation_frame(model, p, 0.0))
    gen = run_to_end(generate(model, GenerateParams("a red circle", seed=5, steps=3, singular_step=True)))
    assert np.abs(pixels(end.image) - pixels(gen.image)).max() <= 1


def test_module_found_in_the_model_folder_and_env(tiny_model, tmp_path, monkeypatch):
    folder = sd.save_module(tiny_module(), tmp_path / "elsewhere")
    before = tiny_model.singdiffusion_path
    try:
        monkeypatch.setenv(sd.ENV, str(folder))
        assert tiny_model.singdiffusion_source() == folder
        assert tiny_model.singdiffusion() is not None
        given = sd.save_module(tiny_module(seed=1), tmp_path / "given")
        tiny_model.singdiffusion_path = given  # a folder given for the model wins over the environment's
        assert tiny_model.singdiffusion_source() == given
        module = tiny_model.singdiffusion()
        assert module is tiny_model.singdiffusion()  # loaded once
        assert torch.equal(next(module.parameters()), next(tiny_module(seed=1).parameters()))
    finally:
        tiny_model.singdiffusion_path = before


# ------------------------------------------------------------------------------------------------ the UI


@pytest.fixture
def generate_tab(tiny_model):
    """The Generate tab built over a Context on the tiny model."""
    import gradio as gr

    from app.context import Context
    from app.hosting import Hosting
    from app.sessions import SessionRegistry
    from app.tabs import generate as tab
    from pipelines.studio import Studio

    studio = Studio()
    studio.model = tiny_model
    ctx = Context(studio, SessionRegistry(), Hosting())
    with gr.Blocks():
        with gr.Tabs() as ctx.tabs:
            tab.build(ctx)
    return ctx


def test_the_checkbox_follows_the_module_and_restores(generate_tab, tiny_model, tmp_path):
    from app.singdiffusion_ui import availability

    ctx = generate_tab
    box = ctx.restore["generate"].controls["singular_step"]
    assert box.interactive is False and "has no SingDiffusion module" in box.info
    assert any(c is box for c, _ in ctx.followers)
    before = tiny_model.singdiffusion_path
    try:
        tiny_model.singdiffusion_path = sd.save_module(tiny_module(), tmp_path / "module")
        on = availability(tiny_model)
        assert on["interactive"] is True and "value" not in on
        updates = ctx.recommended_updates()  # what a model switch or a module load sends
        assert updates[[c for c, _ in ctx.followers].index(box) - len(ctx.followers)]["interactive"] is True
    finally:
        tiny_model.singdiffusion_path = before
    assert availability(tiny_model) == {"__type__": "update", "value": False, "interactive": False,
                                        "info": box.info}
    for value in (True, False):  # a PNG made with (or without) the step sets the checkbox
        updates, note = ctx.restore_updates("generate", {"prompt": "a red circle", "singular_step": value})
        values = dict(zip(ctx.restore["generate"].controls, updates))
        assert values["singular_step"]["value"] is value and "Singular step" in note and "Skipped" not in note


def test_the_singular_step_through_the_app(app_url, studio, tmp_path):
    from PIL import Image

    from pipelines.core.metadata import read_metadata
    from pipelines.generate import GenerateParams, generate
    from tests.test_app_e2e import app_error, new_client

    client = new_client(app_url, tmp_path)
    args = ["a red circle", "", 8, 3, 5.0, 64, 64, False, 1.0, None, 1, False, True]  # ..., fast, singular step
    assert "has no SingDiffusion module" in app_error(lambda: client.predict(*args, api_name="/generate"))
    assert "is not a folder" in app_error(lambda: client.predict(str(tmp_path / "nope"),
                                                                 api_name="/load_singdiffusion"))
    folder = sd.save_module(tiny_module(seed=6), tmp_path / "module")
    model = studio.model
    before = model.singdiffusion_path
    try:
        _, message = client.predict(str(folder), api_name="/load_singdiffusion")
        assert "SingDiffusion module loaded" in message
        _, path, seed, status = client.predict(*args, api_name="/generate")
        assert status.startswith("Done") and seed == 8
        assert read_metadata(path)["singular_step"] is True
        expected = run_to_end(generate(model, GenerateParams("a red circle", seed=8, steps=3, guidance=5.0,
                                                             singular_step=True)))
        assert np.array_equal(pixels(Image.open(path)), pixels(expected.image))  # the Python API's image
    finally:
        model.singdiffusion_path = before


# ------------------------------------------------------------------------------------------------ the trainer


def test_trainer_tiny_run_resumes_and_exports_a_loadable_module(tmp_path, _studio_cache):
    from pipelines.core.tiny_model import ensure_tiny_model
    from training import train_singdiffusion as trainer

    base = ensure_tiny_model()
    common = ["--base", str(base), "--out", str(tmp_path / "run"), "--samples", "16", "--batch", "4",
              "--eval-scenes", "4", "--eval-every", "2", "--checkpoint-every", "2", "--threads", "1", "--no-progress",
              "--bf16"]
    first = trainer.main(common + ["--steps", "2"])
    assert first["step"] == 2 and Path(first["export"]).name == sd.SUBFOLDER
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert history[0]["step"] == 2 and {"heldout_mse", "luma_error"} <= set(history[0])
    resumed = trainer.main(common + ["--steps", "4", "--resume"])
    assert resumed["step"] == 4
    module = sd.load_module(resumed["export"], expect_channels=4, expect_text_dim=32)
    assert module.config.addition_embed_type is None
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and state["models"] == {"singdiffusion": "model.safetensors"}
    from safetensors.torch import load_file

    weights = load_file(str(Path(resumed["export"]) / sd.WEIGHTS))
    assert all(v.dtype == torch.float16 for v in weights.values() if v.is_floating_point())
    # the module's time embedding never reaches its output, so the export carries no time projections
    assert not any("time_emb_proj" in k for k in weights)


def test_command_line_takes_a_module_folder(tmp_path, with_module, capsys):
    from PIL import Image

    from app.cli import main
    from pipelines.core.metadata import read_metadata
    from pipelines.generate import GenerateParams, generate

    out = tmp_path / "star.png"
    argv = ["generate", "--model", "tiny-random", "--prompt", "a red circle", "--steps", "3", "--seed", "5",
            "--singular-step", "true", "--out", str(out)]
    assert main(argv[:-2] + ["--singdiffusion", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "is not a folder" in capsys.readouterr().err and not out.exists()
    assert main(argv[:-2] + ["--singdiffusion", str(with_module.singdiffusion_path), "--out", str(out)]) == 0
    assert read_metadata(out)["singular_step"] is True
    expected = run_to_end(generate(with_module, GenerateParams("a red circle", seed=5, steps=3, singular_step=True)))
    assert np.array_equal(pixels(Image.open(out)), pixels(expected.image))


def test_brightness_cases_describe_their_ground_truth():
    """The eval's brightness prompts and the scenes whose renders are their ground truth agree (read back by the
    world's checker), and the truth is what the colours say (white 1, black 0)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from eval_embedded import BRIGHTNESS_CASES, case_scenes

    from training import world
    from training.checker import check
    from training.evaluation import mean_luma

    for prompt, background, objects in BRIGHTNESS_CASES:
        scenes = case_scenes(background, objects, 2)
        for scene in scenes:
            seen = check(world.render(scene))
            assert seen["background"]["colours"] == list(background[1:]), prompt
            assert sorted((o["colour"], o["shape"]) for o in seen["objects"]) == \
                sorted((c, s) for s, c, _, _ in objects), prompt
            for obj, (_, _, size, cell) in zip(scene.objects, objects):
                assert obj.size == size and (cell is None or obj.cell == cell), prompt
            assert all(word in prompt for word in background[1:]), prompt
    truth = {p: float(mean_luma(np.stack([world.render(s) for s in case_scenes(b, o, 2)])).mean())
             for p, b, o in BRIGHTNESS_CASES}
    assert truth["a plain white background"] == 1.0 and truth["a plain black background"] == 0.0
    assert 0 < truth["a small white star in the centre on a black background"] < 0.05
