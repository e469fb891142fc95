"""End-to-end tests (gradio_client against the running app, tiny model) of the Personalize tab: a short DreamBooth
run through /personalize returns the loss curve, the preview and the two files, and its adapter becomes one of
the model's LoRAs (then removed again: the app's model is shared with other test modules); refusals with the
studio's messages; hosted mode refuses training and leaves the model alone. The training itself is tested in
tests/test_dreambooth.py."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

pytest.importorskip("gradio_client")
from gradio_client import handle_file  # noqa: E402
from test_app_e2e import app_error, new_client  # noqa: E402


@pytest.fixture(scope="module")
def client(app_url, tmp_path_factory):
    return new_client(app_url, tmp_path_factory.mktemp("personalize_downloads"))


@pytest.fixture(scope="module")
def uploads(tmp_path_factory):
    folder = tmp_path_factory.mktemp("personalize_uploads")
    paths = []
    for i, colour in enumerate(("red", "green", "blue", "yellow")):
        im = Image.new("RGB", (64, 64), "white")
        im.paste(Image.new("RGB", (24, 24), colour), (8 + 6 * i, 10 + 4 * i))
        im.save(folder / f"subject_{i}.png")
        paths.append(str(folder / f"subject_{i}.png"))
    Image.new("RGB", (64, 32), "red").save(folder / "wide.png")
    return SimpleNamespace(paths=paths, wide=str(folder / "wide.png"))


def personalize(client, images, token="zqx", class_word="circle", steps=2, prior=True, prior_images=2):
    """-> (preview, loss plot, files, status)"""
    slots = [handle_file(p) for p in images] + [None] * (5 - len(images))
    return client.predict(*slots, token, class_word, steps, prior, prior_images, 1e-4, 4, 0, 1,
                          api_name="/personalize")


def test_training_through_the_tab_loads_a_downloadable_adapter(client, studio, uploads):
    assert "db_zqx" not in studio.model.loras
    try:
        preview, loss, files, status = personalize(client, uploads.paths[:3])
        assert status.startswith("Done") and "db_zqx" in status
        assert "db_zqx" in studio.model.loras
        names = sorted(Path(f).name for f in files)
        assert names == ["db_zqx.json", "db_zqx.safetensors"]
        sidecar = json.loads(Path(next(f for f in files if f.endswith(".json"))).read_text())
        assert sidecar["token"] == "zqx" and sidecar["class_word"] == "circle" and sidecar["steps"] == 2
        assert len(sidecar["instance_images_sha256"]) == 3
        assert preview and Image.open(preview).size == (128, 64)
        assert sorted({row[2] for row in loss["data"]}) == ["instance", "prior"]  # both curves, 2 steps each
        assert len(loss["data"]) == 4
    finally:
        if "db_zqx" in studio.model.loras:
            from pipelines.core.lora import unload_lora

            unload_lora(studio.model, "db_zqx")


@pytest.mark.parametrize("case, fragment", [
    ("one image", "3-5 images"),
    ("sizes", "different sizes"),
    ("vocabulary", "already a word"),
    ("no class", "Give a class word"),
])
def test_bad_inputs_get_the_studios_messages(client, studio, uploads, case, fragment):
    loras = dict(studio.model.loras)
    images = {"one image": uploads.paths[:1], "sizes": [*uploads.paths[:2], uploads.wide]}.get(case,
                                                                                               uploads.paths[:3])
    kwargs = {"vocabulary": dict(token="red"), "no class": dict(class_word="")}.get(case, {})
    assert fragment in app_error(lambda: personalize(client, images, **kwargs))
    assert studio.model.loras == loras


def test_hosted_mode_refuses_training(studio, uploads):
    """A hosted studio's model is every visitor's: the handler refuses before reading an upload."""
    import gradio as gr

    from app.hosting import Hosting
    from app.tabs.personalize import HOSTED_OFF
    from app.ui import build_demo

    demo = build_demo(studio, hosting=Hosting(public=True, models=["tiny-random"]))
    fn = next(b.fn for b in demo.fns.values() if b.api_name == "personalize")
    request = SimpleNamespace(session_hash="hosted-personalize", username=None, client=SimpleNamespace(host="10.9.9.9"),
                              headers={})
    loras = dict(studio.model.loras)
    outputs = []
    try:
        for value in fn(*([{"path": p} for p in uploads.paths[:3]] + [None, None]), "zqx", "circle", 2, True, 2,
                        1e-4, 4, 0, 0, request=request):
            outputs.append(value)
    except gr.Error as exc:
        outputs.append(str(exc))
    text = json.dumps(outputs, default=str)
    assert HOSTED_OFF[:60] in text
    assert studio.model.loras == loras
