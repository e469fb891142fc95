"""benchmarks/bench_train_steps.py: it times the networks the recipe's stages really train (their trainers'
batch sizes, the decoder-only VAE stages with a frozen encoder)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_train_steps as bench  # noqa: E402

from training import recipe  # noqa: E402


def test_each_stage_is_parsed_by_its_own_trainer():
    stages = {s.name: s for s in recipe.STAGES}
    first, decoder = bench.stage_args(stages["vae"], "cpu", 1), bench.stage_args(stages["vae_dec"], "cpu", 1)
    assert (first.batch, first.freeze_encoder) == (16, False) and (decoder.batch, decoder.freeze_encoder) == (16, True)
    assert bench.stage_args(stages["instruct"], "cpu", 1).batch == 16  # the recipe sets it; the trainer default is 48
    assert bench.stage_args(stages["unet"], "cpu", 1).batch == 48
    networks = {bench.network_of(s) for s in recipe.STAGES if s.steps}
    assert networks == {"vae", "text", "unet", "instruct", "smooth", None}
    smooth = bench.stage_args(stages["smooth_lora"], "cpu", 1)
    assert smooth.batch == 32 and bench.trains_in_bf16(smooth)


def test_the_smooth_lora_step_trains_only_the_lora():
    torch.manual_seed(0)
    net, step = bench.step_fn("smooth", 2, False, torch.device("cpu"))
    base = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    step(False)
    assert all(torch.equal(p, base[n]) for n, p in net.named_parameters() if n in base)
    assert any(not torch.equal(p, lora[n]) for n, p in net.named_parameters() if n in lora)


def test_a_frozen_encoder_step_trains_only_the_decoder():
    torch.manual_seed(0)
    net, step = bench.step_fn("vae", 2, True, torch.device("cpu"))
    before_enc = net.encoder.conv_in.weight.detach().clone()
    before_dec = net.decoder.conv_out.weight.detach().clone()
    step(False)
    assert net.encoder.conv_in.weight.grad is None and torch.equal(net.encoder.conv_in.weight, before_enc)
    assert not torch.equal(net.decoder.conv_out.weight, before_dec)
