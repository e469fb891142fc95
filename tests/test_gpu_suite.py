"""benchmarks/gpu_suite.py: the whole suite runs in --tiny mode on the CPU (the same code as on a GPU, on the tiny
architecture), every figure comes back measured, ratios are the ratios of the reported timings, and a smoke run
never touches the committed results file."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from benchmarks import gpu_suite as suite

RATIOS = {"t2i_step": ("ours", "diffusers"), "preview_overhead": ("on", "off"), "instruct": ("ours", "diffusers")}


def fingerprint(path: Path):
    if not path.exists():
        return None
    return path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


def timings(fig: dict):
    """Every timing a figure reports: keys ending in _s / s_per_step, 'seconds', and the per-round lists."""
    for key, value in fig.items():
        if key == "rounds_s_per_step":
            for xs in value.values():
                yield from ((f"{key}[]", x) for x in xs)
        elif key == "steps_s":
            yield from ((f"{key}[]", x) for x in value)
        elif key.endswith(("_s", "s_per_step")) or key == "seconds":
            yield key, value


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    before = fingerprint(suite.DEFAULT_OUT)
    out = tmp_path_factory.mktemp("gpu_suite") / "x.json"
    import torch

    threads = torch.get_num_threads()
    suite.main(["--tiny", "--out", str(out)])
    assert torch.get_num_threads() == threads  # in-process runs leave the thread setting as they found it
    return json.loads(out.read_text()), before


@pytest.mark.slow
def test_every_figure_is_measured_with_positive_finite_timings(tiny_run):
    report, _ = tiny_run
    assert report["mode"] == "tiny" and report["environment"]["device"] == "cpu"
    assert report["environment"]["torch"] and report["environment"]["diffusers"]
    assert set(report["figures"]) == set(suite.FIGURES)
    for name, fig in report["figures"].items():
        assert fig["status"] == "ok", (name, fig.get("error"), fig.get("traceback"))
        assert "error" not in fig
        found = dict(timings(fig))
        assert found, name
        for key, value in timings(fig):
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, key, value)
    drag = report["figures"]["drag"]
    assert {"lora_s", "inversion_s", "drag_s", "denoise_s", "total_s"} <= set(drag)
    assert drag["peak_gib"] is None  # CUDA's allocator peak only; none on the CPU
    assert report["figures"]["smooth_lora_step"]["timed_steps"] == suite.TINY.train_steps
    assert report["total_wall_s"] > 0 and report["model_build_s"] > 0 and report["model_load_s"] > 0
    assert report["config"]["size"] == 64 and report["config"]["plan"]["name"] == "tiny"


@pytest.mark.slow
def test_ratios_are_the_ratios_of_the_reported_timings(tiny_run):
    report, _ = tiny_run
    for name, (a, b) in RATIOS.items():
        fig = report["figures"][name]
        assert fig["ratio"] == pytest.approx(fig[f"{a}_s_per_step"] / fig[f"{b}_s_per_step"], rel=1e-9)
        for side in (a, b):  # each reported step time is the median of its rounds
            rounds = fig["rounds_s_per_step"][side]
            assert len(rounds) == suite.TINY.rounds
            assert fig[f"{side}_s_per_step"] == pytest.approx(sorted(rounds)[len(rounds) // 2])


def test_a_tiny_run_leaves_the_results_file_alone(tiny_run):
    _, before = tiny_run
    assert fingerprint(suite.DEFAULT_OUT) == before
    import torch

    for device in ("cpu", "cuda"):
        assert suite.default_out(True, torch.device(device)) != suite.DEFAULT_OUT
    assert suite.default_out(False, torch.device("cuda")) == suite.DEFAULT_OUT


def test_errors_are_recorded_and_the_budget_skips_the_rest():
    now = [0.0]

    def clock():
        return now[0]

    def fine(_):
        now[0] += 1
        return {"seconds": 1.0}

    def broken(_):
        now[0] += 1
        raise RuntimeError("out of memory")

    def slow(_):
        now[0] += 100
        return {"seconds": 100.0}

    figures = suite.run_figures({"a": broken, "b": fine, "c": slow, "d": fine}, None, budget_s=50, started=0.0,
                                clock=clock)
    assert figures["a"]["status"] == "error" and figures["a"]["error"] == "RuntimeError: out of memory"
    assert figures["b"] == {"status": "ok", "seconds": 1.0, "wall_s": 1.0}
    assert figures["c"]["status"] == "ok"
    assert figures["d"]["status"] == "skipped" and "budget" in figures["d"]["reason"]


def test_the_full_spec_is_sd15_and_the_instruct_unet_takes_the_image_latent():
    unet, vae, text = (suite.SD15_SPEC[k] for k in ("unet", "vae", "text"))
    assert unet["block_out_channels"] == (320, 640, 1280, 1280) and unet["cross_attention_dim"] == 768
    assert unet["attention_head_dim"] == 8 and unet["layers_per_block"] == 2 and unet["sample_size"] == 64
    assert vae["latent_channels"] == 4 and vae["block_out_channels"] == (128, 256, 512, 512)
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (768, 12, 12)
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    base = UNet2DConditionModel(**suite.TINY_SPEC["unet"])
    instruct = suite.instruct_unet_from(base)
    assert instruct.config.in_channels == 8
    assert torch.equal(instruct.conv_in.weight[:, :4], base.conv_in.weight)
    assert torch.equal(instruct.conv_out.weight, base.conv_out.weight)
