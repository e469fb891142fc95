"""The VAE trainer (training/train_vae.py) and its data (training/data.py): a tiny run that stops and
resumes, safetensors-only outputs that diffusers loads, and data that keeps to the training splits."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from training import data, world
from training.train_vae import main

TINY = ["--tiny", "--threads", "1", "--batch", "4", "--eval-world", "8", "--scale-images", "16",
        "--checkpoint-every", "2", "--eval-every", "100", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """3 steps, then --resume to a total of 5; keeps what each part left behind."""
    out = tmp_path_factory.mktemp("vae_run")
    with torch.random.fork_rng():  # the trainer seeds torch's global generator
        first = main(["--out", str(out), "--steps", "3", *TINY])
        weights_3 = load_file(out / "checkpoint" / "model.safetensors")
        state_3 = json.loads((out / "checkpoint" / "state.json").read_text())
        second = main(["--out", str(out), "--steps", "5", "--resume", *TINY])
    return out, first, second, weights_3, state_3


def test_resume_continues_steps_weights_and_optimizer(run):
    out, first, second, weights_3, state_3 = run
    assert (first["step"], state_3["step"]) == (3, 3)
    state_5 = json.loads((out / "checkpoint" / "state.json").read_text())
    assert (second["step"], state_5["step"]) == (5, 5)
    assert state_5["elapsed_s"] > state_3["elapsed_s"]
    weights_5 = load_file(out / "checkpoint" / "model.safetensors")
    assert weights_5.keys() == weights_3.keys()
    assert any(not torch.equal(weights_3[k], weights_5[k]) for k in weights_3)
    optimizer = optimizer_state(out)
    steps = {float(v["step"]) for v in optimizer["state"].values()}
    assert steps == {5.0}  # Adam's moments went on from the checkpoint rather than restarting
    assert all("exp_avg_sq" in v for v in optimizer["state"].values())


def optimizer_state(out) -> dict:
    """The optimizer state accelerate's save_state wrote into out/checkpoint."""
    return torch.load(out / "checkpoint" / "optimizer.bin", weights_only=True)


def tensors_equal(a: dict, b: dict) -> bool:
    """Nested state dicts (tensors, numbers, lists) equal to the bit."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


class Stop(Exception):
    pass


def stopped_after_checkpoint(monkeypatch, module, at: int):
    """Makes the trainer `module` stop (raise Stop) right after it writes its checkpoint at step `at`, as a run killed
    there would leave it."""
    real = module.checkpoint.save_state

    def save(accelerator, out, summary):
        real(accelerator, out, summary)
        if summary["step"] == at:
            raise Stop

    monkeypatch.setattr(module.checkpoint, "save_state", save)


@pytest.mark.slow
def test_explicit_cpu_device_stops_and_resumes_exactly_like_the_default(run, tmp_path):
    """--device cpu given explicitly (the default) draws the same numbers in the same order: its stopped and
    resumed run ends on the default run's weights and Adam state to the bit, and the checkpoint records it."""
    out = tmp_path / "cpu"
    with torch.random.fork_rng():
        main(["--out", str(out), "--steps", "3", "--device", "cpu", *TINY])
        main(["--out", str(out), "--steps", "5", "--resume", "--device", "cpu", *TINY])
    mine = load_file(out / "checkpoint" / "model.safetensors")
    default = load_file(run[0] / "checkpoint" / "model.safetensors")
    assert mine.keys() == default.keys() and all(torch.equal(mine[k], default[k]) for k in mine)
    assert tensors_equal(optimizer_state(out), optimizer_state(run[0]))
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert (state["step"], state["args"]["device"]) == (5, "cpu")


@pytest.mark.slow
def test_a_run_stopped_mid_way_resumes_and_ends_where_an_uninterrupted_run_ends(tmp_path, monkeypatch):
    """Killed after its step-3 checkpoint of a 5-step budget, then resumed: the same weights, Adam state and exported
    VAE as the run that was never stopped (learning rate, batches and noise all go on from the checkpoint)."""
    from training import train_vae

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    argv = [*TINY, "--checkpoint-every", "3", "--steps", "5"]
    with torch.random.fork_rng():
        main(["--out", str(whole), *argv])
    with torch.random.fork_rng(), monkeypatch.context() as m:
        stopped_after_checkpoint(m, train_vae, 3)
        with pytest.raises(Stop):
            main(["--out", str(parts), *argv])
    assert json.loads((parts / "checkpoint" / "state.json").read_text())["step"] == 3 and not (parts / "vae").exists()
    with torch.random.fork_rng():
        main(["--out", str(parts), *argv, "--resume"])
    for name in ("checkpoint/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        a, b = load_file(whole / name), load_file(parts / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert tensors_equal(optimizer_state(whole), optimizer_state(parts))


def test_outputs_are_safetensors_and_load_in_diffusers(run):
    from diffusers import AutoencoderKL

    out = run[0]
    suffixes = {p.suffix for p in out.rglob("*") if p.is_file() and "checkpoint" not in p.parts}
    assert suffixes <= {".safetensors", ".json", ".jsonl"}, suffixes
    assert not list(out.glob("*.partial")) and not (out / "checkpoint.old").exists()
    # the checkpoint is accelerate's save_state folder, with a readable summary
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl",
            "state.json"} <= {p.name for p in (out / "checkpoint").iterdir()}
    vae = AutoencoderKL.from_pretrained(out / "vae")
    factor = float(vae.config.scaling_factor)
    assert math.isfinite(factor) and factor > 0
    assert vae.config.latent_channels == 4
    latents = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 16, 16)  # downsampling factor 4
    report = json.loads((out / "vae_eval.json").read_text())
    assert report["scaling_factor"] == pytest.approx(factor)
    assert math.isfinite(report["world_psnr"]) and math.isfinite(report["photo_psnr"])
    assert set(report["photo_sources"]) == set(data.PHOTOS)
    assert (out / "latent_rgb.json").is_file()


def test_batches_have_the_right_shape_and_range():
    rng = np.random.default_rng(0)
    for batch, n in ((data.world_batch(rng, 5), 5), (data.photo_batch(rng, 3), 3), (data.mixed_batch(rng, 8), 8),
                     (data.photo_eval_set(), len(data.photo_eval_set()))):
        assert batch.shape == (n, 3, 64, 64) and batch.dtype == torch.float32
        assert batch.min() >= -1 and batch.max() <= 1
    assert len(data.photo_eval_set()) >= 50


def test_world_batches_use_only_training_seeds(monkeypatch):
    drawn = []
    real = world.dataset

    def spy(seed, count, size=64, split=None):
        drawn.append((seed, split))
        return real(seed, count, size, split)

    monkeypatch.setattr(world, "dataset", spy)
    rng = np.random.default_rng(1)
    for _ in range(20):
        data.mixed_batch(rng, 16)
    assert len(drawn) == 20 * 12
    assert all(split == "train" and world.split_of(seed) == "train" for seed, split in drawn)
    assert max(seed for seed, _ in drawn) < world.HELD_OUT_SEED


def test_photo_training_crops_never_touch_the_eval_strip(monkeypatch):
    boxes = []
    real = data._crop

    def spy(name, box):
        boxes.append((name, box))
        return real(name, box)

    monkeypatch.setattr(data, "_crop", spy)
    rng = np.random.default_rng(2)
    for _ in range(10):
        data.photo_batch(rng, 32)
    assert {name for name, _ in boxes} == set(data.PHOTOS)
    for name, (x0, y0, x1, y1) in boxes:
        tx0, ty0, tx1, ty1 = data.train_region(name)
        assert tx0 <= x0 < x1 <= tx1 and ty0 <= y0 < y1 <= ty1
        assert x1 <= data.eval_region(name)[0]  # crop boxes are half-open: x1 is the first column not read
    for name in data.PHOTOS:
        ex0, ey0, ex1, ey1 = data.eval_region(name)
        assert data.train_region(name)[2] <= ex0
        for x0, y0, x1, y1 in data.photo_eval_boxes(name):
            assert ex0 <= x0 < x1 <= ex1 and ey0 <= y0 < y1 <= ey1


def test_stage_two_trains_the_decoder_only(run, tmp_path):
    """--init-from + --freeze-encoder: every latent (encoder, quant_conv, scaling factor) stays as it was."""
    from diffusers import AutoencoderKL

    stage1 = run[0] / "vae"
    out = tmp_path / "stage2"
    with torch.random.fork_rng():
        main(["--out", str(out), "--init-from", str(stage1), "--freeze-encoder", "--steps", "2", *TINY])
    before, after = AutoencoderKL.from_pretrained(stage1), AutoencoderKL.from_pretrained(out / "vae")
    for name in ("encoder", "quant_conv"):
        b, a = getattr(before, name).state_dict(), getattr(after, name).state_dict()
        assert all(torch.equal(b[k], a[k]) for k in b), name
    assert any(not torch.equal(before.decoder.state_dict()[k], v) for k, v in after.decoder.state_dict().items())
    assert after.config.scaling_factor == before.config.scaling_factor


def test_worst_pixel_loss_is_the_mean_error_of_the_worst_pixels():
    from training.train_vae import worst_pixels_l1

    x = torch.zeros(2, 3, 10, 10)
    y = x.clone()
    y[0, :, 0, :2] = 0.5  # image 0: two pixels off by 0.5 in each channel (1.5 summed), the rest exact
    y[1] += 0.1           # image 1: every pixel off by 0.1 (0.3 summed)
    # worst 2% of 100 pixels = 2 per image
    assert worst_pixels_l1(y, x, 0.02).item() == pytest.approx((1.5 + 0.3) / 2)
    # the mean L1 would see image 0's error 50x diluted
    assert (y[0] - x[0]).abs().sum(0).mean().item() == pytest.approx(0.03)


def test_deepened_stage_two_starts_as_the_original_and_keeps_its_latents(run, tmp_path):
    """--deepen adds one identity ResNet per block: at step 0 the VAE computes exactly what it did; after
    decoder-only training the latents are still the original encoder's (the UNets stay valid)."""
    from diffusers import AutoencoderKL

    from training.train_vae import deepened

    stage1 = AutoencoderKL.from_pretrained(run[0] / "vae").eval()
    deep = deepened(stage1).eval()
    assert deep.config.layers_per_block == stage1.config.layers_per_block + 1
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = stage1.encode(x).latent_dist.mean
        assert torch.equal(deep.encode(x).latent_dist.mean, z)
        assert torch.equal(deep.decode(z).sample, stage1.decode(z).sample)
    out = tmp_path / "deep"
    with torch.random.fork_rng():
        main(["--out", str(out), "--init-from", str(run[0] / "vae"), "--freeze-encoder", "--deepen",
              "--worst-weight", "1", "--steps", "2", *TINY])
    after = AutoencoderKL.from_pretrained(out / "vae").eval()
    assert after.config.layers_per_block == stage1.config.layers_per_block + 1
    assert after.config.scaling_factor == stage1.config.scaling_factor
    with torch.no_grad():
        assert torch.equal(after.encode(x).latent_dist.mean, z)
        assert not torch.equal(after.decode(z).sample, stage1.decode(z).sample)


@pytest.mark.slow
def test_refined_latents_pair_unet_outputs_with_renders_and_train_the_decoder(tiny_model, tmp_path):
    """refined_latents.py: N (latent, render) pairs from training scenes; the latent is what the UNet made
    from the noised encoding, not the encoding itself. train_vae --refined decodes them beside the batch."""
    from diffusers import AutoencoderKL

    from training import evaluation, refined_latents

    file = tmp_path / "refined.safetensors"
    refined_latents.main(["--model", str(tiny_model.folder), "--out", str(file), "--count", "3", "--batch", "2",
                          "--steps", "4", "--threads", "1", "--no-progress", "--seed-base", "10"])
    pairs = load_file(file)
    renders = np.stack([im for im, _, _ in world.dataset(10, 3, 64, split="train")])
    assert np.array_equal(pairs["images"].numpy(), renders)
    vae = AutoencoderKL.from_pretrained(tiny_model.folder / "vae").eval()
    encoded = evaluation.encode(vae, renders)
    assert pairs["latents"].shape == encoded.shape
    assert not torch.allclose(pairs["latents"].float(), encoded, atol=1e-2)
    out = tmp_path / "dec"
    with torch.random.fork_rng():
        main(["--out", str(out), "--init-from", str(tiny_model.folder / "vae"), "--freeze-encoder",
              "--refined", str(file), "--refined-share", "0.5", "--steps", "2", *TINY])
    after = AutoencoderKL.from_pretrained(out / "vae")
    assert torch.equal(after.encoder.conv_in.weight, vae.encoder.conv_in.weight)
    assert not torch.equal(after.decoder.conv_out.weight, vae.decoder.conv_out.weight)


def test_bf16_autocast_keeps_the_vae_loss_float32_and_near_the_float32_loss(run):
    """--bf16 runs encode and decode under bfloat16 autocast: the loss, its image and the posterior stay
    float32, the loss is within bfloat16's rounding of the float32 one, and the gradients reach the weights."""
    import argparse

    from diffusers import AutoencoderKL

    from training.train_vae import loss_fn

    vae = AutoencoderKL.from_pretrained(run[0] / "vae").train()
    x = data.mixed_batch(np.random.default_rng(0), 4, 0.25)
    losses = {}
    for bf16 in (False, True):
        args = argparse.Namespace(bf16=bf16, device="cpu", freeze_encoder=False, anchor_weight=0.0, kl_weight=1e-6,
                                  edge_weight=1.0, worst_weight=1.0, worst_fraction=0.02)
        torch.manual_seed(0)
        vae.zero_grad(set_to_none=True)
        loss, y = loss_fn(vae, x, args)
        loss.backward()
        assert loss.dtype == y.dtype == torch.float32
        assert vae.encoder.conv_in.weight.grad.abs().sum() > 0 and vae.decoder.conv_out.weight.grad.abs().sum() > 0
        losses[bf16] = loss.item()
    assert losses[True] != losses[False]  # autocast did run the networks in bfloat16
    assert losses[True] == pytest.approx(losses[False], rel=0.03)
