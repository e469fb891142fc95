"""Trainers of the embedded model (training/train_unet.py, train_instruct.py, assemble.py) on tiny networks:
stop and resume, safetensors-only outputs, a folder the studio's loader reads like any SD1.5 checkout, the
InstructPix2Pix UNet's zero-initialised extra channels, and the world tokenizer."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train_vae import Stop, optimizer_state, stopped_after_checkpoint, tensors_equal  # checkpoint helpers

from training import schedule, train_instruct, train_unet, world

TINY = ["--tiny", "--threads", "1", "--batch", "4", "--samples", "48", "--checkpoint-every", "2",
        "--eval-every", "1000", "--no-progress"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_model):
    """A tiny base model: 2 steps, then --resume to 3. Latents come from the tiny test model's VAE."""
    out = tmp_path_factory.mktemp("unet_run")
    vae = str(tiny_model.folder / "vae")
    with torch.random.fork_rng():
        train_unet.main(["--out", str(out), "--vae", vae, "--steps", "2", *TINY])
        weights_2 = load_file(out / "checkpoint" / "model.safetensors")
        report = train_unet.main(["--out", str(out), "--vae", vae, "--steps", "3", "--resume", *TINY])
    return out, report, weights_2


@pytest.mark.slow
def test_unet_run_resumes_and_exports_a_loadable_sd_folder(base_run):
    from pipelines.core.events import run_to_end
    from pipelines.core.models import load_model

    out, report, weights_2 = base_run
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert report["step"] == state["step"] == 3
    assert state["models"] == {"unet": "model.safetensors", "text_encoder": "model_1.safetensors"}
    weights_3 = load_file(out / "checkpoint" / "model.safetensors")
    assert any(not torch.equal(weights_2[k], weights_3[k]) for k in weights_2)
    assert "conv_in.weight" in weights_3 and any(k.endswith("token_embedding.weight") for k in load_file(
        out / "checkpoint" / "model_1.safetensors"))
    optimizer = optimizer_state(out)
    assert {float(v["step"]) for v in optimizer["state"].values()} == {3.0}
    assert {p.suffix for p in out.rglob("*") if p.is_file() and "checkpoint" not in p.parts} <= {
        ".safetensors", ".json", ".jsonl", ".txt"}
    model = run_to_end(load_model(str(out / "model")))
    assert not model.random_weights and "embedded" in model.label
    assert model.unet.config.cross_attention_dim == model.text_encoder.config.hidden_size
    sched = model.scheduler_config
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"], sched["num_train_timesteps"]) == (
        0.00085, 0.012, "scaled_linear", 1000)
    data = load_file(out / "data" / "latents.safetensors")
    assert data["latents"].shape == (48, 4, 16, 16) and data["ids"].shape == (48, 77)


@pytest.mark.slow
def test_a_unet_run_stopped_mid_way_resumes_and_ends_where_an_uninterrupted_run_ends(tiny_model, tmp_path,
                                                                                      monkeypatch):
    """Killed after its step-2 checkpoint of a 4-step budget, then resumed: the same UNet, text encoder, Adam state and
    exported (EMA) model as the run that was never stopped."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    argv = ["--vae", str(tiny_model.folder / "vae"), *TINY, "--steps", "4", "--data-dir", str(tmp_path / "data")]
    with torch.random.fork_rng():
        train_unet.main(["--out", str(whole), *argv])
    with torch.random.fork_rng(), monkeypatch.context() as m:
        stopped_after_checkpoint(m, train_unet, 2)
        with pytest.raises(Stop):
            train_unet.main(["--out", str(parts), *argv])
    with torch.random.fork_rng():
        train_unet.main(["--out", str(parts), *argv, "--resume"])
    for name in ("checkpoint/model.safetensors", "checkpoint/model_1.safetensors",
                 "model/unet/diffusion_pytorch_model.safetensors", "model/text_encoder/model.safetensors"):
        a, b = load_file(whole / name), load_file(parts / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert tensors_equal(optimizer_state(whole), optimizer_state(parts))
    # the export holds the EMA weights, not the last ones
    live, ema = load_file(whole / "checkpoint/model.safetensors"), load_file(
        whole / "model/unet/diffusion_pytorch_model.safetensors")
    assert not torch.equal(live["conv_in.weight"], ema["conv_in.weight"])


def test_world_tokenizer_keeps_world_words_whole_and_still_splits_unknown_words(base_run):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(base_run[0] / "model" / "tokenizer")
    for word in ("circle", "triangle", "purple", "background", "remove", "gradient", "textured", "bottom"):
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    pieces = tok("zebra giraffe", add_special_tokens=False).input_ids
    assert len(pieces) > 2 and tok.unk_token_id not in pieces
    assert tok.decode(pieces) == "zebra giraffe"
    words = set(train_unet.world_words(200))
    assert {"red", "circle", "left", "background", "make", "turn"} <= words


def test_instruct_unet_starts_as_the_base_model(base_run):
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(base_run[0] / "model" / "unet").eval()
    unet = train_instruct.instruct_unet_from(base).eval()
    assert unet.config.in_channels == 8 and unet.conv_in.weight[:, 4:].abs().sum() == 0
    x, image = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    emb = torch.randn(2, 77, base.config.cross_attention_dim)
    with torch.no_grad():
        expected = base(x, 500, encoder_hidden_states=emb).sample
        got = unet(torch.cat([x, image], 1), 500, encoder_hidden_states=emb).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_instruct_run_and_assembly_give_one_folder_under_budget(base_run, tmp_path):
    from diffusers import UNet2DConditionModel

    from training import assemble

    base = base_run[0] / "model"
    out = tmp_path / "instruct"
    with torch.random.fork_rng():
        report = train_instruct.main(["--out", str(out), "--base", str(base), "--steps", "2", "--threads", "1",
                                      "--batch", "4", "--samples", "16", "--eval-every", "1000", "--no-progress"])
    assert report["step"] == 2
    rest, first = optimizer_state(out)["param_groups"]  # conv_in (the image's only way in) learns 10x faster
    assert len(first["params"]) == 2 and first["lr"] == pytest.approx(10 * rest["lr"]) and rest["lr"] > 0
    assert json.loads((out / "checkpoint" / "state.json").read_text())["lr"] == [rest["lr"], first["lr"]]
    triplets = load_file(out / "data" / "triplets.safetensors")
    assert triplets["source"].shape == triplets["target"].shape == (16, 4, 16, 16)
    folder = tmp_path / "model"
    assembled = assemble.main(["--base", str(base), "--instruct", str(out / "unet"), "--out", str(folder),
                               "--instruct-guidance", "3,2.5"])
    assert assembled["safetensors_mb"] <= assemble.BUDGET_MB
    from pipelines.core.events import run_to_end
    from pipelines.core.models import load_model
    from pipelines.instruct import recommended_guidance

    assert recommended_guidance(run_to_end(load_model(str(folder)))) == (3.0, 2.5)  # what the studio reads
    unet = UNet2DConditionModel.from_pretrained(folder / "unet_instruct")
    assert unet.config.in_channels == 8
    stored = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in stored.values()} == {torch.float16}
    with pytest.raises(SystemExit):  # a VAE with another encoder would change every latent the UNet learned
        assemble.main(["--base", str(base), "--vae", str(_other_vae(tmp_path)), "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def _other_vae(tmp_path):
    from training.train_vae import TINY_ARCH, build_vae

    torch.manual_seed(123)
    path = tmp_path / "other_vae"
    build_vae(TINY_ARCH).save_pretrained(path)
    return path


def test_edit_triplets_come_from_training_seeds_only(monkeypatch, tmp_path, tiny_model):
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    from training.evaluation import encode

    seeds = []
    real = world.sample_scene

    def spy(seed, size=64, *args, **kwargs):
        seeds.append(seed)
        return real(seed, size, *args, **kwargs)

    monkeypatch.setattr(world, "sample_scene", spy)
    vae = AutoencoderKL.from_pretrained(tiny_model.folder / "vae")
    tok = CLIPTokenizer.from_pretrained(tiny_model.folder / "tokenizer")
    data = train_instruct.build_data(tmp_path, vae, tok, 20, seed=0, progress=False)
    assert len(seeds) == 20 and all(0 <= s < world.HELD_OUT_SEED for s in seeds)
    # Input latents are unscaled (diffusers' IP2P input form); targets carry the scaling factor.
    factor = vae.config.scaling_factor
    first = world.render(real(seeds[0]))[None]
    torch.testing.assert_close(data["source"][:1].float(), encode(vae, first, scaled=False), atol=2e-3, rtol=1e-2)
    assert factor != 1.0


def test_a_checkpoint_without_the_pooled_text_embedding_resumes_unchanged():
    """The committed UNet gained addition_embed_type="text" mid-run; loading the older state must leave
    the network's output exactly as it was (the new path starts at zero)."""
    import argparse

    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    _, grown = train_unet.build_models(argparse.Namespace(tiny=True), 600)
    config = {k: v for k, v in grown.config.items() if not k.startswith("addition_embed_type")}
    old = UNet2DConditionModel.from_config(config).eval()
    new = set(train_unet._load_grown(grown.eval(), old.state_dict()))
    assert new == {"norm1", "pool", "proj", "norm2"}
    x, emb = torch.randn(2, 4, 16, 16), torch.randn(2, 77, grown.config.cross_attention_dim)
    with torch.no_grad():
        torch.testing.assert_close(grown(x, 300, encoder_hidden_states=emb).sample,
                                   old(x, 300, encoder_hidden_states=emb).sample)
    with pytest.raises(RuntimeError):
        train_unet._load_grown(grown, {"conv_in.weight": torch.zeros(1)})


@pytest.mark.slow
def test_unet_on_a_frozen_pretrained_text_encoder_starts_from_the_given_unet(base_run, tiny_model, tmp_path):
    """train_text.py's encoder is used as it is (SD's frozen-CLIP recipe) and --init-unet warm-starts the UNet:
    at learning rate 0 the exported model is exactly the two inputs."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from training import train_text

    text_run = tmp_path / "text"
    with torch.random.fork_rng():
        train_text.main(["--out", str(text_run), "--tiny", "--steps", "3", "--threads", "1", "--batch", "8",
                         "--no-progress"])
        out = tmp_path / "unet"
        train_unet.main(["--out", str(out), "--vae", str(tiny_model.folder / "vae"), "--steps", "2", "--lr", "0",
                         "--text-encoder", str(text_run), "--init-unet", str(base_run[0] / "model" / "unet"), *TINY])
    assert not (out / "checkpoint" / "model_1.safetensors").exists()  # the frozen encoder is not checkpointed
    exported = CLIPTextModel.from_pretrained(out / "model" / "text_encoder").state_dict()
    frozen = CLIPTextModel.from_pretrained(text_run / "text_encoder").state_dict()
    assert all(torch.equal(exported[k], frozen[k]) for k in frozen)
    start = UNet2DConditionModel.from_pretrained(base_run[0] / "model" / "unet").state_dict()
    got = UNet2DConditionModel.from_pretrained(out / "model" / "unet").state_dict()
    assert all(torch.equal(got[k], start[k]) for k in start)


def test_object_maps_mark_the_latent_pixels_each_cached_scene_touches(tmp_path):
    maps = train_unet.build_object_maps(tmp_path, 6, seed=0)
    assert maps.shape == (6, 16, 16) and set(maps.unique().tolist()) <= {0.0, 1.0}
    scenes = [s for _, _, s in world.dataset(0, 6, 64, split="train")]  # build_data's scenes for seed 0
    for m, scene in zip(maps, scenes):
        for obj in scene.objects:
            cx, cy = (int(c // 4) for c in obj.centre)
            assert m[cy, cx] == 1
        if not scene.objects:
            assert m.sum() == 0
        else:  # objects are a small part of the latent: that is why they get extra weight
            assert 0 < m.float().mean() < 0.6
    assert torch.equal(train_unet.build_object_maps(tmp_path, 6, seed=0), maps)  # read back from the cache
    # Another seed means other scenes: the cache must not be handed back for them (it is rebuilt and replaced).
    other = train_unet.build_object_maps(tmp_path, 6, seed=1)
    expect = torch.stack([train_unet.object_map([s]) for _, s in train_unet.training_scenes(6, seed=1)])
    assert torch.equal(other, expect) and not torch.equal(other, maps)
    assert schedule.load_cache(tmp_path / "object_maps.safetensors", "maps", 6, seed=0) is None
    assert schedule.load_cache(tmp_path / "object_maps.safetensors", "maps", 6, seed=1) is not None


def test_a_shared_latent_cache_is_reused_only_for_the_encoder_and_tokenizer_that_made_it(tmp_path, tiny_model):
    """Stages that pass the same --data-dir skip encoding; another VAE encoder (or tokenizer) rebuilds the cache
    instead of handing back latents of another latent space."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(tiny_model.folder / "vae")
    tok = CLIPTokenizer.from_pretrained(tiny_model.folder / "tokenizer")
    first = train_unet.build_data(tmp_path, vae, tok, 8, seed=0, progress=False)
    calls = []
    real = train_unet.evaluation.encode
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_unet.evaluation, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
        again = train_unet.build_data(tmp_path, vae, tok, 8, seed=0, progress=False)
        assert not calls and torch.equal(again["latents"], first["latents"])
        other = AutoencoderKL.from_pretrained(tiny_model.folder / "vae")
        with torch.no_grad():
            other.encoder.conv_in.weight.mul_(1.5)  # another encoder: a different latent space
        rebuilt = train_unet.build_data(tmp_path, other, tok, 8, seed=0, progress=False)
        assert calls and not torch.equal(rebuilt["latents"], first["latents"])
        torch.testing.assert_close(rebuilt["latents"][:2].float(),
                                   real(other, np.stack([im for im, _, _ in world.dataset(0, 2, 64, split="train")])),
                                   atol=2e-3, rtol=1e-2)
    # the decoder is not part of the cache's identity: a decoder-only stage keeps the cache valid
    decoder_tuned = AutoencoderKL.from_pretrained(tiny_model.folder / "vae")
    with torch.no_grad():
        decoder_tuned.decoder.conv_out.weight.mul_(2.0)
    assert schedule.cache_source(decoder_tuned, tok) == schedule.cache_source(vae, tok)
    assert schedule.cache_source(other, tok) != schedule.cache_source(vae, tok)


def test_object_weight_moves_the_loss_to_the_weighted_pixels():
    """Uniform pixel weights give the plain loss; weights on one region give that region's error."""
    torch.manual_seed(0)
    alphas = torch.linspace(0.99, 0.01, 1000)
    z0, ids = torch.randn(2, 4, 8, 8), torch.zeros(2, 3, dtype=torch.long)

    class Unet(torch.nn.Module):  # predicts zero noise except a bias where it is told to be wrong
        def forward(self, x, t, encoder_hidden_states):
            return type("Out", (), {"sample": torch.zeros_like(x)})()

    def text(ids):
        return torch.zeros(len(ids), 3, 4)

    def loss(weight):
        with torch.random.fork_rng():
            torch.manual_seed(1)
            return train_unet.diffusion_loss(Unet(), text, alphas, z0, ids, pixel_weight=weight)

    plain = loss(None)
    torch.testing.assert_close(loss(torch.full((2, 8, 8), 3.0)), plain)
    corner = torch.zeros(2, 8, 8)
    corner[:, :2, :2] = 1
    with torch.random.fork_rng():  # the noise the loss draws: with a zero prediction the error is noise^2
        torch.manual_seed(1)
        _, _, noise = train_unet.noised(z0, alphas, 0.0)
    expect = noise[:, :, :2, :2].pow(2).mean()
    torch.testing.assert_close(loss(corner), expect)
    assert not torch.allclose(loss(corner), plain)


def test_instruct_object_maps_cover_every_object_edit_and_follow_the_cache_order(tmp_path):
    import torch.nn.functional as F

    maps = train_instruct.build_object_maps(tmp_path, 12, seed=0)
    pairs = list(train_instruct._triplet_stream(12, seed=0))
    assert maps.shape == (12, 16, 16)
    for m, (scene, edit) in zip(maps, pairs):
        changed = torch.from_numpy((world.render(scene) != world.render(edit.scene)).any(-1)).float()
        changed = F.max_pool2d(changed[None, None], 4)[0, 0] > 0
        if edit.kind != "background":  # the edit itself is on objects: all of it is weighted
            assert bool(m[changed].all()), edit.kind
        else:  # the objects that must survive a background change are weighted, not the background
            assert 0 < m.float().mean() < 0.6 and not bool(m[changed].all())


@pytest.mark.slow
def test_oversample_draws_the_named_shapes_more_often(tiny_model, tmp_path):
    """--oversample star=3,small-square=2: a scene with a star is drawn 3x as often as one without a named
    object; bad names are refused; a short run with it trains and exports."""
    import numpy as np

    scenes = [scene for _, _, scene in world.dataset(0, 400, 64, split="train")]
    p = train_unet.draw_weights(scenes, train_unet.parse_factors("star=3,small-square=2"))
    factor = np.array([3.0 if any(o.shape == "star" for o in s.objects) else
                       2.0 if any((o.shape, o.size) == ("square", "small") for o in s.objects) else 1.0
                       for s in scenes])
    assert {2.0, 3.0, 1.0} <= set(factor) and np.allclose(p, factor / factor.sum())
    for bad in ("hexagon=2", "huge-star=2", "star"):
        with pytest.raises(ValueError):
            train_unet.parse_factors(bad)
    report = train_unet.main(["--out", str(tmp_path), "--vae", str(tiny_model.folder / "vae"), "--steps", "1",
                              "--oversample", "star=3", *TINY])
    assert report["step"] == 1


def test_condition_dropout_and_edit_kind_oversampling():
    """One draw per sample picks: instruction dropped, both dropped, image dropped, or none; the cached batch
    is not written into. --oversample background=2 doubles the draw probability of background triplets."""
    import numpy as np

    u = torch.tensor([0.02, 0.07, 0.12, 0.9])  # text only / both / image only / nothing
    emb, image, empty = torch.randn(4, 3, 5), torch.randn(4, 4, 2, 2), torch.zeros(3, 5)
    originals = emb.clone(), image.clone()
    e, im = train_instruct.apply_dropout(u, emb, image, empty)
    assert [bool((e[i] == 0).all()) for i in range(4)] == [True, True, False, False]
    assert [bool((im[i] == 0).all()) for i in range(4)] == [False, True, True, False]
    torch.testing.assert_close(e[2:], emb[2:])
    torch.testing.assert_close(im[3], image[3])
    assert torch.equal(originals[0], emb) and torch.equal(originals[1], image)

    kinds = [edit.kind for _, edit in train_instruct._triplet_stream(200, seed=0)]
    p = train_instruct.kind_weights(kinds, "background=2")
    factor = np.array([2.0 if k == "background" else 1.0 for k in kinds])
    assert "background" in kinds and np.allclose(p, factor / factor.sum())
    assert train_instruct.kind_weights(kinds, "") is None
    for bad in ("sky=2", "background", "background=x", "background=0"):
        with pytest.raises(ValueError):
            train_instruct.kind_weights(kinds, bad)


def test_frozen_text_states_are_the_encoders_states_computed_once_per_distinct_caption(tiny_model):
    """The UNet and InstructPix2Pix trainers look frozen text states up instead of encoding every batch: the same
    states as the encoder gives, one entry per distinct row, and a row it was not built with is refused."""
    from transformers import CLIPTextModel

    from training.text_states import FrozenTextStates

    encoder = CLIPTextModel.from_pretrained(tiny_model.folder / "text_encoder").eval()
    vocab = encoder.config.vocab_size
    rows = torch.randint(0, vocab, (5, 77), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([rows, rows[[0, 3, 3]]])  # 8 rows, 5 distinct
    states = FrozenTextStates(encoder, ids, "cpu", batch=2)
    assert len(states) == 5
    pick = ids[[7, 1, 5, 1]]
    with torch.no_grad():
        expect = encoder(pick)[0]
    torch.testing.assert_close(states(pick), expect, rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="not built with"):
        states(torch.randint(0, vocab, (1, 77), generator=torch.Generator().manual_seed(1)))

