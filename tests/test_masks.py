"""app/masks.py: reading ImageEditor / ImageMask values (painted region, picture, stroke composite) and the
estimated-mask layer written back, without a browser; and pipelines/core/masks.py's cell dilation (grow_cells)."""
from __future__ import annotations

import numpy as np
from PIL import Image

from app import masks
from pipelines.core import masks as pipeline_masks


def rgba(h, w, box=None, colour=(0, 0, 0), alpha=255):
    arr = np.zeros((h, w, 4), np.uint8)
    if box is not None:
        y0, y1, x0, x1 = box
        arr[y0:y1, x0:x1] = (*colour, alpha)
    return arr


def test_painted_is_the_union_of_layer_alphas():
    assert masks.painted(None) is None
    assert masks.painted({"background": None, "layers": [], "composite": None}) is None
    assert masks.painted({"layers": [rgba(8, 8)]}) is None  # a transparent layer paints nothing
    m = masks.painted({"layers": [rgba(8, 8, (0, 2, 0, 2)), rgba(8, 8, (6, 8, 6, 8), alpha=10)]})
    assert m.dtype == bool and m.sum() == 8 and m[0, 0] and m[7, 7] and not m[4, 4]


def test_background_and_blank_canvas():
    assert masks.background({"background": rgba(8, 8)}) is None  # Gradio's empty canvas: fully transparent
    bg = np.zeros((4, 6, 3), np.uint8)
    bg[..., 0] = 200
    img = masks.background({"background": bg})
    assert img.size == (6, 4) and img.getpixel((0, 0)) == (200, 0, 0)


def test_composite_of_strokes_on_a_blank_canvas_is_on_white_paper():
    assert masks.composite({"background": rgba(8, 8), "layers": [rgba(8, 8)], "composite": None}) is None
    value = {"background": None, "layers": [rgba(8, 8, (0, 4, 0, 8), colour=(255, 0, 0))], "composite": None}
    img = np.asarray(masks.composite(value))
    assert (img[:4] == (255, 0, 0)).all() and (img[4:] == 255).all()
    # Gradio's own composite (RGBA, transparent where nothing is) is used when present, also on white
    comp = rgba(8, 8, (0, 8, 0, 4), colour=(0, 0, 255))
    img = np.asarray(masks.composite({"background": None, "layers": [comp], "composite": comp}))
    assert (img[:, :4] == (0, 0, 255)).all() and (img[:, 4:] == 255).all()


def test_display_enlargement_round_trips_exactly():
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8))
    big = masks.enlarge_for_display(small)
    assert big.size == (48 * 8, 64 * 8)
    assert np.array_equal(np.asarray(masks.shrink_display(big, 64)), np.asarray(small))
    large = Image.new("RGB", (700, 500))
    assert masks.enlarge_for_display(large) is large and masks.shrink_display(large, 64) is large


def test_editor_value_draws_the_mask_as_a_translucent_layer():
    img = Image.new("RGB", (64, 64), (0, 255, 0))
    mask = np.zeros((64, 64), bool)
    mask[:, :16] = True
    value = masks.editor_value(img, mask)
    layer = value["layers"][0]
    assert layer.shape == (512, 512, 4) and value["background"].shape == (512, 512, 3)
    assert (layer[:, :128, 3] == masks.OVERLAY_RGBA[3]).all() and (layer[:, 128:, 3] == 0).all()
    back = masks.painted(value)  # what Apply reads is exactly the estimate, at display size
    assert back[:, :128].all() and not back[:, 128:].any()
    assert (value["composite"][:, 128:] == (0, 255, 0)).all()


# --- pipelines/core/masks.py: grow_cells is cv2.dilate with a (2r+1)^2 square ----------------------------------------

def _grow_cells_loop(cells, r=1):
    """The hand-written dilation grow_cells replaced: OR of every shift within r cells (nothing from outside)."""
    out = cells.copy()
    padded = np.pad(cells, r)
    h, w = cells.shape
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= padded[dy:dy + h, dx:dx + w]
    return out


def test_grow_cells_equals_the_shift_loop_on_random_masks():
    rng = np.random.default_rng(0)
    for trial in range(200):
        h, w = rng.integers(1, 40, 2)
        cells = rng.random((h, w)) < rng.choice([0.01, 0.05, 0.2, 0.6])
        r = int(rng.integers(0, 5))
        got = pipeline_masks.grow_cells(cells, r)
        assert got.dtype == bool and got.shape == cells.shape
        assert np.array_equal(got, _grow_cells_loop(cells, r)), (trial, h, w, r)
    # edges and corners grow only inward; the default is one cell; the input is left alone
    cells = np.zeros((5, 6), bool)
    cells[0, 0] = cells[4, 5] = True
    before = cells.copy()
    assert np.array_equal(pipeline_masks.grow_cells(cells), _grow_cells_loop(cells))
    assert pipeline_masks.grow_cells(cells).sum() == 8 and np.array_equal(cells, before)
    assert np.array_equal(pipeline_masks.grow_cells(np.ones((3, 3), bool), 2), np.ones((3, 3), bool))
    assert not pipeline_masks.grow_cells(np.zeros((4, 4), bool), 3).any()
