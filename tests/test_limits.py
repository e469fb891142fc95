"""Per-job limits for a public server (pipelines/core/limits.py) and the hostile-input checks that use them: limits from
the environment; every job refusing over-limit numbers before any model call or image decode; narrow images and
header-only checks of uploads; InstructPix2Pix sizes at extreme aspect ratios; raw drag points from a client; LoRA
names, the LoRA cap, unloading, and path-free LoRA messages."""
from __future__ import annotations

import io
import struct
import threading
import time
import tracemalloc
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image, ImageFile

from pipelines.core.errors import InputError
from pipelines.core.events import run_to_end
from pipelines.core.image_io import check_image_header, load_image, load_rgb
from pipelines.core.limits import MB, Limits, env_names, get_limits, limits_set, set_limits
from pipelines.core.lora import (
    MAX_LOADED_LORAS,
    load_lora,
    lora_applied,
    read_lora_file,
    unload_lora,
)
from pipelines.diffedit import DiffEditParams, diffedit_edit, diffedit_mask
from pipelines.drag import DragParams, drag
from pipelines.drag.lora import ADAPTER
from pipelines.drag.points import parse_points
from pipelines.edit import EditParams, text_edit
from pipelines.generate import GenerateParams, generate
from pipelines.instruct import (
    InstructParams,
    instruct_edit,
    instruct_size,
    prepare_input,
)
from pipelines.interpolation import (
    InterpolationParams,
    interpolation_compare,
    interpolation_frame,
    interpolation_sequence,
)
from pipelines.inversion import InversionParams, invert_and_reconstruct
from pipelines.real_interpolation import (
    RealInterpolationParams,
    real_interpolation_compare,
    real_interpolation_sequence,
)
from pipelines.sdedit import SDEditParams, sdedit
from tests.helpers import forward_calls
from tests.test_lora import make_peft_lora, make_smooth_lora

# ------------------------------------------------------------------------------------------- Limits itself


def test_defaults():
    lim = Limits()
    assert (lim.max_steps, lim.max_pixels, lim.max_upload_bytes, lim.max_aspect) == (150, 16_000_000, 40 * MB, 8)
    assert (lim.max_frames, lim.max_drag_iterations, lim.max_lora_steps, lim.max_side) == (64, 300, 300, 1024)
    assert (lim.max_repeats, lim.max_points, lim.max_loras) == (8, 16, 8)
    assert get_limits() == lim  # nothing in the tests changes them for good
    with pytest.raises(AttributeError):
        lim.max_steps = 10  # frozen: a job reads one consistent set


def test_from_env_reads_every_variable():
    names = env_names()
    assert names["max_steps"] == ("STUDIO_MAX_STEPS", 1)
    assert names["max_upload_bytes"] == ("STUDIO_MAX_UPLOAD_MB", MB)
    assert {v for v, _ in names.values()} >= {"STUDIO_MAX_STEPS", "STUDIO_MAX_PIXELS", "STUDIO_MAX_UPLOAD_MB",
                                               "STUDIO_MAX_FRAMES", "STUDIO_MAX_ASPECT", "STUDIO_MAX_SIDE",
                                               "STUDIO_MAX_DRAG_ITERATIONS", "STUDIO_MAX_LORA_STEPS"}
    assert Limits.from_env({}) == Limits()
    lim = Limits.from_env({"STUDIO_MAX_STEPS": " 40 ", "STUDIO_MAX_PIXELS": "4e6", "STUDIO_MAX_UPLOAD_MB": "2.5",
                           "STUDIO_MAX_ASPECT": "3.5", "STUDIO_MAX_FRAMES": "", "OTHER": "x"})
    assert lim == replace(Limits(), max_steps=40, max_pixels=4_000_000, max_upload_bytes=int(2.5 * MB),
                          max_aspect=3.5)
    assert isinstance(lim.max_pixels, int)


def test_from_env_reads_os_environ(monkeypatch):
    monkeypatch.setenv("STUDIO_MAX_DRAG_ITERATIONS", "20")
    assert Limits.from_env().max_drag_iterations == 20


@pytest.mark.parametrize("var, value", [("STUDIO_MAX_STEPS", "many"), ("STUDIO_MAX_STEPS", "1.5"),
                                        ("STUDIO_MAX_FRAMES", "0"), ("STUDIO_MAX_PIXELS", "-5"),
                                        ("STUDIO_MAX_UPLOAD_MB", "nan"), ("STUDIO_MAX_SIDE", "inf"),
                                        ("STUDIO_MAX_ASPECT", "0.5")])
def test_bad_environment_values_name_their_variable(var, value):
    with pytest.raises(ValueError, match=var):
        Limits.from_env({var: value})


def test_set_limits_swaps_and_limits_set_restores():
    before = get_limits()
    with limits_set(max_steps=10) as lim:
        assert get_limits() is lim and lim.max_steps == 10 and lim.max_frames == before.max_frames
    assert get_limits() is before
    with pytest.raises(TypeError):
        set_limits({"max_steps": 10})
    with pytest.raises(ValueError):
        Limits(max_steps=0)


def test_set_limits_from_many_threads_always_leaves_a_whole_limits():
    before = get_limits()
    choices = [replace(before, max_steps=n, max_frames=n) for n in range(2, 10)]
    seen = []

    def worker(k):
        for i in range(200):
            set_limits(choices[(k + i) % len(choices)])
            lim = get_limits()
            seen.append(lim.max_steps == lim.max_frames)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        set_limits(before)
    assert all(seen) and len(seen) == 800


# ------------------------------------------------------------------------------------------- jobs refuse early


@pytest.fixture
def no_work(tiny_model, monkeypatch):
    """Counts every model call (UNet, VAE encoder and decoder, text encoder) and image decode while a job is
    validated; the InstructPix2Pix UNet must not even be loaded."""
    m = tiny_model
    decodes = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decodes.append(1) or real_load(self))
    monkeypatch.setattr(m, "instruct_unet", lambda: decodes.append("instruct UNet loaded"))

    @contextmanager
    def watch():
        with forward_calls(m.unet) as u, forward_calls(m.vae.encoder) as e, forward_calls(m.vae.decoder) as d, \
                forward_calls(m.text_encoder) as t:
            yield
        assert not (u or e or d or t or decodes), (len(u), len(e), len(d), len(t), decodes)

    return watch


@pytest.fixture(scope="module")
def png():
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _step_jobs(m, png, steps):
    """(label, job factory) for every job with a steps setting."""
    interp = InterpolationParams("a cat", "a dog", steps=steps)
    return [
        ("generate", lambda: generate(m, GenerateParams("a cat", steps=steps))),
        ("interpolation frame", lambda: interpolation_frame(m, interp, 0.5)),
        ("interpolation sequence", lambda: interpolation_sequence(m, interp, 11)),
        ("interpolation compare", lambda: interpolation_compare(m, replace(interp, lora="smooth"), 11)),
        ("real interpolation", lambda: real_interpolation_sequence(m, png, png, RealInterpolationParams(
            "a cat", steps=steps), 11)),
        ("invert", lambda: invert_and_reconstruct(m, png, InversionParams("a cat", steps=steps))),
        ("edit", lambda: text_edit(m, png, EditParams("a cat", "a dog", steps=steps))),
        ("diffedit mask", lambda: diffedit_mask(m, png, DiffEditParams("a dog", "a cat", steps=steps))),
        ("diffedit", lambda: diffedit_edit(m, png, DiffEditParams("a dog", "a cat", steps=steps))),
        ("sdedit", lambda: sdedit(m, png, SDEditParams("a cat", steps=steps))),
        ("drag", lambda: drag(m, png, DragParams([(1, 1)], [(5, 5)], steps=steps))),
        ("instruct", lambda: instruct_edit(m, png, InstructParams("make it blue", steps=steps))),
    ]


def _frame_jobs(m, png, frames):
    interp = InterpolationParams("a cat", "a dog", steps=2)
    real = RealInterpolationParams("a cat", "a dog", steps=2)
    return [
        ("interpolation sequence", lambda: interpolation_sequence(m, interp, frames)),
        ("interpolation compare", lambda: interpolation_compare(m, replace(interp, lora="smooth"), frames)),
        ("real interpolation sequence", lambda: real_interpolation_sequence(m, png, png, real, frames)),
        ("real interpolation compare", lambda: real_interpolation_compare(m, png, png, replace(real, lora="smooth"),
                                                                          frames)),
    ]


def test_every_job_refuses_too_many_steps_before_any_work(tiny_model, png, no_work):
    for label, job in _step_jobs(tiny_model, png, 400):
        with no_work(), pytest.raises(InputError) as info:
            next(job())
        assert str(info.value) == "Steps must be between 1 and 150, got 400.", label


def test_jobs_read_the_limits_in_force(tiny_model, png, no_work):
    with limits_set(max_steps=20), no_work():
        for _label, job in _step_jobs(tiny_model, png, 21):
            with pytest.raises(InputError, match="between 1 and 20, got 21"):
                next(job())


def test_every_sequence_refuses_too_many_frames(tiny_model, png, no_work):
    for _label, job in _frame_jobs(tiny_model, png, 65):
        with no_work(), pytest.raises(InputError, match=r"^Number of frames must be between 2 and 64, got 65\.$"):
            next(job())
    with limits_set(max_frames=5), no_work(), pytest.raises(InputError, match="between 2 and 5, got 6"):
        next(interpolation_sequence(tiny_model, InterpolationParams("a cat"), 6))


@pytest.mark.parametrize("job, message", [
    (lambda m, img: generate(m, GenerateParams("a cat", width=2048)), "Width must be between 8 and 1024, got 2048."),
    (lambda m, img: generate(m, GenerateParams("a cat", height=1032)), "Height must be between 8 and 1024"),
    (lambda m, img: drag(m, img, DragParams([(1, 1)], [(5, 5)], drag_iterations=301)),
     "Drag iterations must be between 0 and 300, got 301."),
    (lambda m, img: drag(m, img, DragParams([(1, 1)], [(5, 5)], lora_steps=301)),
     "LoRA steps must be between 0 and 300, got 301."),
    (lambda m, img: drag(m, img, DragParams([(1, 1)], [(5, 5)], lora_rank=257)), "LoRA rank must be between 1 and 256"),
    (lambda m, img: drag(m, img, DragParams([(1, 1)] * 17, [(5, 5)] * 17)),
     "17 point pairs is too many; use at most 16"),
    (lambda m, img: drag(m, img, DragParams([(1, 1)] * 2, [(5, 5)])), "every handle needs exactly one target"),
    (lambda m, img: sdedit(m, img, SDEditParams("a cat", repeats=9)), "Repeats must be between 1 and 8, got 9."),
    (lambda m, img: diffedit_mask(m, img, DiffEditParams("a dog", "a cat", mask_draws=65)),
     "Mask noise draws must be between 1 and 64, got 65."),
    (lambda m, img: invert_and_reconstruct(m, img, InversionParams("a cat", method="nti", inner_steps=51)),
     "Inner iterations must be between 1 and 50, got 51."),
    (lambda m, img: generate(m, GenerateParams("a cat", steps="9" * 5000)),
     "Steps must be between 1 and 150, got '999"),
    (lambda m, img: generate(m, GenerateParams("a cat", steps=10 ** 400)), "Steps must be a number"),
    (lambda m, img: generate(m, GenerateParams("a cat " * 400)), "The prompt is too long (2400 characters; the "
     "limit is 2000)."),
    (lambda m, img: sdedit(m, img, SDEditParams("x" * 2001)), "The prompt is too long (2001 characters"),
])
def test_other_caps_refuse_before_any_work(tiny_model, png, no_work, job, message):
    with no_work(), pytest.raises(InputError) as info:
        next(job(tiny_model, png))
    assert message in str(info.value) and len(str(info.value)) < 200


# ------------------------------------------------------------------------------------------- images


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _fake_png(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header claims width x height."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("size", [(1, 4096), (4096, 1), (10, 81), (2000, 200)])
def test_narrow_images_get_a_clean_error(size, tmp_path):
    w, h = size
    path = tmp_path / "narrow.png"
    Image.new("RGB", size, "white").save(path)
    text = f"The image is too narrow ({w}x{h} px): its long side may be at most 8 times its short side."
    sources = [path, str(path), path.read_bytes(), Image.new("RGB", size), np.zeros((h, w, 3), np.uint8)]
    for source in sources:
        with pytest.raises(InputError) as info:
            load_image(source, resolution=64, multiple=8)
        assert str(info.value) == text
    with pytest.raises(InputError, match="too narrow"):
        check_image_header(path)


def test_aspect_limit_is_inclusive_and_follows_the_limits():
    assert load_rgb(Image.new("RGB", (80, 10))).size == (80, 10)  # exactly 8:1
    assert check_image_header(_png(Image.new("RGB", (10, 80)))) == (10, 80, "PNG")
    with limits_set(max_aspect=2), pytest.raises(InputError, match="at most 2 times"):
        load_rgb(Image.new("RGB", (21, 10)))


def test_exif_rotated_image_still_loads_upright():
    img = Image.new("RGB", (32, 16), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    assert check_image_header(buf.getvalue()) == (32, 16, "JPEG")  # the stored size
    out = load_rgb(buf.getvalue())
    assert out.size == (16, 32) and out.getpixel((8, 4))[0] > 200


def test_header_check_refuses_a_huge_header_fast_without_decoding(monkeypatch):
    data = _fake_png(12000, 12000)
    assert len(data) < 200
    decodes = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decodes.append(1))
    for strict in (False, True):  # Pillow's bomb warning as a warning, and as an error
        tracemalloc.start()
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error" if strict else "ignore", Image.DecompressionBombWarning)
                with pytest.raises(InputError, match="too large"):
                    check_image_header(data)
            elapsed = time.perf_counter() - start
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert elapsed < 1.0
        assert peak < 2 * MB  # decoding would need 432 MB
    assert decodes == []


def test_pixel_limit_is_the_limits_and_says_it():
    with pytest.raises(InputError, match=r"^The image is too large \(4100x4000 px\); the limit is 16 megapixels\.$"):
        check_image_header(_fake_png(4100, 4000))
    assert check_image_header(_fake_png(4000, 4000)) == (4000, 4000, "PNG")
    with limits_set(max_pixels=2_500_000), pytest.raises(InputError, match="limit is 2.5 megapixels"):
        load_rgb(_fake_png(2000, 2000))


def test_header_check_of_good_and_bad_files(tmp_path):
    path = tmp_path / "ok.png"
    Image.new("RGBA", (40, 30)).save(path)
    assert check_image_header(path) == (40, 30, "PNG")
    assert check_image_header(str(path)) == (40, 30, "PNG")
    text = tmp_path / "notes.png"
    text.write_text("not an image\n" * 10)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n" + b" " * 200  # Pillow would run Ghostscript
    cases = [(text, "not an image I can read"), (b"\x89PNG\r\n\x1a\n garbage", "not an image I can read"),
             (eps, "not an image I can read"), (tmp_path / "missing.png", "'missing.png' was not found"),
             (None, "No image was given"), (b"", "No image was given"), (12345, "Unsupported image input"),
             (_png(Image.new("RGB", (4, 20))), "too small")]
    for source, message in cases:
        with pytest.raises(InputError, match=message) as info:
            check_image_header(source)
        assert str(tmp_path) not in str(info.value)
    with pytest.raises(InputError, match="not an image I can read"):
        load_rgb(eps)


def test_upload_size_limit(tmp_path):
    data = _png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    path = tmp_path / "big.png"
    path.write_bytes(data)
    with limits_set(max_upload_bytes=1000):
        for source in (data, path):
            with pytest.raises(InputError, match=r"^The file is too large \(\d+ KB\); the limit is 1 KB\.$"):
                check_image_header(source)
        with pytest.raises(InputError, match="file is too large"):
            load_rgb(path)
    assert check_image_header(path)[:2] == (64, 64)


# ------------------------------------------------------------------------------------------- InstructPix2Pix


@pytest.mark.parametrize("resolution, multiple", [(512, 64), (128, 16), (64, 8), (100, 16)])
def test_instruct_size_never_exceeds_the_resolution(resolution, multiple):
    cap = resolution // multiple * multiple
    rng = np.random.default_rng(0)
    sizes = [(60000, 50), (50, 60000), (4096, 512), (800, 530), (1000, 300)]
    sizes += [tuple(int(v) for v in rng.integers(8, 9000, 2)) for _ in range(300)]
    for w, h in sizes:
        out = instruct_size(w, h, resolution, multiple)
        assert max(out) <= cap and out[0] * out[1] <= resolution ** 2, (w, h, out)
        assert out[0] % multiple == 0 and out[1] % multiple == 0 and min(out) >= multiple
        assert out[0] == out[1] or (out[0] > out[1]) == (w > h)  # orientation kept


def test_instruct_extremes(tiny_model):
    m = tiny_model
    wide = prepare_input(m, Image.new("RGB", (4000, 500), "red"))  # 8:1, the widest accepted
    assert max(wide.size) <= m.resolution and wide.width > wide.height
    with pytest.raises(InputError, match="too narrow"):
        prepare_input(m, Image.new("RGB", (4096, 500)))
    with pytest.raises(InputError, match="too narrow"):
        prepare_input(m, _fake_png(60000, 50))


# ------------------------------------------------------------------------------------------- drag points


def test_parse_points_accepts_pairs_and_rounds():
    assert parse_points([[1, 2], [3.5, 4.49]]) == [(1, 2), (4, 4)]
    assert parse_points(((0.5, -0.5), [10, 20.0])) == [(1, 0), (10, 20)]
    assert parse_points([]) == [] and parse_points(None) == []
    assert all(type(v) is int for p in parse_points([[1.7, 2], [3, 4]]) for v in p)


@pytest.mark.parametrize("value, message", [
    (5, "got a number"), ("[[1, 2], [3, 4]]", "got text"), ({"x": 1, "y": 2}, "got an object"), (True, "true/false"),
    ([[1, 2, 3], [4, 5]], "entry 1 is not"), ([[1, 2], [4]], "entry 2 is not"), ([[1, 2], 3], "entry 2 is not"),
    ([[1, float("nan")], [1, 2]], "entry 1"), ([[1, 2], [float("inf"), 2]], "entry 2"),
    ([[True, 2], [1, 2]], "entry 1"), ([["1", 2], [1, 2]], "entry 1"), ([[None, 2], [1, 2]], "entry 1"),
    ([[[1], 2], [1, 2]], "entry 1"), ([[10 ** 400, 2], [1, 2]], "entry 1"), ([{"x": 1}, [1, 2]], "entry 1"),
    ([[1, 2]] * 34, "at most 32 of them (16 handle/target pairs); got 34"),
])
def test_parse_points_refuses_malformed_values(value, message):
    with pytest.raises(InputError) as info:
        parse_points(value)
    text = str(info.value)
    assert text.startswith("Drag points must be a list of [x, y] pairs") and message in text and len(text) < 160


def test_parse_points_odd_count():
    with pytest.raises(InputError, match="2 handle point\\(s\\) but 1 target\\(s\\): every handle needs exactly one"):
        parse_points([[1, 2], [3, 4], [5, 6]])


# ------------------------------------------------------------------------------------------- LoRA adapters


@pytest.fixture(scope="module")
def model(_studio_cache):
    """A private tiny model: these tests load and unload adapters on its UNet."""
    from pipelines.core.models import load_model

    return run_to_end(load_model("tiny-random"))


@pytest.fixture(scope="module")
def probe(model):
    g = torch.Generator().manual_seed(11)
    x, cond = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)

    @torch.no_grad()
    def run():
        return model.unet(x, 400, encoder_hidden_states=cond).sample

    return run


@pytest.fixture(scope="module")
def base(model, probe):
    """The untouched UNet: its output and module tree before any adapter."""
    assert not model.loras and not getattr(model.unet, "peft_config", None)
    return probe(), [(n, type(m)) for n, m in model.unet.named_modules()]


@pytest.fixture(scope="module")
def lora_file(model, tmp_path_factory):
    return make_peft_lora(model.unet, tmp_path_factory.mktemp("limits_lora") / "style.safetensors")


def _assert_untouched(model, probe, base):
    assert torch.equal(probe(), base[0])  # bit for bit
    assert [(n, type(m)) for n, m in model.unet.named_modules()] == base[1]
    assert not any(isinstance(m, BaseTunerLayer) for m in model.unet.modules())
    assert not getattr(model.unet, "peft_config", None) and not model.loras


@pytest.fixture
def clean(model, probe, base):
    """Every LoRA test starts and ends with no adapter."""
    yield
    for name in list(model.loras):
        unload_lora(model, name)
    _assert_untouched(model, probe, base)


@pytest.mark.parametrize("name", [ADAPTER, "default", "none", "None", "to", "eval", "forward", "training", "keys"])
def test_reserved_names_are_refused(model, lora_file, clean, name):
    with pytest.raises(InputError, match=f"The LoRA name '{name}' is reserved"):
        load_lora(model, str(lora_file), name)
    assert not model.loras


def test_names_are_sanitised_and_derived_reserved_names_renamed(model, lora_file, clean, tmp_path):
    assert load_lora(model, str(lora_file), "my style!/../ü") == "my_style"
    assert load_lora(model, str(lora_file), "x" * 100) == "x" * 64
    drag_named = tmp_path / f"{ADAPTER}.safetensors"
    drag_named.write_bytes(lora_file.read_bytes())
    assert load_lora(model, str(drag_named)) == f"{ADAPTER}_lora"
    assert sorted(model.loras) == sorted(["my_style", "x" * 64, f"{ADAPTER}_lora"])
    assert ADAPTER not in model.unet.peft_config


@pytest.mark.slow
def test_at_most_eight_loras_and_reloading_one_is_allowed(model, lora_file, probe, clean, tmp_path):
    assert MAX_LOADED_LORAS == get_limits().max_loras == 8
    for k in range(8):
        load_lora(model, str(lora_file), f"l{k}")
    with pytest.raises(InputError, match=r"^8 LoRAs are loaded, the most allowed: unload one \(l0, l1,"):
        load_lora(model, str(tmp_path / "never_read.safetensors"), "l8")  # refused before the file is looked at
    with lora_applied(model, "l3", 1.0):
        before = probe()
    assert load_lora(model, str(lora_file), "l3") == "l3"  # replaces l3
    with lora_applied(model, "l3", 1.0):
        assert torch.equal(probe(), before)
    unload_lora(model, "l0")
    assert load_lora(model, str(lora_file), "l8") == "l8"
    assert len(model.loras) == 8 == len(model.unet.peft_config)
    with limits_set(max_loras=2), pytest.raises(InputError, match="8 LoRAs are loaded"):
        load_lora(model, str(lora_file), "another")


def test_unload_gives_back_the_base_unet_bit_exactly(model, probe, base, lora_file, clean, tmp_path):
    other = make_smooth_lora(model.unet, tmp_path / "other.safetensors")
    load_lora(model, str(lora_file), "style")
    load_lora(model, str(other), "other")
    with lora_applied(model, "other", 1.0):
        other_out = probe()
    assert not torch.equal(other_out, base[0])
    assert unload_lora(model, "style") == "style"
    assert list(model.loras) == ["other"] and list(model.unet.peft_config) == ["other"]
    assert torch.equal(probe(), base[0])
    with lora_applied(model, "other", 1.0):
        assert torch.equal(probe(), other_out)
    with pytest.raises(InputError, match="not loaded"), lora_applied(model, "style", 1.0):
        pass
    unload_lora(model, "other")
    _assert_untouched(model, probe, base)
    load_lora(model, str(other), "other")  # peft wraps the layers again from scratch
    with lora_applied(model, "other", 1.0):
        assert torch.equal(probe(), other_out)


@pytest.mark.parametrize("name", ["nope", ADAPTER, "", None, "x" * 5000])
def test_unloading_an_unknown_name_is_an_input_error(model, clean, name):
    with pytest.raises(InputError, match="is not loaded for this model") as info:
        unload_lora(model, name)
    assert len(str(info.value)) < 150


def test_studio_unload_lora_runs_under_the_lock(model, lora_file, clean):
    from pipelines.studio import Studio

    s = Studio()
    s.model = model
    assert run_to_end(s.load_lora(str(lora_file), "style")) == "style"
    events = list(s.unload_lora("style"))
    assert [e.stage for e in events] == ["unloading LoRA", "unloaded"] and events[-1].result == "style"
    assert "style" not in model.loras
    with pytest.raises(InputError, match="'style' is not loaded"):
        run_to_end(s.unload_lora("style"))
    assert s._lock.acquire(blocking=False)  # released after the error
    s._lock.release()


def test_lora_messages_name_files_never_server_paths(model, probe, clean, tmp_path):
    folder = tmp_path / "private" / "loras"
    folder.mkdir(parents=True)
    (folder / "fake.safetensors").write_text("not safetensors")
    make_smooth_lora(model.unet, folder / "wrong_shape.safetensors", extra_in=3)
    from safetensors.torch import save_file

    save_file({"model.conv.weight": torch.randn(3, 3)}, str(folder / "unrelated.safetensors"))
    (folder / "empty").mkdir()
    cases = [
        (folder / "missing.safetensors", "LoRA file not found: missing.safetensors."),
        (folder / "fake.safetensors", "fake.safetensors is not a readable safetensors file."),
        (folder / "wrong_shape.safetensors", "LoRA wrong_shape.safetensors does not fit this model's UNet"),
        (folder / "unrelated.safetensors", "No UNet LoRA weights were found in unrelated.safetensors."),
        (folder / "empty", "No .safetensors file in empty."),
        ("someone/no-such-lora", "Could not fetch LoRA 'someone/no-such-lora' from the Hub"),
        ("~nosuchuser_xyz/a.safetensors", "LoRA file not found: a.safetensors."),
        ("/" + "x" * 5000 + ".safetensors", "LoRA file not found: xxx"),
    ]
    for source, message in cases:
        with pytest.raises(InputError) as info:
            load_lora(model, str(source))
        text = str(info.value)
        assert message in text
        assert str(tmp_path) not in text and "Error" not in text and "Traceback" not in text and len(text) < 200
    with pytest.raises(InputError, match="No LoRA given"):
        read_lora_file("  ")


def test_long_negative_prompts_are_refused_before_the_unet(tiny_model):
    calls = []
    handle = tiny_model.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(InputError, match="too long"):
            run_to_end(generate(tiny_model, GenerateParams("a cat", negative_prompt="blurry " * 100_000, steps=2)))
    finally:
        handle.remove()
    assert not calls
