"""PNG info: a tab's controls restored from a studio or A1111 PNG, through the drop box's handler (the upload
checks of app/uploads.py included) and through Context.restore_updates, which the history gallery uses."""
from __future__ import annotations

import json
import os
import zlib

import gradio as gr
import pytest
from browser_support import fresh_page, launched_browser, needs_chromium
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pipelines.core.metadata import save_png, with_metadata

A1111_TXT2IMG = (
    "masterpiece, a castle on a hill, <lora:detail:0.6>\n"
    "Negative prompt: lowres, bad anatomy\n"
    'Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x768, '
    'Model hash: abc123, Model: v1-5-pruned, Lora hashes: "detail: abc123, style: def456", Version: v1.10.1'
)


@pytest.fixture(scope="module")
def ctx(studio):
    """Every tab built over one Context (as app/ui.py builds them), for its restore registry."""
    from app.context import Context
    from app.hosting import Hosting
    from app.sessions import SessionRegistry
    from app.tabs import diffedit, drag, edit, generate, instruct, interpolate, invert, real_interpolate, sdedit

    context = Context(studio, SessionRegistry(), Hosting())
    with gr.Blocks():
        with gr.Tabs() as context.tabs:
            for tab in (generate, interpolate, real_interpolate, invert, edit, instruct, diffedit, sdedit, drag):
                tab.build(context)
    return context


@pytest.fixture
def upload_dir(tmp_path, monkeypatch):
    folder = tmp_path / "gradio_uploads"
    folder.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(folder))
    return folder


def png_with_text(path, chunks: dict, size=(8, 8)):
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    Image.new("RGB", size, (10, 20, 30)).save(path, pnginfo=info)
    return path


def values(ctx, tab_id: str, updates: list) -> dict:
    """{parameter key: value} of the updates that set a value (gr.skip() leaves a control as it is)."""
    keys = list(ctx.restore[tab_id].controls)
    assert len(updates) == len(keys) == len(ctx.restore_outputs(tab_id))
    return {k: u["value"] for k, u in zip(keys, updates, strict=True) if isinstance(u, dict) and "value" in u}


def drop(ctx, tab_id: str, path) -> tuple[dict, str]:
    """The drop box's handler on an upload payload as Gradio sends it (preprocess=False)."""
    *updates, box, note = ctx.restore_from_upload(tab_id, {"path": str(path), "orig_name": "x.png"})
    assert box == {"value": None, "__type__": "update"}  # the drop box is cleared for the next PNG
    return values(ctx, tab_id, updates), note


def test_every_tab_has_a_drop_box_and_registered_controls(ctx):
    tabs = {"generate", "interpolate", "interpolate-images", "invert", "edit", "instruct", "diffedit", "sdedit",
            "drag"}
    assert set(ctx.restore) == tabs
    for tab_id, tab in ctx.restore.items():
        assert isinstance(tab.drop, gr.Image) and tab.drop.label.startswith("Restore settings from a PNG"), tab_id
        assert "prompt" in tab.controls or "instruction" in tab.controls, tab_id
        assert all(isinstance(c, gr.components.Component) for c in tab.controls.values()), tab_id


def test_a1111_txt2img_png_restores_generate(ctx, upload_dir):
    path = png_with_text(upload_dir / "a1111.png", {"parameters": A1111_TXT2IMG})
    got, note = drop(ctx, "generate", path)
    assert got == {"prompt": "masterpiece, a castle on a hill, <lora:detail:0.6>",
                   "negative_prompt": "lowres, bad anatomy", "steps": 20, "guidance": 7.0, "seed": 42,
                   "width": 512, "height": 768}
    assert "Restored:" in note and "CFG scale" in note
    assert "v1-5-pruned" in note  # made with another model: said, not switched


def test_studio_png_of_another_method_restores_shared_keys_and_names_the_rest(ctx, upload_dir):
    meta = {"prompt": "a red ball", "negative_prompt": "blurry", "task": "sdedit", "strength": 0.55, "steps": 25,
            "guidance": 6.5, "seed": 7, "repeats": 2, "masked": True, "size": "64x64", "model": ctx.studio.model.id,
            "lora": "none", "lora_strength": 0.0, "sampler": "DDIM (eta 0)"}
    path = save_png(with_metadata(Image.new("RGB", (8, 8)), meta), upload_dir / "sdedit.png")
    got, note = drop(ctx, "generate", path)
    assert got["prompt"] == "a red ball" and got["steps"] == 25 and got["guidance"] == 6.5 and got["seed"] == 7
    assert got["use_lora"] is False and "lora_strength" not in got  # no LoRA used: its strength stays
    assert got["width"] == 64 and got["height"] == 64
    assert "Skipped (not on this tab): Denoising strength, Repeats, Masked." in note
    # on its own tab every setting comes back
    got, note = drop(ctx, "sdedit", path)
    assert got["strength"] == 0.55 and got["masked"] is True and got["repeats"] == 2
    assert "Skipped" not in note


def test_out_of_range_values_are_clamped_with_a_note(ctx):
    params = {"prompt": "x", "steps": 100000, "guidance": "-3", "seed": "not a seed", "size": "4096x8"}
    updates, note = ctx.restore_updates("generate", params)
    got = values(ctx, "generate", updates)
    steps = ctx.restore["generate"].controls["steps"]
    width = ctx.restore["generate"].controls["width"]
    assert got["steps"] == steps.maximum and got["guidance"] == 0
    assert got["width"] == width.maximum and got["height"] == width.minimum
    assert "seed" not in got
    assert "Steps: 100000 is outside" in note and "Seed: 'not a seed' is not a number" in note
    # a size off the model's grid is snapped to it, with a note
    step = int(width.step)
    updates, note = ctx.restore_updates("generate", {"size": f"{8 * step + 3}x{8 * step}"})
    got = values(ctx, "generate", updates)
    assert got["width"] == 8 * step and got["height"] == 8 * step
    assert step > 1 and f"Width: {8 * step + 3} is not a multiple of {step}" in note


def test_instruct_reads_a1111_cfg_scales_and_sampler(ctx):
    from pipelines.core.metadata import parse_parameters

    params = parse_parameters("turn it blue\nSteps: 30, Sampler: DDIM, CFG scale: 7.5, Image CFG scale: 1.4, "
                              "Seed: 3")
    updates, note = ctx.restore_updates("instruct", params)
    got = values(ctx, "instruct", updates)
    assert got["instruction"] == "turn it blue" and got["text_guidance"] == 7.5
    assert got["image_guidance"] == 1.4 and got["steps"] == 30 and got["seed"] == 3 and got["scheduler"] == "ddim"
    # a restored seed and CFG are used as they are, not randomized again
    assert got["seed_follows"] == "Fix seed" and got["text_guidance_follows"] == "Fix CFG"
    assert "follows" not in note
    updates, _ = ctx.restore_updates("instruct", {"instruction": "x"})
    assert "seed_follows" not in values(ctx, "instruct", updates)


def test_lora_name_not_loaded_is_unticked_with_a_note(ctx):
    updates, note = ctx.restore_updates("generate", {"prompt": "x", "lora": "nowhere", "lora_strength": 0.7})
    got = values(ctx, "generate", updates)
    assert got["use_lora"] is False and got["lora_strength"] == 0.7
    assert "LoRA 'nowhere' is not loaded" in note


def test_hostile_keys_and_values_are_shown_as_plain_text(ctx):
    """The note is Markdown: what a PNG says can neither become markup, a link or an image, nor flood it."""
    params = {"prompt": "x", "steps": "<img src=x onerror=alert(1)>", "![t](http://evil.example/t.png)": 1,
              "model": "[click](http://evil.example)", **{f"junk_{k}": k for k in range(40)}}
    updates, note = ctx.restore_updates("generate", params)
    assert values(ctx, "generate", updates) == {"prompt": "x"}
    assert "<img" not in note and "](http" not in note and "[click]" not in note
    assert "&lt;img src=x onerror=alert\\(1\\)&gt;" in note  # escaped, still readable once rendered
    assert note.count("Junk ") == 11 and "and 29 more" in note  # 12 of 41 named (the image key first)


def test_png_without_parameters_gives_a_message(ctx, upload_dir):
    path = upload_dir / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    got, note = drop(ctx, "generate", path)
    assert got == {} and "carries no generation parameters" in note


def refused(ctx, tab_id: str, payload) -> str:
    """The drop box refuses a file the upload checks reject as every upload slot does: the studio's message."""
    from pipelines.core.errors import InputError

    with pytest.raises(InputError) as info:
        ctx.restore_from_upload(tab_id, payload)
    return str(info.value)


def test_hostile_files_give_a_message(ctx, upload_dir, tmp_path):
    from pipelines.core.errors import InputError
    from pipelines.core.metadata import read_metadata

    # outside Gradio's upload folder, as a path or a URL: the studio's upload refusal
    outside = png_with_text(tmp_path / "outside.png", {"parameters": "a cat\nSteps: 5"})
    assert "only opens images uploaded to it" in refused(ctx, "generate", {"path": str(outside)})
    assert "not fetched" in refused(ctx, "generate", {"url": "http://example.com/x.png", "path": None})
    # not an image at all
    text = upload_dir / "notes.png"
    text.write_text("Steps: 5, CFG scale: 7")
    assert "not an image" in refused(ctx, "generate", {"path": str(text)})

    # a 1 MB parameters chunk is refused before it is parsed: a note, nothing changed
    big = png_with_text(upload_dir / "big.png", {"parameters": "a" * 2**20 + "\nSteps: 5"})
    got, note = drop(ctx, "generate", big)
    assert got == {} and note.startswith("⚠️") and "too long" in note

    # the same as a zTXt chunk that inflates to 1 MB: Pillow's header check refuses the file first; the text
    # reader on its own says why
    info = PngInfo()
    info.add_text("parameters", "b" * 2**20 + "\nSteps: 5", zip=True)
    Image.new("RGB", (8, 8)).save(upload_dir / "zbig.png", pnginfo=info)
    assert refused(ctx, "generate", {"path": str(upload_dir / "zbig.png")})
    with pytest.raises(InputError, match="too long"):
        read_metadata(upload_dir / "zbig.png")


def test_png_bomb_is_refused_from_its_header(ctx, upload_dir):
    """A 100000x100000 PNG whose pixels compress to a few KB: refused by the header checks, nothing decoded."""
    import struct

    def chunk(cid: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + cid + data + struct.pack(">I", zlib.crc32(cid + data))

    side = 100_000
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    text = b"parameters\0a bomb\nSteps: 5, CFG scale: 7"
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"tEXt", text)
            + chunk(b"IDAT", zlib.compress(b"\0" * 2**20)) + chunk(b"IEND", b""))
    path = upload_dir / "bomb.png"
    path.write_bytes(data)
    assert "too large" in refused(ctx, "generate", {"path": str(path)}).lower()


def test_text_after_the_pixels_is_found_without_decoding(upload_dir):
    """Some tools write the parameters after IDAT: read by walking the chunks (the pixel data here is not even
    valid zlib, so decoding it would fail)."""
    import struct

    from pipelines.core.metadata import read_metadata

    def chunk(cid: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + cid + data + struct.pack(">I", zlib.crc32(cid + data))

    ihdr = struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)
    studio = json.dumps({"prompt": "late text", "steps": 9}).encode()
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"not zlib at all")
            + chunk(b"tEXt", b"studio\0" + studio) + chunk(b"IEND", b""))
    path = upload_dir / "late.png"
    path.write_bytes(data)
    assert read_metadata(path) == {"prompt": "late text", "steps": 9}


# ------------------------------------------------------------------------------------------ download names
NAME = r"{method}_seed{seed}_\d{{8}}-\d{{6}}(_\d\d)?(-\d+)?\.{ext}"


def test_result_files_are_named_pngs_with_their_parameters(tmp_path):
    import re

    from app import downloads
    from app.sessions import Session
    from pipelines.core.metadata import read_metadata

    session = Session()
    try:
        meta = {"prompt": "p", "task": "generate", "seed": 1234, "guidance": 7.5, "size": "24x16"}
        image = with_metadata(Image.new("RGB", (24, 16), (200, 0, 0)), meta)
        path = downloads.result_file(session, image, "generate", 1234)
        assert re.fullmatch(NAME.format(method="generate", seed=1234, ext="png"), os.path.basename(path))
        with Image.open(path) as im:
            assert im.size == (24, 16) and im.getpixel((0, 0)) == (200, 0, 0)
            assert "CFG scale: 7.5" in im.text["parameters"]
        assert read_metadata(path) == meta
        # the same second again: a new file, not an overwrite
        second = downloads.result_file(session, image, "generate", 1234)
        assert second != path and os.path.isfile(path)
        # seeds from the image's own parameters; -1 (none) leaves the seed out
        frame = with_metadata(Image.new("RGB", (8, 8)), {"task": "interpolate", "seed_a": 3, "seed_b": 4})
        frames = downloads.result_files(session, [frame, frame], "interpolate")
        assert [os.path.basename(f).split("_")[1] for f in frames] == ["seed3-4", "seed3-4"]
        assert re.fullmatch(r"interpolate_seed3-4_\d{8}-\d{6}_02\.png", os.path.basename(frames[1]))
        assert re.fullmatch(r"invert_\d{8}-\d{6}\.png",
                            os.path.basename(downloads.result_file(session, image, "invert", -1)))
        # a file the pipeline wrote into the session's folder (a GIF, an MP4) is moved under the new name
        gif = session.out_dir / "interp_3_4.gif"
        gif.write_bytes(b"GIF89a")
        named = downloads.result_file(session, str(gif), "interpolate", "3-4")
        assert not gif.exists() and named.endswith(".gif") and open(named, "rb").read() == b"GIF89a"
        folder = session.out_dir / downloads.FOLDER
    finally:
        session.release()
    assert not folder.exists()  # cleaned with the session


def test_result_folder_is_bounded(monkeypatch):
    from app import downloads
    from app.sessions import Session

    monkeypatch.setattr(downloads, "MAX_FILES", 3)
    monkeypatch.setattr(downloads, "get_limits", lambda: type("L", (), {"max_frames": 0})())
    session = Session()
    try:
        paths = [downloads.result_file(session, Image.new("RGB", (4, 4), (k, 0, 0)), "generate", k)
                 for k in range(6)]
        kept = sorted(p.name for p in (session.out_dir / downloads.FOLDER).iterdir())
        assert kept == sorted(os.path.basename(p) for p in paths[-3:])
    finally:
        session.release()


def test_generate_download_is_named_native_and_carries_its_parameters(app_url, tmp_path):
    """Through the real app: the file Gradio serves has the method-seed-time name, the model's size and the
    PNG text (A1111's "CFG scale"), byte for byte what the studio wrote."""
    import re

    from gradio_client import Client

    client = Client(app_url, verbose=False, download_files=str(tmp_path))
    _, path, seed, status = client.predict("a red circle", "", 4321, 3, 6.5, 64, 48, False, 1.0,
                                           api_name="/generate")
    assert seed == 4321 and status.startswith("Done")
    assert re.fullmatch(NAME.format(method="generate", seed=4321, ext="png"), os.path.basename(path))
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (64, 48)
        text = im.text["parameters"]
    assert "CFG scale: 6.5" in text and "Seed: 4321" in text and "Size: 64x48" in text
    assert json.loads(Image.open(path).text["studio"])["seed"] == 4321

    _, gallery, gif, *_, mp4 = client.predict("a red circle", "", "", 3, 4, 2, 5.0, 64, 64, False, 1.0, 3,
                                              api_name="/interpolate_sequence")
    names = [os.path.basename(item["image"]) for item in gallery]
    assert [re.fullmatch(NAME.format(method="interpolate", seed="3-4", ext="png"), n) is not None
            for n in names] == [True] * 3
    assert re.fullmatch(NAME.format(method="interpolate", seed="3-4", ext="gif"), os.path.basename(gif))
    assert re.fullmatch(NAME.format(method="interpolate", seed="3-4", ext="mp4"),
                        os.path.basename(mp4["video"] if isinstance(mp4, dict) else mp4))


# ------------------------------------------------------------------------------------------ in the browser
@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    with launched_browser() as b:
        yield b


@needs_chromium
def test_dropping_an_a1111_png_on_generate_sets_its_controls(browser, app_url, tmp_path):
    path = png_with_text(tmp_path / "a1111.png", {"parameters": A1111_TXT2IMG.replace("Size: 512x768",
                                                                                      "Size: 96x128")})
    with fresh_page(browser, app_url, 45_000, tmp_path / "restored.png") as pg:
        pg.set_input_files("#generate-restore-png input[type=file]", str(path))
        note = pg.locator("#generate-restore-note")
        note.get_by_text("Restored:").wait_for()
        assert pg.input_value("#gen-prompt textarea") == "masterpiece, a castle on a hill, <lora:detail:0.6>"
        assert pg.input_value("#gen-steps input[type=number]") == "20"
        assert pg.input_value("#gen-seed input") == "42"
        assert "CFG scale" in note.inner_text() and "v1-5-pruned" in note.inner_text()
