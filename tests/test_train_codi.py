"""CoDi's trainer (training/train_codi.py) and its math (pipelines/core/consistency.py) on the tiny model: the
boundary parameterisation, the sampler's timestep grid, the zero-gated adapter, the consistency target of one
step, and a short run that resumes and exports the studio's codi/ folder."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipelines.core import consistency
from training import train_codi

SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def alphas():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULE).alphas_cumprod.float()


@pytest.fixture(scope="module")
def tiny_unet(tiny_model):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_model.folder / "unet").float().eval()


def test_boundary_scalings_are_the_identity_at_zero_and_the_x0_prediction_from_t_20():
    c_skip, c_out = consistency.boundary_scalings(torch.tensor([0, 1, 20, 980]))
    assert c_skip[0] == 1 and c_out[0] == 0
    assert c_skip[1] == pytest.approx(0.25 / (100 + 0.25)) and c_out[1] == pytest.approx(10 / (100.25 ** 0.5))
    assert (c_skip[2:] < 7e-4).all() and (c_out[2:] > 0.9996).all()
    a = alphas()
    z, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 20, 500])
    f = consistency.consistency_x0(z, eps, t, a)
    torch.testing.assert_close(f[0], z[0])  # f(z, 0) = z whatever the network says
    x0 = (z[2] - (1 - a[500]).sqrt() * eps[2]) / a[500].sqrt()
    c_skip, c_out = consistency.boundary_scalings(torch.tensor(500))
    torch.testing.assert_close(f[2], c_skip * z[2] + c_out * x0)


def test_sampling_timesteps_sub_sample_the_grid_noisiest_first():
    assert consistency.sampling_timesteps(1) == [980]
    assert consistency.sampling_timesteps(2) == [980, 480]
    assert consistency.sampling_timesteps(4) == [980, 740, 500, 260]
    assert consistency.grid_timesteps().tolist() == list(range(0, 1000, 20))
    with pytest.raises(ValueError):
        consistency.sampling_timesteps(0)


def test_the_student_starts_as_the_base_unet(tiny_unet):
    """The adapter's zero convolutions gate it in at zero: every residual is 0 and the student's prediction is the
    base UNet's, bit for bit, whatever the condition."""
    import copy

    student = train_codi.student_from(copy.deepcopy(tiny_unet), "pe").eval()
    assert not any(p.requires_grad for p in student.unet.parameters())
    assert all(p.requires_grad for p in student.adapter.parameters())
    z, cond = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    text = torch.randn(2, 77, tiny_unet.config.cross_attention_dim)
    t = torch.tensor([980, 20])
    with torch.no_grad():
        down, mid = student.adapter(z, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
        assert all(r.abs().max() == 0 for r in down) and mid.abs().max() == 0
        assert torch.equal(student(z, t, text, cond), tiny_unet(z, t, encoder_hidden_states=text).sample)
    assert train_codi.student_from(copy.deepcopy(tiny_unet), "full").unet.conv_in.weight.requires_grad


def test_one_step_target_is_the_ema_prediction_after_the_online_models_own_ddim_step(tiny_unet):
    import copy

    torch.manual_seed(0)
    student = train_codi.student_from(copy.deepcopy(tiny_unet), "full")
    for p in student.adapter.controlnet_down_blocks.parameters():  # open the gate so the condition matters
        torch.nn.init.normal_(p, std=0.05)
    target = copy.deepcopy(student).requires_grad_(False)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.01 * torch.randn_like(p))  # the EMA network differs from the online one
    a = alphas()
    z0, cond, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    text = torch.randn(2, 77, tiny_unet.config.cross_attention_dim)
    t, s = torch.tensor([500, 20]), torch.tensor([480, 0])
    f_t, f_s = train_codi.codi_targets(student, target, z0, cond, text, t, s, a, noise)
    assert f_t.requires_grad and not f_s.requires_grad
    with torch.no_grad():
        z_t = a[t].sqrt().view(-1, 1, 1, 1) * z0 + (1 - a[t]).sqrt().view(-1, 1, 1, 1) * noise
        eps = student(z_t, t, text, cond)
        x0 = (z_t - (1 - a[t]).sqrt().view(-1, 1, 1, 1) * eps) / a[t].sqrt().view(-1, 1, 1, 1)
        z_s = a[s].sqrt().view(-1, 1, 1, 1) * x0 + (1 - a[s]).sqrt().view(-1, 1, 1, 1) * eps
        expected = consistency.consistency_x0(z_s, target(z_s, s, text, cond), s, a)
    torch.testing.assert_close(f_s, expected)
    torch.testing.assert_close(f_s[1], z_s[1])  # at s = 0 the target is the DDIM step's latent itself
    torch.testing.assert_close(f_t.detach(), consistency.consistency_x0(z_t, eps, t, a))
    loss = (f_t - f_s).pow(2).mean()
    loss.backward()
    assert student.adapter.controlnet_down_blocks[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in target.parameters())


@pytest.mark.slow
def test_a_short_run_resumes_and_exports_the_studio_codi_folder(tiny_model, tmp_path):
    out = tmp_path / "codi"
    argv = ["--base", str(tiny_model.folder), "--out", str(out), "--threads", "1", "--batch", "4", "--samples", "16",
            "--checkpoint-every", "2", "--eval-every", "1000", "--no-progress", "--mode", "pe",
            "--export", str(tmp_path / "model_codi")]
    with torch.random.fork_rng():
        train_codi.main([*argv, "--steps", "2"])
        report = train_codi.main([*argv, "--steps", "3", "--resume"])
    assert report["step"] == 3
    info = json.loads((tmp_path / "model_codi" / "codi.json").read_text())
    assert info["grid"] == 50 and info["mode"] == "pe" and info["trained"]["steps"] == 3
    assert not (tmp_path / "model_codi" / "unet").exists()  # PE-CoDi ships the adapter only
    weights = load_file(tmp_path / "model_codi" / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float16}
    # the gate has opened: three optimiser steps moved the zero convolutions off zero
    assert any(weights[k].abs().max() > 0 for k in weights if k.startswith("controlnet_down_blocks"))
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3 and state["models"] == {"student": "model.safetensors"}
