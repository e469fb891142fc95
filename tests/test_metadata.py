import json

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pipelines.core.errors import InputError
from pipelines.core.metadata import (
    format_parameters,
    parse_parameters,
    read_metadata,
    save_png,
    with_metadata,
)

PARAMS = {
    "prompt": "a red fox in the snow, golden hour",
    "negative_prompt": "blurry, low quality",
    "steps": 30,
    "guidance": 7.5,
    "seed": 1234,
    "lora_strength": 0.8,
    "sampler": "DDIM",
}


def test_format_parameters_a1111_layout():
    assert format_parameters(PARAMS) == (
        "a red fox in the snow, golden hour\n"
        "Negative prompt: blurry, low quality\n"
        "Steps: 30, CFG scale: 7.5, Seed: 1234, Lora strength: 0.8, Sampler: DDIM"
    )


def test_format_parameters_skips_empty_negative_and_quotes_values():
    text = format_parameters(
        {
            "prompt": "cat",
            "negative_prompt": "",
            "size": "512x512",
            "lora": 'style, "v2"',
            "note": "a: b",
            "multi_line": "x\ny",
        }
    )
    assert text == (
        "cat\n"
        'Size: 512x512, Lora: "style, \\"v2\\"", Note: "a: b", Multi line: "x\\ny"'
    )


def test_format_parameters_prompt_only():
    assert format_parameters({"prompt": "just a prompt"}) == "just a prompt"


def test_parse_inverts_format():
    params = {
        "prompt": "line one\nline two, with comma",
        "negative_prompt": "bad: hands",
        "steps": "20",
        "lora": 'a, "b"',
        "strength": "0.75",
    }
    assert parse_parameters(format_parameters(params)) == params


def test_with_metadata_sets_info_on_a_copy():
    img = Image.new("RGB", (8, 8))
    img.info["dpi"] = (72, 72)
    out = with_metadata(img, PARAMS)
    assert "parameters" not in img.info
    assert out is not img
    assert out.info["parameters"] == format_parameters(PARAMS)
    assert out.info["studio"] == json.dumps(PARAMS, separators=(",", ":"))
    assert json.loads(out.info["studio"]) == PARAMS
    assert out.info["dpi"] == (72, 72)  # existing info is kept


def test_studio_json_round_trip_through_png(tmp_path):
    params = dict(PARAMS, prompt="ein Fuchs im Schnee \u2744", flags=[1, 2], tiled=True, eta=None)
    path = save_png(with_metadata(Image.new("RGB", (16, 16), (1, 2, 3)), params), tmp_path / "o.png")
    assert path.is_file()
    with Image.open(path) as reread:
        assert reread.getpixel((0, 0)) == (1, 2, 3)
        assert "\u2744" in reread.info["parameters"]
    assert read_metadata(path) == params
    assert read_metadata(str(path)) == params
    assert read_metadata(path.read_bytes()) == params


def test_save_png_writes_only_str_entries(tmp_path):
    img = Image.new("RGB", (8, 8))
    img.info.update({"comment": "hello", "dpi": (72, 72), "blob": b"\x00"})
    path = save_png(img, tmp_path / "x.png")
    with Image.open(path) as reread:
        assert reread.text == {"comment": "hello"}


def test_read_metadata_from_pil_image():
    assert read_metadata(with_metadata(Image.new("RGB", (8, 8)), PARAMS)) == PARAMS


def test_a1111_parameters_only(tmp_path):
    text = (
        "masterpiece, a castle on a hill\n"
        "at dusk\n"
        "Negative prompt: lowres, bad anatomy\n"
        'Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x768, '
        'Lora hashes: "detail: abc123, style: def456", Denoising strength: 0.4'
    )
    info = PngInfo()
    info.add_text("parameters", text)
    path = tmp_path / "a1111.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    assert read_metadata(path) == {
        "prompt": "masterpiece, a castle on a hill\nat dusk",
        "negative_prompt": "lowres, bad anatomy",
        "steps": "20",
        "sampler": "Euler a",
        "guidance": "7",
        "seed": "42",
        "size": "512x768",
        "lora_hashes": "detail: abc123, style: def456",
        "strength": "0.4",
    }


def test_parse_prompt_without_parameter_line():
    assert parse_parameters("a cat, sitting on a mat") == {"prompt": "a cat, sitting on a mat"}
    assert parse_parameters("a cat\nNegative prompt: dogs, birds") == {
        "prompt": "a cat",
        "negative_prompt": "dogs, birds",
    }
    assert parse_parameters("") == {}


def test_corrupt_studio_json_falls_back_to_parameters():
    img = Image.new("RGB", (8, 8))
    img.info.update({"studio": "{not json", "parameters": "a dog\nSteps: 5"})
    assert read_metadata(img) == {"prompt": "a dog", "steps": "5"}


def test_png_without_metadata_gives_empty_dict(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    assert read_metadata(path) == {}
    assert read_metadata(Image.new("RGB", (8, 8))) == {}


def test_unreadable_files_raise_input_error(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(InputError):
        read_metadata(text)
    with pytest.raises(InputError):
        read_metadata(tmp_path / "missing.png")
    with pytest.raises(InputError):
        read_metadata(b"\x89PNG\r\n\x1a\ngarbage")
