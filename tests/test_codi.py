"""CoDi few-step editing: the sampler (pipelines/core/consistency.py CodiScheduler through the studio's one loop),
the studio's codi_edit (pipelines/codi.py), the evaluation's batched edits (training/evaluation.py) and the Instruct
tab's Fast mode, on the tiny model with a tiny CoDi adapter built here."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.core import consistency

ZERO_GATES = ("controlnet_cond_embedding.conv_out", "controlnet_down_blocks", "controlnet_mid_block")


def tiny_adapter(unet, seed: int = 0, gated: bool = True):
    """A condition adapter made from `unet` as the trainer makes it; gated=True gives its zero convolutions random
    weights, so the student's prediction depends on the image condition (a fresh adapter adds exactly nothing)."""
    from diffusers import ControlNetModel

    adapter = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(32,),
                                        conditioning_channels=unet.config.in_channels).float().eval()
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
