"""training/recipe.py: every stage of the embedded-model recipe, run on tiny networks for one or a few steps,
finds what the stage before it wrote and ends in a folder the studio loads; a second run skips finished stages."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from training import recipe


@pytest.mark.slow
def test_the_whole_recipe_runs_on_tiny_networks_and_a_rerun_skips_finished_stages(tmp_path, capsys):
    out = tmp_path / "recipe"
    argv = ["--out", str(out), "--tiny", "--scale", "0.0005", "--threads", "1"]
    with torch.random.fork_rng():
        report = recipe.main(argv)
    assert list(report["timings"]) == [s.name for s in recipe.STAGES]
    assert all(seconds > 0 for seconds in report["timings"].values())
    for stage in recipe.STAGES:
        record = json.loads((out / stage.name / "recipe_done.json").read_text())
        if stage.steps:  # every trainer ran its scaled budget, and at least one step
            state = json.loads((out / stage.name / "checkpoint" / "state.json").read_text())
            assert state["step"] == max(1, round(stage.steps * 0.0005)) and record["resumed"] is False
    # stages that train on the same samples read the first one's latent cache instead of encoding them again
    readers = 0
    for stage in recipe.STAGES:
        if "--data-dir" in stage.args:
            shared = Path(stage.args[stage.args.index("--data-dir") + 1].replace("{out}", str(out)))
            assert any(shared.glob("*.safetensors"))
            if shared.parent != out / stage.name:  # not the stage that made it
                readers += 1
                assert not (out / stage.name / "data").exists()
    assert readers >= 2

    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from pipelines.core.events import run_to_end
    from pipelines.core.models import load_model
    from pipelines.instruct import recommended_guidance

    model = run_to_end(load_model(str(out / "model")))
    assert recommended_guidance(model) == (3.0, 2.0)
    # the last stage's Smooth LoRA is exported into the studio folder and loads with it as adapter "smooth"
    assert (out / "model" / "smooth_lora" / "smooth_lora.safetensors").is_file() and "smooth" in model.loras
    # and the SingDiffusion module into its singdiffusion/, where the studio finds it
    assert model.singdiffusion_source() == out / "model" / "singdiffusion" and model.singdiffusion() is not None
    assert UNet2DConditionModel.from_pretrained(out / "model" / "unet_instruct").config.in_channels == 8
    # and the CoDi adapter into its codi/, where the studio's Fast mode finds it
    assert model.codi() is not None and model.codi_config()["mode"] == "pe"
    # the assembled VAE is the last decoder stage's, on the first stage's encoder
    final_vae = load_file(out / "vae_dec" / "vae" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(model.vae.decoder.conv_out.weight.float().cpu(), final_vae["decoder.conv_out.weight"].float())
    first_vae = load_file(out / "vae" / "vae" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(model.vae.encoder.conv_in.weight.float().cpu(), first_vae["encoder.conv_in.weight"].float())

    capsys.readouterr()
    stamp = (out / "model" / "unet_instruct" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    again = recipe.main(argv)
    printed = capsys.readouterr().out
    assert printed.count("skipped") == len(recipe.STAGES) and again["timings"] == report["timings"]
    assert (out / "model" / "unet_instruct" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp


def test_dry_run_prints_every_stage_with_its_step_budget_and_device(capsys):
    recipe.main(["--out", "/nonexistent/recipe", "--device", "cuda", "--dry-run"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(recipe.STAGES)
    for line, stage in zip(lines, recipe.STAGES):
        assert line.startswith(f"python training/{stage.module}.py")
        if stage.steps:
            assert f"--steps {stage.steps}" in line and "--device cuda" in line
            assert f"--out /nonexistent/recipe/{stage.name}" in line
    assert not Path("/nonexistent/recipe").exists()
    with pytest.raises(SystemExit):  # a misspelt stage is refused before anything runs
        recipe.main(["--out", "/nonexistent/recipe", "--only", "vae,unet_hardd"])


def test_an_interrupted_stage_keeps_its_time_for_the_attempt_that_resumes_it(tmp_path, monkeypatch):
    folder = tmp_path / "stage"
    folder.mkdir()
    partial = folder / "recipe_partial.json"
    with recipe._StageClock(folder, resume=False, every=0.01):  # the beat writes while the stage runs
        deadline = time.time() + 10
        while json.loads(partial.read_text())["seconds"] <= 0 and time.time() < deadline:
            time.sleep(0.01)
        assert json.loads(partial.read_text())["seconds"] > 0
    assert not partial.exists()  # finished: recipe_done.json holds the time from here on

    now = [0.0]
    monkeypatch.setattr(recipe.time, "monotonic", lambda: now[0])
    with pytest.raises(KeyboardInterrupt):
        with recipe._StageClock(folder, resume=False, every=60.0):
            now[0] += 50.0
            raise KeyboardInterrupt
    assert json.loads(partial.read_text())["seconds"] == 50.0
    with recipe._StageClock(folder, resume=True, every=60.0) as clock:  # resumed from its checkpoint
        now[0] += 20.0
    assert clock.earlier == 50.0 and clock.seconds() == 70.0 and not partial.exists()
    partial.write_text(json.dumps({"seconds": 1000.0}))
    with recipe._StageClock(folder, resume=False, every=60.0) as clock:  # no checkpoint: its clock starts over
        now[0] += 5.0
    assert clock.earlier == 0.0 and clock.seconds() == 5.0


def test_the_stage_clock_does_not_charge_a_frozen_process_for_the_time_it_was_stopped(tmp_path, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(recipe.time, "monotonic", lambda: now[0])
    clock = recipe._StageClock(tmp_path, resume=False, every=30.0)
    now[0] += 25.0
    assert clock.seconds() == 25.0
    now[0] += 8 * 3600.0  # suspended overnight between two beats: counted as two beats at most
    assert clock.seconds() == 85.0
    now[0] += 10.0
    assert clock.seconds() == 95.0
