"""DreamBooth LoRA training (pipelines/dreambooth.py) on a private tiny model: the saved file's format and its
reload (the studio's loader and diffusers' load_lora_weights), exactness with the adapter off, other adapters
untouched, the prior half of the batch, Stop and errors leaving nothing behind, refusals before any work."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from test_lora import make_peft_lora

from pipelines.core.errors import InputError
from pipelines.core.events import Cancelled, CancelToken, Kind, run_to_end
from pipelines.core.lora import load_lora, lora_applied, unload_lora
from pipelines.core.peft_state import adapter_configs, tuner_layers
from pipelines.dreambooth import (
    TRAINING_ADAPTER,
    DreamBoothParams,
    check_identifier,
    dreambooth,
    image_hash,
)


@pytest.fixture(scope="module")
def model(_studio_cache):
    """A private tiny model with an 'other' LoRA loaded as the Smooth LoRA: these tests add adapters."""
    from pipelines.core.models import load_model

    return run_to_end(load_model("tiny-random"))


@pytest.fixture(scope="module")
def smooth(model, tmp_path_factory):
    path = make_peft_lora(model.unet, tmp_path_factory.mktemp("db_lora") / "smooth_lora.safetensors", seed=3)
    load_lora(model, str(path), "smooth")
    return path


@pytest.fixture(scope="module")
def probe(model):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 4, 16, 16, generator=g)
    cond = torch.randn(1, 77, 32, generator=g)

    @torch.no_grad()
    def run():
        return model.unet(x, 400, encoder_hidden_states=cond).sample

    return run


def images(n=3, size=(64, 64)):
    colours = ["red", "green", "blue", "yellow", "white"]
    out = []
    for i in range(n):
        im = Image.new("RGB", size, "black")
        im.paste(Image.new("RGB", (size[0] // 2, size[1] // 2), colours[i % 5]), (i * 4, i * 3))
        out.append(im)
    return out


def params(tmp_path, **kw):
    base = dict(token="sks", class_word="circle", steps=3, prior_images=2, prior_steps=2, preview_every=0,
                out_dir=str(tmp_path))
    return DreamBoothParams(**{**base, **kw})


def state(unet):
    """What must survive: adapters, wrapped layers with their enabled flags, active adapters and scales."""
    return (sorted(adapter_configs(unet)),
            {n: (m.disable_adapters, list(m.active_adapters)) for n, m in tuner_layers(unet).items()},
            sorted(n for n, p in unet.named_parameters() if p.requires_grad))


@pytest.fixture(scope="module")
def trained(model, smooth, probe, tmp_path_factory):
    """One finished run (with prior preservation and previews), and the outputs before it."""
    folder = tmp_path_factory.mktemp("db_out")
    with lora_applied(model, "smooth"):
        smooth_before = probe()
    before = (probe(), smooth_before, state(model.unet))
    events = list(dreambooth(model, images(), params(folder, preview_every=2, preview_steps=2)))
    return events, events[-1].result, before


def test_saved_file_is_diffusers_lora_format_with_config_and_sidecar(trained):
    _, r, _ = trained
    assert r.name == "db_sks" and r.path.name == "db_sks.safetensors" and r.path.suffix == ".safetensors"
    with safe_open(str(r.path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("unet.") and "lora" in k for k in keys)
    assert all(k.endswith((".lora.down.weight", ".lora.up.weight")) for k in keys)  # diffusers' names, no peft
    assert {k.rsplit(".", 4)[-4] for k in keys} <= {"to_q", "to_k", "to_v", "0"}  # attention projections
    config = json.loads(meta["lora_adapter_metadata"])  # the LoraConfig, keys prefixed "unet."
    assert config["unet.r"] == 4 and config["unet.lora_alpha"] == 4
    assert config["unet.init_lora_weights"] == "gaussian"
    info = json.loads(r.sidecar.read_text())
    assert (info["token"], info["class_word"], info["steps"], info["rank"], info["lr"]) == ("sks", "circle", 3, 4,
                                                                                             1e-4)
    assert info["base_model"] == "tiny-random" and info["prior"] is True and info["prior_images"] == 2
    assert info["instance_images_sha256"] == [image_hash(im) for im in images()]
    assert len(set(info["instance_images_sha256"])) == 3


def test_events_stream_losses_and_previews(trained):
    events, r, _ = trained
    losses = [e for e in events if e.kind is Kind.LOSSES]
    assert len(losses) == 3 and [len(e.partial["instance"]) for e in losses] == [1, 2, 3]
    assert all(np.isfinite(e.partial["prior"]).all() for e in losses)
    shown = [e.preview for e in events if e.preview is not None]
    assert shown and shown[0].size == (128, 64)  # token prompt | class prompt
    assert r.losses["instance"] == losses[-1].partial["instance"]


def test_adapter_is_registered_and_reloads_identically(model, trained, probe, tmp_path):
    _, r, _ = trained
    assert model.loras["db_sks"] == str(r.path)
    with lora_applied(model, "db_sks"):
        on = probe()
    load_lora(model, str(r.path), "db_copy")
    try:
        with lora_applied(model, "db_copy"):
            again = probe()
    finally:
        unload_lora(model, "db_copy")
    assert torch.equal(on, again)
    assert not torch.equal(on, trained[2][0])  # it does something


def test_the_file_loads_with_diffusers_load_lora_weights(model, trained, probe):
    _, r, _ = trained
    pipe = type(model.pipe).from_pretrained(model.folder, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(r.path.parent), weight_name=r.path.name, adapter_name="concept")
    g = torch.Generator().manual_seed(11)
    x, cond = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        theirs = pipe.unet(x, 400, encoder_hidden_states=cond).sample
    with lora_applied(model, "db_sks"):
        ours = probe()
    assert torch.allclose(theirs, ours, atol=1e-6)


def test_off_is_the_base_bit_exact_and_smooth_survives(model, trained, probe):
    _, _, (base, smooth_before, before_state) = trained
    assert torch.equal(probe(), base)  # loaded, not applied
    with lora_applied(model, "smooth"):
        assert torch.equal(probe(), smooth_before)
    assert "smooth" in model.loras and "smooth" in adapter_configs(model.unet)
    assert TRAINING_ADAPTER not in adapter_configs(model.unet)
    names, layers, grads = state(model.unet)
    assert names == sorted(before_state[0] + ["db_sks"]) and grads == []
    assert all(disabled for disabled, _ in layers.values())


def test_deleting_the_concept_leaves_smooth_and_base(model, trained, probe, tmp_path):
    _, r, (base, smooth_before, _) = trained
    load_lora(model, str(r.path), "db_tmp")
    unload_lora(model, "db_tmp")
    assert torch.equal(probe(), base)
    with lora_applied(model, "smooth"):
        assert torch.equal(probe(), smooth_before)
    with lora_applied(model, "db_sks"):
        assert not torch.equal(probe(), base)


def test_prior_half_of_the_batch_uses_the_class_prompt(model, smooth, tmp_path):
    """The training UNet call holds the instance items with the instance prompt, then as many class latents with
    the class prompt (the frozen model's samples)."""
    from pipelines.core.text import encode_prompt

    seen = []

    def hook(_module, args, kwargs):
        if torch.is_grad_enabled():
            seen.append(kwargs["encoder_hidden_states"].detach().clone())

    handle = model.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run_to_end(dreambooth(model, images(), params(tmp_path, token="zqx", steps=1, class_prompts=("a red star",))))
    finally:
        handle.remove()
        unload_lora(model, "db_zqx")
    assert len(seen) == 1 and seen[0].shape[0] == 6
    inst, cls = encode_prompt(model, "a zqx circle"), encode_prompt(model, "a red star")
    assert all(torch.equal(seen[0][i], inst[0]) for i in range(3))
    assert all(torch.equal(seen[0][i], cls[0]) for i in range(3, 6))


def test_class_latents_are_cached(model, smooth, tmp_path):
    p = params(tmp_path, token="qjx", steps=1, prior_steps=3, seed=5)
    first = list(dreambooth(model, images(), p))
    second = list(dreambooth(model, images(), p))
    unload_lora(model, "db_qjx")
    assert not any(e.cached for e in first) and any(e.cached and e.stage == "class images" for e in second)


def test_stop_mid_training_leaves_no_adapter_and_no_file(model, smooth, probe, tmp_path):
    base, before, loras = probe(), state(model.unet), dict(model.loras)
    token = CancelToken()
    steps = 0
    with pytest.raises(Cancelled):
        for ev in dreambooth(model, images(), params(tmp_path, token="vzq", steps=50), token):
            if ev.kind is Kind.LOSSES:
                steps += 1
                if steps == 2:
                    token.cancel()
    assert steps == 2
    assert model.loras == loras and state(model.unet) == before and torch.equal(probe(), base)
    assert not list(tmp_path.iterdir())


def test_an_error_while_training_leaves_no_adapter(model, smooth, probe, tmp_path, monkeypatch):
    import pipelines.dreambooth as db

    base, before, loras = probe(), state(model.unet), dict(model.loras)
    calls = []
    real = db.training_step

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*args)

    monkeypatch.setattr(db, "training_step", failing)
    with pytest.raises(RuntimeError):
        run_to_end(dreambooth(model, images(), params(tmp_path, token="vzq", steps=5)))
    assert model.loras == loras and state(model.unet) == before and torch.equal(probe(), base)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("change, fragment", [
    (dict(n=1), "3-5 images"),
    (dict(n=6), "3-5 images"),
    (dict(sizes=True), "different sizes"),
    (dict(token="red"), "already a word"),
    (dict(token="circle"), "class word itself"),
    (dict(token="a b"), "letters or digits"),
    (dict(token=""), "Give an identifier"),
    (dict(token="qzxqzxqzxqzx"), "splits into"),
    (dict(class_word=" "), "Give a class word"),
    (dict(steps=0), "Training steps"),
    (dict(lr=-1), "Learning rate"),
    (dict(instance_prompts=("a circle", "a sks circle", "a sks circle")), "must name the identifier"),
    (dict(class_prompts=("a sks circle",)), "must not name the identifier"),
])
def test_bad_inputs_are_refused_before_any_work(model, smooth, tmp_path, change, fragment, monkeypatch):
    import pipelines.dreambooth as db

    monkeypatch.setattr(db, "encode_instances", lambda *a: pytest.fail("worked before refusing"))
    change = dict(change)
    n, sizes = change.pop("n", 3), change.pop("sizes", False)
    ims = images(n)
    if sizes:
        ims[1] = ims[1].resize((64, 32))
    before = state(model.unet)
    with pytest.raises(InputError) as err:
        run_to_end(dreambooth(model, ims, params(tmp_path, **change)))
    assert fragment in str(err.value)
    assert state(model.unet) == before


def test_identifier_rule_on_a_large_vocabulary():
    """CLIP's vocabulary lists merges by frequency: early whole words are common, late ones (like 'sks') rare."""
    class Tok:
        vocab = {"dog</w>": 1929, "sks</w>": 48136}

        def tokenize(self, text):
            return [text + "</w>"] if text + "</w>" in self.vocab else list(text[:-1]) + [text[-1] + "</w>"]

        def convert_tokens_to_ids(self, piece):
            return self.vocab.get(piece, 100)

    assert check_identifier(Tok(), "SKS", "dog") == "sks"
    with pytest.raises(InputError, match="already a word"):
        check_identifier(Tok(), "dog", "cat")
