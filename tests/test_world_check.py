"""looks_like_world: the embedded model's world (renders, and renders with decoder-like noise) against photos
(scikit-image's bundled samples, colour and grey) and noise textures."""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from PIL import Image

from pipelines.core.world_check import looks_like_world, world_likeness
from training.world import render, sample_scene


def _rgb(array) -> Image.Image:
    a = np.asarray(array)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    return Image.fromarray(a[..., :3].astype(np.uint8))


@pytest.mark.parametrize("kind", ["solid", "gradient", "textured"])
def test_world_renders_look_like_the_world(kind):
    renders = [render(sample_scene(seed, background_kind=kind)) for seed in range(40)]
    assert all(looks_like_world(_rgb(r)) for r in renders)


def test_the_world_with_faint_noise_and_at_other_sizes_still_does():
    rng = np.random.default_rng(0)
    for seed in range(40):
        r = render(sample_scene(100 + seed)).astype(np.float64)
        noisy = _rgb(np.clip(r + rng.normal(0, 2, r.shape), 0, 255))   # the decoder's faint noise
        assert looks_like_world(noisy), seed
        big = _rgb(r).resize((512, 512), Image.Resampling.BICUBIC)      # an upscaled result, as downloaded
        assert looks_like_world(big), seed


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "camera"])
def test_photos_do_not(name):
    photo = _rgb(getattr(skimage.data, name)())
    assert not looks_like_world(photo), world_likeness(photo)
    h, w = photo.height, photo.width
    crop = photo.crop((w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    assert not looks_like_world(crop), world_likeness(crop)


def test_noise_textures_do_not_and_flat_colour_does():
    rng = np.random.default_rng(1)
    assert not looks_like_world(_rgb(rng.integers(0, 256, (128, 128, 3))))
    smooth = cv2_blur(rng.normal(0, 1, (256, 256, 3)))
    assert not looks_like_world(_rgb(smooth))
    flat = np.zeros((64, 64, 3), np.uint8)
    flat[:] = (30, 200, 90)
    flat[20:40, 10:30] = (250, 250, 250)
    assert looks_like_world(_rgb(flat)) and world_likeness(_rgb(flat)) == 1.0


def cv2_blur(noise):
    """Natural-looking colour texture: blurred noise stretched to the full range."""
    import cv2

    f = cv2.GaussianBlur(noise.astype(np.float32), (0, 0), 3)
    return (f - f.min()) / (f.max() - f.min()) * 255


# ------------------------------------------------------------------------------------------ the note in the UI
class _Model:
    def __init__(self, id):
        self.id = id


def test_the_note_shows_for_photos_on_the_embedded_model_only(tmp_path):
    from app.world_note import PHOTO_NOTE, note_for

    photo = tmp_path / "photo.jpg"
    _rgb(skimage.data.chelsea()).save(photo)
    world = render(sample_scene(7))
    assert note_for(_Model("embedded"), str(photo)) == PHOTO_NOTE
    assert "Load an SD1.5 model in 'Model and LoRA'" in PHOTO_NOTE
    assert note_for(_Model("embedded"), world) == ""
    assert note_for(_Model("stable-diffusion-v1-5/stable-diffusion-v1-5"), str(photo)) == ""
    # an editor's value: its background is the upload
    rgba = np.dstack([np.asarray(_rgb(skimage.data.astronaut())), np.full((512, 512), 255, np.uint8)])
    assert note_for(_Model("embedded"), {"background": rgba, "layers": [], "composite": rgba}) == PHOTO_NOTE
    assert note_for(_Model("embedded"), {"background": None, "layers": [], "composite": None}) == ""
    assert note_for(_Model("embedded"), None) == ""
