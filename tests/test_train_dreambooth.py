"""training/train_dreambooth.py on the tiny model: a short run from an instance folder writes the LoRA file (diffusers'
format, loadable by the studio), its sidecar and the loss history; captions.txt is used; bad folders are refused
before any training; the world-heart inputs are four hearts with their captions."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from training import train_dreambooth


def instance_dir(folder, n=3, captions=None, size=(64, 64)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", size, "white")
        im.paste(Image.new("RGB", (20, 20), ("red", "green", "blue", "pink")[i % 4]), (5 + 8 * i, 9 + 5 * i))
        im.save(folder / f"{i}.png")
    if captions:
        (folder / "captions.txt").write_text("\n".join(captions) + "\n")
    return folder


def test_a_short_run_writes_the_adapter_sidecar_and_history(tmp_path):
    caps = ["a zqx circle on the left", "a zqx circle at the top", "a zqx circle in the centre"]
    src = instance_dir(tmp_path / "in", captions=caps)
    out = tmp_path / "out"
    r = train_dreambooth.main(["--instance-dir", str(src), "--token", "zqx", "--class-word", "circle", "--steps", "3",
                               "--prior-images", "2", "--base", "tiny-random", "--out", str(out), "--threads", "1",
                               "--log-every", "1"])
    assert r["path"] == out / "db_zqx.safetensors"
    with safe_open(str(r["path"]), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") and "lora" in k for k in keys)
    info = json.loads((out / "db_zqx.json").read_text())
    assert info["instance_prompts"] == caps and info["prior"] is True and info["steps"] == 3
    assert info["command"] == "training/train_dreambooth.py"
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3] and all(row["prior_loss"] is not None for row in rows)

    # the file loads into the studio as an adapter that changes the UNet
    from pipelines.core.events import run_to_end
    from pipelines.core.lora import load_lora, lora_applied
    from pipelines.core.models import load_model

    model = run_to_end(load_model("tiny-random"))
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        base = model.unet(x, 300, encoder_hidden_states=cond).sample
        load_lora(model, str(r["path"]), "db_zqx")
        with lora_applied(model, "db_zqx"):
            on = model.unet(x, 300, encoder_hidden_states=cond).sample
    assert not torch.equal(on, base)


def test_no_prior_trains_on_the_instances_only(tmp_path):
    src = instance_dir(tmp_path / "in")
    r = train_dreambooth.main(["--instance-dir", str(src), "--class-word", "dog", "--steps", "2", "--no-prior",
                               "--base", "tiny-random", "--out", str(tmp_path / "out"), "--threads", "1"])
    assert r["info"]["prior"] is False and r["info"]["prior_images"] == 0 and r["info"]["final_prior_loss"] is None
    assert r["info"]["token"] == "sks" and r["info"]["instance_prompts"] == ["a sks dog"] * 3


@pytest.mark.parametrize("n, fragment", [(1, "3-5 images"), (6, "3-5 images")])
def test_bad_instance_folders_are_refused(tmp_path, n, fragment):
    src = instance_dir(tmp_path / "in", n=n)
    with pytest.raises(SystemExit, match=fragment):
        train_dreambooth.main(["--instance-dir", str(src), "--class-word", "dog", "--steps", "2", "--base",
                               "tiny-random", "--out", str(tmp_path / "out"), "--threads", "1"])
    assert not (tmp_path / "out").exists()


def test_world_heart_inputs():
    from training import novel_shapes

    images, captions, class_prompts = train_dreambooth.world_heart_inputs("zqx", "circle", 4)
    assert len(images) == 4 and all(im.size == (64, 64) for im in images)
    assert all("zqx circle" in c for c in captions) and len(class_prompts) == 4
    assert all("circle" in c and "zqx" not in c for c in class_prompts)
    import numpy as np

    for im in images:
        (obj,) = novel_shapes.read_objects(np.asarray(im))
        assert obj["shape5"] == "heart"
