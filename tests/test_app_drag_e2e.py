"""End-to-end tests (gradio_client against the running app, tiny model) of the Drag tab's endpoint: a drag
with a painted region and without, and clear messages for unpaired or outside points and a missing image.
The pipeline's own tests (tests/test_drag.py) check the algorithm; iteration counts are tiny here."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio_client")
from gradio_client import handle_file  # noqa: E402
from test_app_e2e import app_error, new_client, pixels  # noqa: E402

from app import examples  # noqa: E402
from app.masks import DISPLAY_SIDE  # noqa: E402
from app.tabs.drag import points_view  # noqa: E402
from pipelines.drag.points import HANDLE, TARGET  # noqa: E402

IMAGE, CAPTION = examples.IMAGES[0]


@pytest.fixture(scope="module")
def client(app_url, tmp_path_factory):
    return new_client(app_url, tmp_path_factory.mktemp("drag_downloads"))


def mask_value(layer_path=None):
    return {"background": None, "layers": [handle_file(layer_path)] if layer_path else [], "composite": None}


def drag(client, points, image=IMAGE, mask=None, prompt=CAPTION, lora_steps=2, iters=3, smooth=False, warm=False):
    """-> (preview, original, dragged, status)"""
    return client.predict(handle_file(image) if image else None, points, mask or mask_value(), prompt, lora_steps,
                          4, 5e-4, iters, 0.01, 0.1, 0.7, 1, 1, 3, smooth, warm, api_name="/drag")


def test_drag_whole_image(client):
    _, original, dragged, status = drag(client, [[20, 32], [30, 32]])
    assert status.startswith("Done") and "whole image was editable" in status
    assert pixels(dragged).shape == (64, 64, 3) and pixels(original).shape == (64, 64, 3)


def test_drag_with_a_painted_region(client, tmp_path):
    layer = np.zeros((DISPLAY_SIDE, DISPLAY_SIDE, 4), np.uint8)
    layer[:, : DISPLAY_SIDE // 2] = (255, 40, 200, 255)
    path = tmp_path / "region.png"
    Image.fromarray(layer, "RGBA").save(path)
    _, _, dragged, status = drag(client, [[10, 20], [20, 20]], mask=mask_value(str(path)))
    assert status.startswith("Done") and "whole image" not in status and "warm" not in status
    assert dragged
    # the warm start carries the painted half along: another result from the same (cached) LoRA and inversion
    _, _, warm, status = drag(client, [[10, 20], [20, 20]], mask=mask_value(str(path)), warm=True)
    assert status.startswith("Done") and "warm start" in status and "reused: lora, inversion" in status
    assert not np.array_equal(pixels(warm), pixels(dragged))


def test_warm_start_without_a_region_says_why_it_was_skipped(client):
    _, _, dragged, status = drag(client, [[20, 32], [30, 32]], warm=True)
    assert status.startswith("Done") and "no warm start" in status and dragged


@pytest.mark.parametrize("points, fragment", [
    ([[20, 32]], "needs exactly one target"),
    ([[20, 32], [30, 32], [5, 5]], "needs exactly one target"),
    ([[20, 32], [300, 32]], "outside"),
    ([], "point"),
])
def test_drag_bad_points(client, points, fragment):
    assert fragment in app_error(lambda: drag(client, points)).lower()


def test_drag_without_an_image(client):
    assert "Please upload" in app_error(lambda: drag(client, [[20, 32], [30, 32]], image=None))


def test_points_are_drawn_at_display_scale():
    src = Image.new("RGB", (64, 64), "white")
    shown = np.asarray(points_view(src, [[8, 8], [40, 40]]), dtype=np.int16)
    assert shown.shape == (DISPLAY_SIDE, DISPLAY_SIDE, 3)
    near = lambda colour: np.abs(shown - np.array(colour)).sum(-1) < 30  # noqa: E731
    for colour, (x, y) in ((HANDLE, (8, 8)), (TARGET, (40, 40))):   # model pixels -> 8x on the display
        ys, xs = np.nonzero(near(colour))
        assert len(xs) and abs(xs.mean() - 8 * x - 3.5) < 4 and abs(ys.mean() - 8 * y - 3.5) < 4


def test_generated_image_keeps_its_trajectory(client):
    """Generate then drag the very PNG (as "Send to Drag" does): no LoRA, no inversion, the generation's latents."""
    from test_app_e2e import generate

    _, path, _, status = generate(client, steps=4)
    assert status.startswith("Done")
    _, _, dragged, status = drag(client, [[20, 32], [30, 32]], image=path)
    assert status.startswith("Done") and "trajectory" in status, status
