"""End-to-end tests (gradio_client against the running app, tiny model) of the Instruct, DiffEdit and SDEdit
tabs: their endpoints, values written back (seed, CFG), the editor values (painted layers, the estimated mask
layer), messages for bad input. The pipelines' own tests check the maths; steps are kept tiny here."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio_client")
from gradio_client import handle_file  # noqa: E402
from test_app_e2e import app_error, new_client, pixels  # noqa: E402

from app import examples  # noqa: E402
from app.masks import DISPLAY_SIDE  # noqa: E402

IMAGE, INSTRUCTION = examples.INSTRUCTIONS[0]
D_IMAGE, D_TARGET, D_SOURCE = examples.DIFFEDITS[0]
STROKES, S_PROMPT, _ = examples.SDEDITS[0]
STEPS = 3


@pytest.fixture(scope="module")
def client(app_url, tmp_path_factory):
    return new_client(app_url, tmp_path_factory.mktemp("editing_downloads"))


def meta(path) -> dict:
    with Image.open(path) as im:
        return json.loads(im.info["studio"])


def instruct(client, image=IMAGE, text=INSTRUCTION, steps=STEPS, seed_mode="Fix seed", seed=5, cfg_mode="Fix CFG",
             text_g=7.5, image_g=1.5, scheduler="euler_a"):
    """-> (preview, edited, seed used, sT used, sI used, status)"""
    return client.predict(handle_file(image) if image else None, text, steps, seed_mode, seed, cfg_mode, text_g,
                          image_g, scheduler, api_name="/instruct")


def editor(background=None, layers=()):
    return {"background": handle_file(background) if background else None,
            "layers": [handle_file(p) for p in layers], "composite": None}


def layer_file(tmp_path, box, size=(DISPLAY_SIDE, DISPLAY_SIDE), name="layer.png") -> str:
    """An RGBA layer, transparent except an opaque black rectangle box=(x0, y0, x1, y1): a brushed region."""
    arr = np.zeros((size[1], size[0], 4), np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = (0, 0, 0, 255)
    path = tmp_path / name
    Image.fromarray(arr, "RGBA").save(path)
    return str(path)


def diffedit_settings(target=D_TARGET, source=D_SOURCE, threshold=0.5, ratio=0.8, mask_strength=0.5, draws=2,
                      seed=0, steps=STEPS, guidance=7.5):
    return (target, source, threshold, ratio, mask_strength, draws, seed, steps, guidance)


def sdedit(client, canvas, prompt=S_PROMPT, neg="", strength=0.6, steps=5, guidance=7.5, seed=3, repeats=1,
           keep=False):
    """-> (preview, gallery, status)"""
    return client.predict(canvas, prompt, neg, strength, steps, guidance, seed, repeats, keep, api_name="/sdedit")


# ------------------------------------------------------------------------------------------ Instruct
def test_instruct_edits_and_writes_back_the_values_used(client):
    _, edited, seed, text_g, image_g, status = instruct(client)
    assert status.startswith("Done") and (seed, text_g, image_g) == (5, 7.5, 1.5)
    m = meta(edited)
    assert m["instruction"] == INSTRUCTION and m["seed"] == 5 and m["scheduler"] == "euler_a"
    again = instruct(client)
    assert np.array_equal(pixels(again[1]), pixels(edited))  # fixed seed: the same edit


def test_instruct_randomize_seed_and_cfg(client):
    _, edited, seed, text_g, image_g, status = instruct(client, seed_mode="Randomize seed", seed=5,
                                                        cfg_mode="Randomize CFG", steps=1)
    assert status.startswith("Done")
    assert 0 <= seed <= 100_000 and 6.0 <= text_g <= 9.0 and 1.2 <= image_g <= 1.8
    m = meta(edited)
    assert (m["seed"], m["text_guidance"], m["image_guidance"]) == (seed, text_g, image_g)


@pytest.mark.parametrize("image_g, text_g", [(0.0, 0.0), (5.0, 20.0), (0.5, 7.5)])
def test_instruct_guidance_range_ends_are_well_defined(client, image_g, text_g):
    _, edited, *_, status = instruct(client, image_g=image_g, text_g=text_g, steps=2, scheduler="ddim")
    assert status.startswith("Done") and np.isfinite(pixels(edited)).all()


def test_instruct_empty_instruction_returns_the_input(client):
    _, edited, *_, status = instruct(client, text="  ")
    assert "unchanged" in status
    assert np.array_equal(pixels(edited), np.asarray(Image.open(IMAGE).convert("RGB")))  # 64 px in, same out


def test_instruct_without_an_image(client):
    assert "Please upload" in app_error(lambda: instruct(client, image=None))


# ------------------------------------------------------------------------------------------ DiffEdit
def test_diffedit_mask_then_edit_with_a_painted_mask(client, tmp_path):
    value, heat, status = client.predict(editor(D_IMAGE), *diffedit_settings(), api_name="/diffedit_mask")
    assert status.startswith("Mask estimated")
    assert value["layers"] and value["background"], value  # the estimate comes back as an editable layer
    layer = value["layers"][0]
    with Image.open(layer["path"] if isinstance(layer, dict) else layer) as im:
        assert im.mode == "RGBA" and im.size == (DISPLAY_SIDE, DISPLAY_SIDE)
        alpha = np.asarray(im)[..., 3]
    assert 0 < (alpha > 0).mean() < 1 and set(np.unique(alpha)) <= {0, 140}  # translucent, sent losslessly
    assert heat
    painted = layer_file(tmp_path, (0, 0, DISPLAY_SIDE // 2, DISPLAY_SIDE))  # the left half, by hand
    _, edited, used, status = client.predict(editor(D_IMAGE, [painted]), *diffedit_settings(), api_name="/diffedit")
    assert status.startswith("Done with your mask") and "50%" in status
    assert pixels(edited).shape == (64, 64, 3) and used


def test_diffedit_without_a_painted_mask_estimates_one(client):
    _, edited, used, status = client.predict(editor(D_IMAGE), *diffedit_settings(), api_name="/diffedit")
    assert "estimated mask" in status and edited


def test_diffedit_bad_input(client):
    assert "Please upload" in app_error(lambda: client.predict(editor(), *diffedit_settings(),
                                                               api_name="/diffedit"))
    msg = app_error(lambda: client.predict(editor(D_IMAGE), *diffedit_settings(target=" "), api_name="/diffedit"))
    assert "target prompt" in msg.lower()


# ------------------------------------------------------------------------------------------ SDEdit
def test_sdedit_candidates(client):
    _, gallery, chosen, status = sdedit(client, editor(STROKES), repeats=2)
    assert status.startswith("Done") and "2 candidate" in status
    assert len(gallery) == 2
    seeds = [item["caption"] for item in gallery]
    assert seeds == ["seed 3", "seed 4"]
    first = gallery[0]["image"]
    assert np.array_equal(pixels(chosen), pixels(first["path"] if isinstance(first, dict) else first))


def test_sdedit_keep_unpainted_regions(client, tmp_path):
    strokes = layer_file(tmp_path, (0, 0, 192, 192))  # top-left corner painted black
    _, gallery, _, status = sdedit(client, editor(STROKES, [strokes]), keep=True)
    assert status.startswith("Done")
    item = gallery[0]["image"]
    out = pixels(item["path"] if isinstance(item, dict) else item)
    guide = np.asarray(Image.open(STROKES).convert("RGB").resize((64, 64), Image.Resampling.BOX))
    far = (slice(40, 64), slice(40, 64))  # well outside the painted corner and its dilation
    assert np.array_equal(out[far], guide[far])


def test_sdedit_bad_input(client):
    assert "blank" in app_error(lambda: sdedit(client, editor()))
    assert "Nothing is painted" in app_error(lambda: sdedit(client, editor(STROKES), keep=True))
    assert "prompt" in app_error(lambda: sdedit(client, editor(STROKES), prompt="")).lower()
