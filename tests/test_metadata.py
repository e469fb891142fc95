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


# ------------------------------------------------------------------------------------------ A1111 names
def test_a1111_names_written_and_read_back():
    params = {"prompt": "a vase", "negative_prompt": "blur", "task": "sdedit", "strength": "0.6", "steps": "30",
              "guidance": "7.5", "seed": "12", "size": "512x768", "eta": "0.0", "model": "embedded",
              "sampler": "DDIM (eta 0)", "lora": "smooth", "lora_strength": "0.8"}
    text = format_parameters(params)
    assert text.splitlines()[-1] == (
        "Task: sdedit, Denoising strength: 0.6, Steps: 30, CFG scale: 7.5, Seed: 12, Size: 512x768, Eta DDIM: 0.0, "
        "Model: embedded, Sampler: DDIM (eta 0), Lora: smooth, Lora strength: 0.8")
    assert parse_parameters(text) == params


def test_instruct_text_guidance_is_cfg_scale_and_comes_back_as_text_guidance():
    params = {"task": "instruct", "instruction": "make it blue", "seed": "3", "steps": "20",
              "text_guidance": "7.5", "image_guidance": "1.5", "scheduler": "euler_a", "size": "64x64"}
    text = format_parameters(params)
    assert "CFG scale: 7.5, Image CFG scale: 1.5" in text
    assert parse_parameters(text) == {"prompt": "", **params}
    # without the studio's task, A1111's CFG scale is the plain guidance
    assert parse_parameters("turn it red\nSteps: 20, CFG scale: 7, Image CFG scale: 1.5")["guidance"] == "7"


def test_studio_params_round_trip_through_the_text_alone():
    """Every task's parameters come back from the A1111 text alone (what a tool that drops the studio chunk
    leaves), as strings, under the studio's own keys."""
    for params in (
        {"prompt": "a, b: c", "negative_prompt": "x", "task": "generate", "seed": 1, "steps": 30, "guidance": 7.5,
         "size": "64x64", "eta": 0.0, "model": "tiny-random", "lora": "none", "lora_strength": 0.0,
         "sampler": "DDIM (eta 0)"},
        {"prompt": "p", "prompt_b": "q", "task": "interpolate", "seed_a": 0, "seed_b": 1, "interpolation_eta": 0.5},
        {"task": "edit", "edit_method": "p2p", "source_prompt": "cat", "prompt": "dog", "reweight_words": "dog, big",
         "cross_replace_steps": 0.8, "keep_background": False},
        {"task": "drag", "prompt": "", "handles": [[1.0, 2.0]], "targets": [[3.0, 4.0]], "warm_start": True},
    ):
        text = format_parameters(params)
        back = parse_parameters(text)
        assert back == {"prompt": "", **{k: v if isinstance(v, str) else str(v) for k, v in params.items()}}, text


def test_real_a1111_and_civitai_strings():
    text = (
        "photo of a lighthouse, (dramatic sky:1.2), <lora:add_detail:0.5>\n"
        "Negative prompt: easynegative, (worst quality:1.4)\n"
        "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, Seed: 3527465454, Size: 832x1216, "
        "Model hash: 4496b36d48, Model: juggernautXL_v9, Denoising strength: 0.35, Clip skip: 2, Hires upscale: 1.5, "
        'Hires upscaler: 4x-UltraSharp, Lora hashes: "add_detail: 7c6bad76eb54", TI hashes: "easynegative: '
        'c74b4e810b03", Hashes: {"model": "4496b36d48", "lora:add_detail": "7c6bad76eb54"}, Version: v1.7.0'
    )
    got = parse_parameters(text)
    assert got["prompt"] == "photo of a lighthouse, (dramatic sky:1.2), <lora:add_detail:0.5>"
    assert got["negative_prompt"] == "easynegative, (worst quality:1.4)"
    assert (got["steps"], got["sampler"], got["guidance"], got["seed"], got["size"]) == (
        "28", "DPM++ 2M", "5.5", "3527465454", "832x1216")
    assert got["model"] == "juggernautXL_v9" and got["strength"] == "0.35" and got["clip_skip"] == "2"
    assert got["lora_hashes"] == "add_detail: 7c6bad76eb54" and got["version"] == "v1.7.0"
    assert json.loads(got["hashes"]) == {"model": "4496b36d48", "lora:add_detail": "7c6bad76eb54"}


def test_a_line_that_only_partly_parses_counts_as_a1111_does():
    # an unquoted value with a comma breaks the strict parse; A1111 keeps the line (>= 3 pairs, with Steps)
    got = parse_parameters("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Template: a, b, Seed: 5")
    assert got["prompt"] == "a cat" and got["steps"] == "20" and got["guidance"] == "7" and got["seed"] == "5"
    # a prompt line with one "key: value" inside stays prompt
    assert parse_parameters("a cat, Steps: 5") == {"prompt": "a cat, Steps: 5"}


def test_hostile_studio_json_falls_back_to_the_text(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "deep.png"
    info = PngInfo()
    info.add_text("studio", deep)
    info.add_text("parameters", "a dog\nSteps: 5")
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    assert read_metadata(path) == {"prompt": "a dog", "steps": "5"}


def test_large_foreign_text_chunks_are_skipped_ours_refused(tmp_path):
    path = tmp_path / "xmp.png"
    info = PngInfo()
    info.add_itxt("XML:com.adobe.xmp", "x" * 400_000)
    info.add_text("parameters", "a dog\nSteps: 5")
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    assert read_metadata(path) == {"prompt": "a dog", "steps": "5"}
    big = tmp_path / "big.png"
    info = PngInfo()
    info.add_text("parameters", "y" * 400_000)
    Image.new("RGB", (8, 8)).save(big, pnginfo=info)
    with pytest.raises(InputError, match="too long"):
        read_metadata(big)
