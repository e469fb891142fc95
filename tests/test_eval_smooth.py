"""benchmarks/eval_smooth.py (the "smooth" row group) and benchmarks/smooth_ablation.py on the tiny model: the
batched interpolation frames are the studio's, the ISTD rows are `istd()`'s, a model without a Smooth LoRA gets
the one "missing" row, the group leaves the LoRA switched off, and the ablation runs end to end."""
from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import eval_embedded  # noqa: E402
import eval_smooth  # noqa: E402

from pipelines.core.events import run_to_end  # noqa: E402
from pipelines.core.lora import SMOOTH_NAME, load_lora, lora_applied  # noqa: E402
from pipelines.interpolation import InterpolationParams, adjacent_distances, interpolation_sequence, istd  # noqa: E402

TINY = eval_smooth.Counts(pairs=1, frames=3, t2i=2, inversions=1, edits=1, real_pairs=1, drags=1, steps=2,
                          drag_lora_steps=2)


def write_lora(unet, folder: Path, seed: int) -> Path:
    """A rank-8 peft LoRA on the attention projections of a copy of `unet`, B non-zero, in diffusers' file format."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(unet)
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name="smooth_lora.safetensors")
    return folder / "smooth_lora.safetensors"


@pytest.fixture(scope="module")
def model(_studio_cache):
    """A private tiny model (this module attaches adapters to its UNet)."""
    from pipelines.core.models import load_model

    return run_to_end(load_model("tiny-random"))


@pytest.fixture(scope="module")
def lora_files(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("smooth_loras")
    return [write_lora(model.unet, (root / f"l{k}"), seed=k) for k in range(2)]


@pytest.fixture(scope="module")
def smooth(model, lora_files):
    load_lora(model, str(lora_files[0]), SMOOTH_NAME)
    return model


def unet_probe(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 4, 16, 16, generator=g)
    cond = torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return model.unet(x, 500, encoder_hidden_states=cond).sample


def studio_frames(model, pair: eval_smooth.Pair, n_frames: int, steps: int, lora=None):
    p = InterpolationParams(pair.prompt_a, pair.prompt_b, seed_a=pair.seed_a, seed_b=pair.seed_b, steps=steps,
                            lora=lora)
    res = run_to_end(interpolation_sequence(model, p, n_frames=n_frames))
    return [np.asarray(f.convert("RGB")) for f in res.frames], res.istd


def test_pairs_are_different_held_out_captions_with_their_own_seeds():
    pairs = eval_smooth.interpolation_pairs(5)
    assert all(p.prompt_a != p.prompt_b for p in pairs)
    assert len({s for p in pairs for s in (p.seed_a, p.seed_b)}) == 10
    assert all(len(p.scene_a.objects) == len(p.scene_b.objects) == 1 for p in pairs)
    tuning = eval_smooth.interpolation_pairs(5, eval_smooth.TUNING_INTERP_START)
    assert not {p.prompt_a for p in pairs} & {p.prompt_a for p in tuning}


@pytest.mark.parametrize("lora", [None, SMOOTH_NAME])
@pytest.mark.slow
def test_batched_frames_are_the_studio_frames(smooth, lora):
    model, pairs = smooth, eval_smooth.interpolation_pairs(2)
    with lora_applied(model, lora):  # chunks of 3 frames: batches that straddle the two pairs
        batched = eval_smooth.interpolation_frames(model, pairs, n_frames=4, steps=3, chunk=3)
    for pair, frames in zip(pairs, batched):
        reference, _ = studio_frames(model, pair, 4, 3, lora)
        assert len(frames) == len(reference) == 4
        for ours, theirs in zip(frames, reference):
            assert ours.shape == theirs.shape == (64, 64, 3) and ours.dtype == np.uint8
            assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


@pytest.mark.slow
def test_istd_rows_are_istd_of_the_frames(smooth):
    model, pairs = smooth, eval_smooth.interpolation_pairs(2)
    res = eval_smooth.seed_interpolation(model, pairs, SMOOTH_NAME, n_frames=4, steps=3, keep_frames=True)
    for pair, frames, per in zip(pairs, res["frames"], res["per_pair"]):
        assert per["istd"] == istd(frames)
        assert per["mean_distance"] == pytest.approx(adjacent_distances(frames).mean())
        assert per["end_distance"] == pytest.approx(np.linalg.norm(frames[-1] / 255.0 - frames[0] / 255.0))
        assert len(per["ends_read"]) == 2
        _, studio_istd = studio_frames(model, pair, 4, 3, SMOOTH_NAME)
        assert per["istd"] == pytest.approx(studio_istd, abs=0.02)  # frames within one level of the studio's
    assert res["istd"] == pytest.approx(np.mean([istd(f) for f in res["frames"]]))
    assert res["istd"] > 0


def test_a_model_without_a_smooth_lora_gets_one_row(tiny_model):
    assert SMOOTH_NAME not in tiny_model.loras
    rows = eval_embedded.GROUPS["smooth"](eval_embedded.Context(tiny_model, quick=True))
    assert len(rows) == 1
    assert rows[0].value == 0 and rows[0].target == ">= 1" and rows[0].passed is False


@pytest.mark.slow
def test_the_group_measures_both_and_switches_the_lora_off_again(smooth):
    model = smooth
    base = unet_probe(model)
    with lora_applied(model, SMOOTH_NAME):
        assert not torch.equal(unet_probe(model), base)  # the probe sees the LoRA
    rows = eval_smooth.smooth_rows(eval_embedded.Context(model, quick=True), TINY)
    assert torch.equal(unet_probe(model), base)
    by_name = {(r.group, r.metric): r for r in rows}
    assert len(by_name) == len(rows)
    istd_base = by_name[("smooth seed interp", "ISTD, 3-frame seed interpolation, base")].value
    istd_with = by_name[("smooth seed interp", "ISTD, 3-frame seed interpolation, Smooth LoRA")].value
    ratio = by_name[("smooth seed interp", "ISTD ratio, Smooth LoRA / base")]
    assert ratio.value == pytest.approx(istd_with / istd_base) and ratio.target == "<= 0.5"
    pairs = eval_smooth.interpolation_pairs(TINY.pairs)
    frames = [studio_frames(model, p, TINY.frames, TINY.steps)[0] for p in pairs]
    assert istd_base == pytest.approx(np.mean([istd(f) for f in frames]), abs=0.02)
    groups = {r.group for r in rows}
    assert groups == {"smooth seed interp", "smooth t2i", "smooth inversion", "smooth recolour",
                      "smooth real interp", "smooth drag"}
    assert sum(r.metric.endswith(", base") for r in rows) == sum(r.metric.endswith(", Smooth LoRA") for r in rows)
    assert all(math.isfinite(r.value) for r in rows if "PSNR" not in r.metric)  # PSNR may be inf on identity


@pytest.mark.slow
def test_the_ablation_runs_end_to_end(lora_files, tmp_path):
    import smooth_ablation

    out = tmp_path / "ablation.json"
    report = smooth_ablation.main(["--model", "tiny-random", "--lora", f"lam0={lora_files[0]}", "--lora",
                                   f"lam1={lora_files[1]}", "--pairs", "1", "--frames", "3", "--prompts", "2",
                                   "--steps", "2", "--json", str(out)])
    assert [r["name"] for r in report["results"]] == ["base", "lam0", "lam1"]
    assert json.loads(out.read_text())["results"][1]["name"] == "lam0"
    base, lam0, lam1 = report["results"]
    assert base["istd_ratio"] == 1.0 and lam0["istd"] != base["istd"] != lam1["istd"]
    assert set(base["t2i"]) == {"background", "colour", "shape", "cell"}
    assert report["settings"]["interp_start"] == eval_smooth.TUNING_INTERP_START


def test_the_ablation_refuses_a_model_without_a_smooth_lora_and_no_lora(tmp_path):
    import smooth_ablation

    with pytest.raises(SystemExit):
        smooth_ablation.main(["--model", "tiny-random", "--json", str(tmp_path / "x.json")])
