"""Model loading pieces: the tiny model folder, its tokenizer, deterministic building, latent previews,
and `resolve_source` errors."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pipelines.core.errors import InputError
from pipelines.core.models import resolve_source
from pipelines.core.previews import (
    PREVIEW_FILE,
    SD15_FACTORS,
    LatentPreviewer,
    calibration_images,
    fit_previewer,
    is_sd_vae,
    previewer_for,
)
from pipelines.core.tiny_model import TINY_ID, build_tiny_model, ensure_tiny_model

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".msgpack", ".h5"}


@pytest.fixture(scope="module")
def folder(_studio_cache) -> Path:
    return ensure_tiny_model()


def test_tiny_model_folder_has_only_safetensors_weights(folder, tiny_model):
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in PICKLE_SUFFIXES]
    weights = sorted(p.relative_to(folder).parts[0] for p in files if p.suffix == ".safetensors")
    assert weights == ["text_encoder", "unet", "unet_instruct", "vae"]
    assert (folder / "model_index.json").is_file() and (folder / PREVIEW_FILE).is_file()
    assert tiny_model.folder == folder and tiny_model.random_weights


def test_tiny_model_uses_sd15_scheduler_settings(folder, tiny_model):
    cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert cfg["_class_name"] == "DDIMScheduler"
    assert cfg["beta_schedule"] == "scaled_linear"
    assert cfg["beta_start"] == 0.00085 and cfg["beta_end"] == 0.012
    assert cfg["num_train_timesteps"] == 1000
    assert cfg["prediction_type"] == "epsilon" and cfg["set_alpha_to_one"] is False and cfg["steps_offset"] == 1
    # the loaded model carries the same schedule; SD1.5's last alpha_cumprod is ~0.0047
    sched = tiny_model.pipe.scheduler
    assert float(sched.alphas_cumprod[-1]) == pytest.approx(0.0047, abs=2e-4)
    assert tiny_model.resolution == 64 and tiny_model.vae_factor == 4 and tiny_model.size_multiple == 8


def test_tokenizer_loads_and_tokenizes_unknown_words(folder):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    ids = tok("zxqv-glorp", add_special_tokens=False).input_ids
    assert len(ids) > 0 and tok.unk_token_id not in ids
    assert tok.decode(ids).replace(" ", "") == "zxqv-glorp"  # byte-level pieces keep every character
    known = tok("a red circle").input_ids
    assert known[0] == tok.bos_token_id and known[-1] == tok.eos_token_id
    assert len(known) == 5  # one token per vocabulary word
    padded = tok("a cat", padding="max_length", max_length=tok.model_max_length).input_ids
    assert tok.model_max_length == 77 and len(padded) == 77


def test_every_vocabulary_word_is_one_token(folder):
    from transformers import CLIPTokenizer

    from pipelines.core.tiny_model import WORDS

    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    split = [w for w in WORDS if len(tok(w, add_special_tokens=False).input_ids) != 1]
    assert split == []


def test_building_twice_gives_identical_weights(folder, tmp_path):
    again = build_tiny_model(tmp_path / "again")
    for part in ("unet", "vae", "text_encoder"):
        (a_file,) = (folder / part).glob("*.safetensors")
        (b_file,) = (again / part).glob("*.safetensors")
        a, b = load_file(str(a_file)), load_file(str(b_file))
        assert a.keys() == b.keys() and len(a) > 0
        for k in a:
            assert torch.equal(a[k], b[k]), (part, k)
    assert json.loads((folder / PREVIEW_FILE).read_text()) == json.loads((again / PREVIEW_FILE).read_text())
    assert (folder / "tokenizer" / "tokenizer.json").read_text() == (again / "tokenizer" / "tokenizer.json").read_text()
    assert not (tmp_path / "again.partial").exists()


# --- latent previews ------------------------------------------------------------------------------

class _LinearVAE(torch.nn.Module):
    """A stand-in VAE whose latents are an exact linear function of the 4x4-averaged RGB, and whose decode
    is that function's inverse: the fitted previewer must then reproduce the decode almost exactly."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([
            [0.9, -0.4, 0.2], [0.1, 0.8, -0.5], [-0.3, 0.2, 0.7], [0.5, 0.5, 0.5]]), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.tensor([0.1, -0.2, 0.05, 0.3]), requires_grad=False)
        self.config = SimpleNamespace(latent_channels=4, block_out_channels=[8, 8, 8], scaling_factor=2.0)

    def encode(self, images):
        small = F.avg_pool2d(images, 4)
        z = torch.einsum("nchw,lc->nlhw", small, self.weight) + self.bias.view(1, 4, 1, 1)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=z))

    def decode(self, z):
        rgb = torch.einsum("nlhw,cl->nchw", z - self.bias.view(1, 4, 1, 1), torch.linalg.pinv(self.weight))
        return SimpleNamespace(sample=F.interpolate(rgb, scale_factor=4, mode="nearest"))


def _preview_mse(previewer, z, decoded):
    up = F.interpolate(previewer.to_rgb(z), size=decoded.shape[-2:], mode="nearest")
    return float(((up.clamp(-1, 1) - decoded) ** 2).mean())


def test_fitted_previewer_recovers_a_linear_decoder():
    vae = _LinearVAE()
    pv = fit_previewer(vae)
    images = calibration_images(64, 6, seed=3)  # not the fitting images
    z = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    decoded = vae.decode(z / vae.config.scaling_factor).sample
    fitted = _preview_mse(pv, z, decoded)
    zero = float((decoded**2).mean())
    sd15 = _preview_mse(LatentPreviewer(SD15_FACTORS), z, decoded)
    assert fitted < 1e-6
    assert zero > 0.1 and sd15 > 0.1


def test_tiny_model_previewer_is_its_least_squares_fit(tiny_model):
    """The stored factors are exactly a fresh fit, and that fit beats any other linear map on its own
    calibration data (zero map, best constant, SD15's published factors)."""
    vae, pv = tiny_model.vae, tiny_model.previewer
    assert pv.source == "fitted"
    fresh = fit_previewer(vae)
    torch.testing.assert_close(fresh.factors, pv.factors, atol=1e-6, rtol=0)
    torch.testing.assert_close(fresh.bias, pv.bias, atol=1e-6, rtol=0)

    images = calibration_images(64)
    with torch.no_grad():
        z = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
        decoded = vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)
    target = F.interpolate(decoded, size=z.shape[-2:], mode="area")

    def err(p):
        return float(((p.to_rgb(z) - target) ** 2).mean())

    fitted = err(pv)
    assert fitted < err(LatentPreviewer(np.zeros((4, 3)).tolist()))
    assert fitted < err(LatentPreviewer(np.zeros((4, 3)).tolist(), target.mean((0, 2, 3)).tolist()))
    assert fitted < 0.6 * err(LatentPreviewer(SD15_FACTORS))
    # Against the real decode of unseen images the fit beats SD15's factors and the zero map.
    held_out = calibration_images(64, 8, seed=7)
    with torch.no_grad():
        z2 = vae.encode(held_out).latent_dist.mean * vae.config.scaling_factor
        decoded = vae.decode(z2 / vae.config.scaling_factor).sample
    assert _preview_mse(pv, z2, decoded) < 0.6 * _preview_mse(LatentPreviewer(SD15_FACTORS), z2, decoded)
    assert _preview_mse(pv, z2, decoded) < _preview_mse(LatentPreviewer(np.zeros((4, 3)).tolist()), z2, decoded)


def _vae_stub(latent_channels=4, blocks=(128, 256, 512, 512), scaling=0.18215):
    return SimpleNamespace(config=SimpleNamespace(
        latent_channels=latent_channels, block_out_channels=list(blocks), scaling_factor=scaling))


def test_previewer_for_sd_vae_uses_published_factors(tmp_path):
    sd_vae = _vae_stub()
    assert is_sd_vae(sd_vae)
    pv = previewer_for(sd_vae, None)
    assert pv.source == "sd15-published"
    assert torch.equal(pv.factors, torch.tensor(SD15_FACTORS)) and torch.equal(pv.bias, torch.zeros(3))
    assert previewer_for(sd_vae, tmp_path).source == "sd15-published"  # a folder without a stored file
    # A stored file wins over the published factors.
    LatentPreviewer([[0.1, 0.2, 0.3]] * 4, [0.5, 0.5, 0.5], source="stored").save(tmp_path)
    stored = previewer_for(sd_vae, tmp_path)
    assert stored.source == "stored" and torch.equal(stored.bias, torch.tensor([0.5, 0.5, 0.5]))


@pytest.mark.parametrize("stub", [
    _vae_stub(scaling=0.13025),                        # SDXL-like scaling
    _vae_stub(latent_channels=16),                     # SD3-like latents
    _vae_stub(blocks=(16, 32, 32), scaling=0.18215),   # the tiny model's shape
])
def test_is_sd_vae_rejects_other_vaes(stub):
    assert not is_sd_vae(stub)


def test_previewer_for_other_vaes_fits(tiny_model):
    assert not is_sd_vae(tiny_model.vae)
    pv = previewer_for(tiny_model.vae, None)
    assert pv.source == "fitted"
    torch.testing.assert_close(pv.factors, tiny_model.previewer.factors, atol=1e-6, rtol=0)


def test_previewer_image_size_and_range(tiny_model):
    z = torch.randn(1, 4, 16, 12) * 5  # large values are clamped, not wrapped
    img = tiny_model.previewer(z)
    assert img.size == (12, 16) and img.mode == "RGB"
    rgb = tiny_model.previewer.to_rgb(z).clamp(-1, 1)
    expected = ((rgb[0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(img), expected)


# --- resolve_source -------------------------------------------------------------------------------

@pytest.mark.parametrize("source,message", [
    ("", "No model given"),
    ("   ", "No model given"),
    (None, "No model given"),
    ("not a model id", "neither an existing folder nor a Hub id"),
    ("a/b/c", "neither an existing folder nor a Hub id"),
    ("./relative/x", "neither an existing folder nor a Hub id"),
    ("/nonexistent/folder", "neither an existing folder nor a Hub id"),
])
def test_resolve_source_errors(source, message):
    with pytest.raises(InputError, match=message):
        resolve_source(source)


def test_resolve_source_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(InputError, match="not a diffusers model folder"):
        resolve_source(str(tmp_path))


def test_resolve_source_accepts_good_sources(folder):
    assert resolve_source("owner/name") == ("owner/name", "owner/name", None)
    model_id, where, label = resolve_source(str(folder))
    assert model_id == str(folder.resolve()) and Path(where) == folder and label is None
    model_id, where, _ = resolve_source(TINY_ID)
    assert model_id == TINY_ID and Path(where) == folder
