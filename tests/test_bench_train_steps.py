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
    assert {bench.network_of(s) for s in recipe.STAGES if s.steps} == {"vae", "text", "unet", "instruct"}


def test_a_frozen_encoder_step_trains_only_the_decoder():
    torch.manual_seed(0)
    net, step = bench.step_fn("vae", 2, True, torch.device("cpu"))
    before_enc = net.encoder.conv_in.weight.detach().clone()
    before_dec = net.decoder.conv_out.weight.detach().clone()
    step(False)
    assert net.encoder.conv_in.weight.grad is None and torch.equal(net.encoder.conv_in.weight, before_enc)
    assert not torch.equal(net.decoder.conv_out.weight, before_dec)
