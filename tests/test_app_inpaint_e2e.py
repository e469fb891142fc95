"""End-to-end test of the Inpaint tab (gradio_client against the running app, tiny model, so the latent-blend
fallback): an image and a painted layer in, the inpainted PNG out with its parameters, the pixels outside the
painted cells (and their one-cell margin) unchanged; messages for bad input. The pipeline's own tests
(tests/test_inpaint.py) check the maths."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio_client")
from gradio_client import handle_file  # noqa: E402
from test_app_e2e import app_error, new_client, pixels  # noqa: E402

from app.masks import DISPLAY_SIDE  # noqa: E402

STEPS = 3


@pytest.fixture(scope="module")
def client(app_url, tmp_path_factory):
    return new_client(app_url, tmp_path_factory.mktemp("inpaint_downloads"))


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    rng = np.random.default_rng(3)
    arr = np.full((64, 64, 3), (40, 70, 190), np.uint8)
    arr[10:30, 34:56] = (220, 40, 40)
    arr += rng.integers(0, 25, arr.shape, dtype=np.uint8)
    path = tmp_path_factory.mktemp("inpaint_in") / "picture.png"
    Image.fromarray(arr).save(path)
    return str(path)


def layer(tmp_path, box) -> str:
    """A display-size RGBA layer with an opaque rectangle box=(x0, y0, x1, y1) in display pixels: a brushed region."""
    arr = np.zeros((DISPLAY_SIDE, DISPLAY_SIDE, 4), np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = (255, 40, 200, 255)
    path = tmp_path / "layer.png"
    Image.fromarray(arr, "RGBA").save(path)
    return str(path)


def editor(background=None, layers=()):
    return {"background": handle_file(background) if background else None,
            "layers": [handle_file(p) for p in layers], "composite": None}


def inpaint(client, value, prompt="a red circle", neg="", steps=STEPS, guidance=7.5, strength=1.0, seed=7,
            keep=True, blend=False):
    """-> (preview, inpainted PNG, region shown, status)"""
    return client.predict(value, prompt, neg, steps, guidance, strength, seed, keep, blend, api_name="/inpaint")


def test_inpaint_keeps_everything_outside_the_mask(client, picture, tmp_path):
    # display pixels 64..192 = image pixels 8..24 (x8): latent cells 2..6 of 4 px, grown by one: 4..28 px
    _, result, used, status = inpaint(client, editor(picture, [layer(tmp_path, (64, 64, 192, 192))]))
    assert status.startswith("Done") and "latent blend" in status and "kept exactly" in status, status
    out, src = pixels(result), pixels(picture)
    assert out.shape == (64, 64, 3) and used
    outside = np.ones((64, 64), bool)
    outside[4:28, 4:28] = False
    assert np.array_equal(out[outside], src[outside])
    assert not np.array_equal(out[8:24, 8:24], src[8:24, 8:24])
    with Image.open(result) as im:
        meta = json.loads(im.info["studio"])
    assert meta["task"] == "inpaint" and meta["seed"] == 7 and meta["inpaint_method"] == "latent-blend"
    assert meta["steps"] == STEPS and meta["keep_unmasked"] is True


def test_inpaint_bad_input(client, picture):
    assert "Please upload" in app_error(lambda: inpaint(client, editor()))
    assert "Nothing is painted" in app_error(lambda: inpaint(client, editor(picture)))


def test_inpaint_endpoint_parameters(client):
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    names = [p["parameter_name"] for p in api["/inpaint"]["parameters"]]
    # new inputs are appended, so this positional order stays valid
    assert names == ["editor", "prompt", "neg", "steps", "guidance", "strength", "seed", "keep", "blend"]
