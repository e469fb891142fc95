"""LoRA loading and application on a private copy of the tiny model (never the shared session model):
the legacy Smooth-LoRA key format, diffusers/peft keys, strength, exact restoration, bad files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipelines.core.errors import InputError
from pipelines.core.events import run_to_end
from pipelines.core.lora import load_lora, lora_applied
from pipelines.generate import GenerateParams, generate

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")


def _attn_layers(unet):
    """(processor name, {projection: Linear}) for every attention module of the UNet."""
    out = []
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.rsplit(".processor", 1)[0])
        linears = {"to_q": attn.to_q, "to_k": attn.to_k, "to_v": attn.to_v, "to_out": attn.to_out[0]}
        out.append((name, linears))
    return out


def _base_linear(layer):
    """The plain nn.Linear, also after peft wrapped it."""
    return getattr(layer, "base_layer", layer)


def make_smooth_lora(unet, path: Path, rank: int = 8, seed: int = 0, extra_in: int = 0) -> Path:
    """A legacy attention-processor ("Smooth LoRA") file: `{processor}.to_q_lora.down.weight` etc., no alphas."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, linears in _attn_layers(unet):
        for proj, lin in linears.items():
            lin = _base_linear(lin)
            sd[f"{name}.{proj}_lora.down.weight"] = torch.randn(rank, lin.in_features + extra_in, generator=g) * 0.5
            sd[f"{name}.{proj}_lora.up.weight"] = torch.randn(lin.out_features, rank, generator=g) * 0.5
    save_file(sd, str(path))
    return path


def make_peft_lora(unet, path: Path, rank: int = 4, seed: int = 1) -> Path:
    """diffusers' own format: `unet.<module>.lora_A.weight` / `lora_B.weight`."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, linears in _attn_layers(unet):
        module = name.rsplit(".processor", 1)[0]
        for proj, lin in linears.items():
            lin = _base_linear(lin)
            key = f"unet.{module}.{'to_out.0' if proj == 'to_out' else proj}"
            sd[f"{key}.lora_A.weight"] = torch.randn(rank, lin.in_features, generator=g) * 0.5
            sd[f"{key}.lora_B.weight"] = torch.randn(lin.out_features, rank, generator=g) * 0.5
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="module")
def model(_studio_cache):
    """A private tiny model: these tests attach adapters to its UNet."""
    from pipelines.core.models import load_model

    return run_to_end(load_model("tiny-random"))


@pytest.fixture(scope="module")
def probe(model):
    g = torch.Generator().manual_seed(123)
    x = torch.randn(1, 4, 16, 16, generator=g)
    cond = torch.randn(1, 77, 32, generator=g)

    @torch.no_grad()
    def run():
        return model.unet(x, 500, encoder_hidden_states=cond).sample

    return run


@pytest.fixture(scope="module")
def base_out(model, probe):
    return probe()  # taken before any adapter is attached


@pytest.fixture(scope="module")
def smooth(model, tmp_path_factory):
    path = make_smooth_lora(model.unet, tmp_path_factory.mktemp("lora") / "smooth_lora.safetensors")
    assert load_lora(model, str(path), "smooth") == "smooth"
    return path


def test_smooth_file_has_the_legacy_layout(model, tmp_path):
    from safetensors.torch import load_file

    sd = load_file(str(make_smooth_lora(model.unet, tmp_path / "s.safetensors")))
    n_attn = len(model.unet.attn_processors)
    assert n_attn > 0 and len(sd) == n_attn * len(PROJECTIONS) * 2
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight"
    assert sd[key].shape == (8, 32)
    assert not any("alpha" in k for k in sd)


def test_diffusers_pipeline_loader_ignores_legacy_smooth_files(model, tmp_path):
    """Why we convert ourselves: diffusers' pipeline-level loader finds no `unet.` keys and loads nothing."""
    path = make_smooth_lora(model.unet, tmp_path / "smooth_lora.safetensors")
    pipe = type(model.pipe).from_pretrained(model.folder, safety_checker=None, requires_safety_checker=False)
    g = torch.Generator().manual_seed(5)
    x, cond = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        before = pipe.unet(x, 500, encoder_hidden_states=cond).sample
        pipe.load_lora_weights(str(path))  # no error ...
        after = pipe.unet(x, 500, encoder_hidden_states=cond).sample
    assert getattr(pipe.unet, "peft_config", None) is None  # ... and no adapter
    assert not any("lora" in n for n, _ in pipe.unet.named_parameters())
    assert torch.equal(before, after)


def test_loaded_but_not_applied_is_exactly_the_base_model(model, smooth, probe, base_out):
    assert "smooth" in model.loras and "smooth" in model.unet.peft_config
    assert any("lora_A" in n for n, _ in model.unet.named_parameters())
    assert torch.equal(probe(), base_out)


def test_applied_changes_output_and_exit_restores_it_exactly(model, smooth, probe, base_out):
    with lora_applied(model, "smooth", 1.0):
        full = probe()
    assert torch.equal(probe(), base_out)
    with lora_applied(model, "smooth", 0.5):
        half = probe()
    assert torch.equal(probe(), base_out)
    with lora_applied(model, "smooth", 0.02):
        tiny = probe()
    assert torch.equal(probe(), base_out)

    def rel(out):
        return float((out - base_out).norm() / base_out.norm())

    assert rel(full) > 0.5  # a clear change: this random LoRA is large next to the UNet's small output
    assert rel(half) > 0.1 and not torch.equal(half, full)
    # The UNet is far from linear in such a large LoRA (0.5 can change it as much as 1.0); the per-layer
    # delta scales exactly linearly (next test), and a small strength gives a small change:
    assert 0.0 < rel(tiny) < 0.25 * min(rel(full), rel(half))


def test_strength_scales_the_lora_delta_linearly_per_layer(model, smooth):
    layer = model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    h = torch.randn(2, 7, _base_linear(layer).in_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = layer(h)
        with lora_applied(model, "smooth", 1.0):
            full = layer(h)
        with lora_applied(model, "smooth", 0.5):
            half = layer(h)
        with lora_applied(model, "smooth", -1.0):
            neg = layer(h)
        after = layer(h)
    assert torch.equal(after, base)
    assert float((full - base).abs().max()) > 0.5
    torch.testing.assert_close(half, base + 0.5 * (full - base), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(neg, base - (full - base), atol=1e-5, rtol=1e-5)


def test_exception_inside_the_context_still_restores(model, smooth, probe, base_out):
    with pytest.raises(RuntimeError, match="boom"):
        with lora_applied(model, "smooth", 1.0):
            assert not torch.equal(probe(), base_out)
            raise RuntimeError("boom")
    assert torch.equal(probe(), base_out)


def test_unknown_adapter_name_is_an_input_error(model, smooth, probe, base_out):
    with pytest.raises(InputError, match="not loaded"):
        with lora_applied(model, "nope", 1.0):
            pass
    assert torch.equal(probe(), base_out)


def test_generate_with_and_without_lora(model, smooth):
    p = GenerateParams("a red circle", seed=42, steps=4)
    before = np.asarray(run_to_end(generate(model, p)).image, dtype=np.int16)
    with_lora = run_to_end(generate(model, GenerateParams("a red circle", seed=42, steps=4, lora="smooth")))
    after = np.asarray(run_to_end(generate(model, p)).image, dtype=np.int16)
    assert np.array_equal(before, after)
    assert np.abs(np.asarray(with_lora.image, dtype=np.int16) - before).mean() > 1.0
    assert with_lora.params["lora"] == "smooth" and with_lora.params["lora_strength"] == 1.0


def test_diffusers_format_file_loads_and_stays_separate(model, smooth, probe, base_out, tmp_path):
    with lora_applied(model, "smooth", 1.0):
        smooth_only = probe()
    path = make_peft_lora(model.unet, tmp_path / "my_style.safetensors")
    name = load_lora(model, str(path))
    assert name == "my_style" and model.loras[name] == str(path)
    assert torch.equal(probe(), base_out)
    with lora_applied(model, name, 1.0):
        styled = probe()
    assert float((styled - base_out).abs().max()) > 0.05
    assert not torch.equal(styled, smooth_only)
    assert torch.equal(probe(), base_out)
    with lora_applied(model, "smooth", 1.0):  # applying one adapter never switches on the other
        assert torch.equal(probe(), smooth_only)


def _bad_files(model, d: Path) -> dict[str, tuple[Path, str]]:
    d.mkdir(exist_ok=True)
    (d / "weights.bin").write_bytes(b"\x80\x04not really a pickle")
    (d / "fake.safetensors").write_text("just some text, not safetensors")
    save_file({"model.conv.weight": torch.randn(3, 3), "model.conv.bias": torch.randn(3)},
              str(d / "unrelated.safetensors"))
    make_smooth_lora(model.unet, d / "wrong_shape.safetensors", extra_in=3)
    return {
        "bin": (d / "weights.bin", "Only .safetensors"),
        "fake": (d / "fake.safetensors", "not a readable safetensors file"),
        "unrelated": (d / "unrelated.safetensors", "No UNet LoRA weights"),
        "shape": (d / "wrong_shape.safetensors", "does not fit this model"),
    }


@pytest.mark.parametrize("kind", ["bin", "fake", "unrelated", "shape"])
def test_bad_lora_files_are_input_errors_and_leave_the_unet_untouched(model, smooth, probe, base_out, tmp_path, kind):
    with lora_applied(model, "smooth", 1.0):
        smooth_before = probe()
    loras_before = dict(model.loras)
    path, message = _bad_files(model, tmp_path / "bad")[kind]
    with pytest.raises(InputError, match=message):
        load_lora(model, str(path))
    assert torch.equal(probe(), base_out)
    assert model.loras == loras_before
    assert set(model.unet.peft_config) == set(loras_before)
    with lora_applied(model, "smooth", 1.0):
        assert torch.equal(probe(), smooth_before)


def test_missing_or_empty_lora_sources(model, smooth, probe, base_out, tmp_path):
    with pytest.raises(InputError, match="No LoRA given"):
        load_lora(model, "   ")
    with pytest.raises(InputError, match="LoRA file not found"):
        load_lora(model, str(tmp_path / "missing.safetensors"))
    with pytest.raises(InputError, match="LoRA file not found"):
        load_lora(model, "/missing.safetensors")  # one slash, but a path, not a Hub repo id
    with pytest.raises(InputError, match="neither an existing file nor a Hub repo id"):
        load_lora(model, "just-a-name")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(InputError, match="No .safetensors file"):
        load_lora(model, str(empty_dir))
    assert torch.equal(probe(), base_out)


def test_failed_reload_under_an_existing_name(model, probe, base_out, tmp_path):
    """A bad file under a loaded adapter's name: unreadable/unrelated files keep the old adapter; a file
    that fails while loading removes the name too, so it can never be 'applied' as a silent no-op."""
    good = make_smooth_lora(model.unet, tmp_path / "good.safetensors", seed=7)
    load_lora(model, str(good), "reload_me")
    with lora_applied(model, "reload_me", 1.0):
        good_out = probe()
    assert not torch.equal(good_out, base_out)

    bad = _bad_files(model, tmp_path / "bad")
    with pytest.raises(InputError):
        load_lora(model, str(bad["unrelated"][0]), "reload_me")
    with lora_applied(model, "reload_me", 1.0):
        assert torch.equal(probe(), good_out)

    with pytest.raises(InputError, match="does not fit"):
        load_lora(model, str(bad["shape"][0]), "reload_me")
    assert "reload_me" not in model.loras
    assert "reload_me" not in getattr(model.unet, "peft_config", {})
    with pytest.raises(InputError, match="not loaded"):
        with lora_applied(model, "reload_me", 1.0):
            pass
    assert torch.equal(probe(), base_out)
