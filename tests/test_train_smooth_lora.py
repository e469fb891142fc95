"""Smooth LoRA training (training/train_smooth_lora.py): the regularizer's maths, resume, the saved formats, the
embedded model's own LoRA, and bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.core.lora import SMOOTH_NAME, load_lora, lora_applied
from pipelines.core.models import EMBEDDED_DIR, bundled_smooth_lora
from pipelines.core.tiny_model import ensure_tiny_model
from training import train_smooth_lora as tsl
from training.smooth_reg import VariationTarget, denoised, output_direction, variation_vjp

FAST = ["--steps", "2", "--batch", "2", "--world-samples", "8", "--threads", "1", "--no-progress",
        "--checkpoint-every", "1", "--eval-every", "1"]


@pytest.fixture(scope="module")
def tiny_folder():
    return str(ensure_tiny_model())


@pytest.fixture(scope="module")
def trained(tiny_folder, tmp_path_factory):
    """A 2-step run on the tiny model (with a non-zero rate, so the LoRA's up weights leave zero)."""
    out = tmp_path_factory.mktemp("smooth_run")
    result = tsl.main(["--base", tiny_folder, "--out", str(out), "--lr", "1e-2", *FAST])
    return out, result


def _unet_out(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 16, 16, generator=g)
    cond = torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return model.unet(x, 500, encoder_hidden_states=cond).sample


def test_vjp_equals_finite_difference(tiny_folder):
    """The regularizer's pull-back <grad, u> equals the directional derivative of <x0_hat, d> along u."""
    _, _, _, unet, alphas = tsl.load_base(tiny_folder)
    unet = unet.double()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64).requires_grad_(True)
    states = torch.randn(2, 77, 32, generator=g, dtype=torch.float64)
    t = torch.tensor([120, 700])
    alphas = alphas.double()

    def f(e):
        _, x0_hat = denoised(unet, x0, e, t, states, alphas)
        return x0_hat

    x0_hat = f(eps)
    direction = output_direction(x0_hat, t, alphas, torch.Generator().manual_seed(1)).double()
    grad = variation_vjp(x0_hat, eps, direction, create_graph=False)
    u = torch.randn(eps.shape, generator=g, dtype=torch.float64)
    h = 1e-4
    with torch.no_grad():
        fd = ((f(eps + h * u) * direction).sum() - (f(eps - h * u) * direction).sum()) / (2 * h)
    assert float((grad * u).sum()) == pytest.approx(float(fd), rel=1e-3)  # parts of the UNet run in float32
    # the direction is about unit length before its sqrt(1 - alpha_bar) scale
    ab = alphas[t].view(-1, 1, 1, 1)
    assert (direction / (1 - ab).sqrt()).flatten(1).norm(dim=1).tolist() == pytest.approx([1, 1], abs=0.1)


def test_variation_target_is_the_ema_of_the_mean():
    target = VariationTarget(0.5)
    assert float(target.penalty(torch.tensor([2.0, 2.0]))) == pytest.approx(1.0)  # a: 0 -> 1
    assert target.value == pytest.approx(1.0)
    target.penalty(torch.tensor([3.0, 3.0]))
    assert target.value == pytest.approx(2.0)
    copy = VariationTarget()
    copy.load_state_dict(target.state_dict())
    assert (copy.value, copy.decay, copy.updates) == (2.0, 0.5, 2)


def test_training_writes_a_lora_that_plain_diffusers_loads(trained, tiny_folder):
    from diffusers import StableDiffusionPipeline

    out, result = trained
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [row["step"] for row in history] == [1, 2]
    assert all(np.isfinite([row["loss"], row["reg_loss"], row["variation"]]).all() for row in history)
    assert result["variation_target"] > 0  # the running mean moved off its start at 0
    pipe = StableDiffusionPipeline.from_pretrained(tiny_folder, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    cond = torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        before = pipe.unet(x, 500, encoder_hidden_states=cond).sample
        pipe.load_lora_weights(str(out), weight_name=tsl.WEIGHT_NAME, adapter_name="smooth")
        after = pipe.unet(x, 500, encoder_hidden_states=cond).sample
    n_layers = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith(("attn1.to_q", "attn2.to_q")))
    assert n_layers > 0 and len(pipe.unet.peft_config["smooth"].target_modules) == 4
    assert (after - before).abs().max() > 1e-4


def test_legacy_export_loads_in_the_studio_with_the_same_output(trained, tiny_folder, tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    out, _ = trained
    sd = load_file(str(out / tsl.WEIGHT_NAME))
    legacy = tsl.to_legacy(sd)
    assert len(legacy) == len(sd)
    assert all(".processor.to_" in k and k.endswith(("_lora.down.weight", "_lora.up.weight")) for k in legacy)
    save_file(legacy, str(tmp_path / "legacy_smooth.safetensors"))
    base = _unet_out(tiny_model)
    outs = {}
    for name, path in (("new_fmt", out / tsl.WEIGHT_NAME), ("old_fmt", tmp_path / "legacy_smooth.safetensors")):
        load_lora(tiny_model, str(path), name)
        try:
            with lora_applied(tiny_model, name):
                outs[name] = _unet_out(tiny_model)
        finally:
            tiny_model.unet.delete_adapters(name)
            tiny_model.loras.pop(name)
    assert (outs["new_fmt"] - base).abs().max() > 1e-4
    torch.testing.assert_close(outs["old_fmt"], outs["new_fmt"], rtol=0, atol=1e-6)
    torch.testing.assert_close(_unet_out(tiny_model), base, rtol=0, atol=0)


@pytest.mark.slow
def test_resume_keeps_the_variation_target(tiny_folder, tmp_path):
    """Two steps, stop, two more on resume: the same EMA target, step count and LoRA as four in one go."""
    from safetensors.torch import load_file

    common = ["--base", tiny_folder, "--lr", "1e-2", "--batch", "2", "--world-samples", "8", "--threads", "1",
              "--no-progress", "--checkpoint-every", "1", "--eval-every", "1"]
    whole = tsl.main([*common, "--out", str(tmp_path / "whole"), "--steps", "4"])
    tsl.main([*common, "--out", str(tmp_path / "split"), "--steps", "2"])
    resumed = tsl.main([*common, "--out", str(tmp_path / "split"), "--steps", "4", "--resume"])
    assert resumed["steps"] == 4
    assert resumed["variation_target"] == pytest.approx(whole["variation_target"], rel=1e-6)
    a, b = load_file(str(tmp_path / "whole" / tsl.WEIGHT_NAME)), load_file(str(tmp_path / "split" / tsl.WEIGHT_NAME))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert max(float(a[k].abs().max()) for k in a if "lora.up" in k) > 1e-3  # the LoRA did move
    rows = [json.loads(r) for r in (tmp_path / "split" / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    whole_rows = [json.loads(r) for r in (tmp_path / "whole" / "history.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] == pytest.approx(whole_rows[-1]["loss"], rel=1e-5)


def test_image_folder_data(tiny_folder, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i, colour in enumerate(((255, 0, 0), (0, 0, 255))):
        Image.new("RGB", (80, 64), colour).save(data / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"a plain {'red blue'.split()[i]} background"}))
    (data / "metadata.jsonl").write_text("\n".join(rows))
    folder = tsl.ImageFolderCaptions(data, 64)
    item = folder[1]
    assert item["text"] == "a plain blue background" and item["pixels"].shape == (3, 64, 64)
    assert float(item["pixels"][2].mean()) == pytest.approx(1.0) and float(item["pixels"][0].mean()) == -1.0
    result = tsl.main(["--base", tiny_folder, "--data", str(data), "--out", str(tmp_path / "run"), "--legacy-format",
                       *FAST])
    assert result["steps"] == 2
    from safetensors.torch import load_file

    keys = list(load_file(str(tmp_path / "run" / tsl.WEIGHT_NAME)))  # --legacy-format: the official layout
    assert keys and all(".processor.to_" in k for k in keys)


@pytest.mark.parametrize("case", ["no captions", "no text", "unreadable", "outside"])
def test_bad_data_folders_fail_before_training(case, tiny_folder, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 64), "red").save(data / "a.png")
    if case == "no text":
        (data / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png"}))
    elif case == "unreadable":
        (data / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        (data / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a"}) + "\n"
                                             + json.dumps({"file_name": "b.png", "text": "b"}))
    elif case == "outside":
        (data / "metadata.jsonl").write_text(json.dumps({"file_name": "../../etc/passwd", "text": "x"}))
    message = {"no captions": "No captions", "no text": "no caption", "unreadable": "Unreadable image 'b.png'",
               "outside": "outside the data folder"}[case]
    out = tmp_path / "run"
    with pytest.raises(tsl.TrainingError, match=message):
        tsl.main(["--base", tiny_folder, "--data", str(data), "--out", str(out), *FAST])
    assert not (out / tsl.WEIGHT_NAME).exists() and not (out / "checkpoint").exists()


def test_rank_zero_is_refused(tiny_folder, tmp_path, capsys):
    with pytest.raises(SystemExit):
        tsl.main(["--base", tiny_folder, "--out", str(tmp_path / "run"), "--rank", "0", *FAST])
    assert "--rank must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_base_without_attention_layers_is_refused(tiny_folder, tmp_path):
    import shutil

    from diffusers import UNet2DConditionModel

    base = tmp_path / "no_attention"
    shutil.copytree(tiny_folder, base)
    shutil.rmtree(base / "unet")
    UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                         cross_attention_dim=32, down_block_types=("DownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type=None,
                         ).save_pretrained(base / "unet")
    with pytest.raises(tsl.TrainingError, match="no attention layers"):
        tsl.main(["--base", str(base), "--out", str(tmp_path / "run"), *FAST])
    assert not (tmp_path / "run" / tsl.WEIGHT_NAME).exists()


def test_the_embedded_model_ships_its_smooth_lora_applied_by_name(embedded, tmp_path):
    path = bundled_smooth_lora(EMBEDDED_DIR)
    assert path is not None and "smooth" in path.name
    assert SMOOTH_NAME in embedded.loras and SMOOTH_NAME in embedded.unet.peft_config
    base = _unet_out(embedded)
    with lora_applied(embedded, SMOOTH_NAME):
        smooth = _unet_out(embedded)
    assert (smooth - base).abs().max() > 1e-3
    torch.testing.assert_close(_unet_out(embedded), base, rtol=0, atol=0)  # switched off again
    # another adapter loaded after it does not take its place
    load_lora(embedded, str(path), "other")
    try:
        with lora_applied(embedded, SMOOTH_NAME):
            torch.testing.assert_close(_unet_out(embedded), smooth, rtol=0, atol=1e-6)
    finally:
        embedded.unet.delete_adapters("other")
        embedded.loras.pop("other")
