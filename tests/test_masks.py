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


def test_editor_value_draws_the_mask_as_a_translucent_layer_over_the_clean_picture():
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[8:24, 30:50] = True
    value = masks.editor_value(Image.fromarray(small), mask)
    # the picture is the clean one, enlarged by 8 (nearest): no overlay colour in it, and no composite, which
    # the editor would show in place of the picture
    assert np.array_equal(value["background"], np.repeat(np.repeat(small, 8, axis=0), 8, axis=1))
    assert value["composite"] is None
    layer = value["layers"][0]
    assert layer.shape == (512, 512, 4) and layer.dtype == np.uint8
    inside = np.repeat(np.repeat(mask, 8, axis=0), 8, axis=1)
    assert (layer[inside] == masks.OVERLAY_RGBA).all() and (layer[~inside] == 0).all()
    assert np.array_equal(masks.painted(value), inside)  # what Apply reads is exactly the estimate
    # nothing estimated: one empty layer (it replaces the previous picture's layers in the editor)
    empty = masks.editor_value(Image.fromarray(small), None)
    assert len(empty["layers"]) == 1 and not empty["layers"][0].any() and masks.painted(empty) is None


def test_editor_value_layer_covers_the_editor_canvas_from_the_top_left():
    """The editor loads a layer into a box as large as the picture and its canvas_size together and centres a
    smaller image in it: a layer of exactly that size, painted from the corner, lands on the picture."""
    wide = Image.new("RGB", (64, 32), (10, 20, 30))  # enlarged to 512 x 256 on a 512 x 512 canvas
    mask = np.zeros((32, 64), bool)
    mask[-1, -1] = True  # the picture's bottom-right pixel
    value = masks.editor_value(wide, mask)
    layer = value["layers"][0]
    assert value["background"].shape == (256, 512, 3) and layer.shape == (512, 512, 4)
    assert masks.layer_size((512, 256)) == (512, 512) and masks.layer_size((900, 300), (512, 512)) == (900, 512)
    assert (layer[248:256, 504:512, 3] == masks.OVERLAY_RGBA[3]).all() and layer[..., 3].sum() == 64 * 140
    back = masks.painted(value)  # read at the picture's size: the layer's rows below the picture are dropped
    assert back.shape == (256, 512) and back[248:, 504:].all() and back.sum() == 64
    # a picture larger than the canvas: the layer is the picture's size
    big = masks.editor_value(Image.new("RGB", (900, 600)), np.ones((600, 900), bool), canvas=(512, 512))
    assert big["layers"][0].shape == (600, 900, 4) and big["background"].shape == (600, 900, 3)


def test_painted_reads_canvas_sized_layers_at_the_pictures_size():
    bg = np.zeros((4, 6, 3), np.uint8)
    canvas = rgba(8, 8, (3, 8, 5, 8))  # paint at rows 3.., cols 5..: inside the picture only at (3, 5)
    m = masks.painted({"background": bg, "layers": [canvas]})
    assert m.shape == (4, 6) and m.sum() == 1 and m[3, 5]
    # a layer of the picture's shape at another scale (an API client painting at display size) stays whole
    scaled = rgba(8, 12, (0, 8, 6, 12))
    m = masks.painted({"background": bg, "layers": [scaled, canvas]})
    assert m.shape == (8, 12) and m.sum() == 48 and m[:, 6:].all()


def test_display_value_enlarges_a_small_picture_once():
    small = np.zeros((64, 48, 3), np.uint8)
    small[:, :24] = (200, 10, 10)
    shown = masks.display_value({"background": small, "layers": [rgba(64, 48, (0, 8, 0, 8))], "composite": small})
    assert shown["background"].shape == (512, 384, 3) and shown["composite"] is None
    assert (shown["background"][:, :192] == (200, 10, 10)).all() and (shown["background"][:, 192:] == 0).all()
    assert masks.painted(shown) is None  # paint made on the small picture does not carry over
    assert masks.display_value(shown) is None  # already at display size: the upload event sends nothing back
    assert masks.display_value({"background": np.zeros((600, 700, 3), np.uint8)}) is None
    assert masks.display_value({"background": rgba(8, 8)}) is None and masks.display_value(None) is None


def test_the_brush_paints_the_overlay_colour():
    colour, opacity = masks.OVERLAY_BRUSH
    assert tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5)) == masks.OVERLAY_RGBA[:3]
    assert round(opacity * 255) == masks.OVERLAY_RGBA[3]


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
