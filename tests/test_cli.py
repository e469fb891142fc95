"""The `studio` command line (app/cli.py): job commands write the same pixels and PNG parameters as the Studio
API, their options mirror the parameter dataclasses, and bad input gets the pipelines' message and no file."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from app.cli import COMMANDS, _field_parser, _resolve, build_parser, main
from pipelines.core.events import run_to_end
from pipelines.core.metadata import read_metadata
from pipelines.generate import GenerateParams
from pipelines.sdedit import SDEditParams


@pytest.fixture()
def photo(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.slow
def test_generate_writes_the_studio_result_with_its_parameters(tmp_path, studio, capsys):
    out = tmp_path / "sub" / "g.png"
    code = main(["generate", "--model", "tiny-random", "--prompt", "a red circle", "--steps", "3", "--seed", "5",
                 "--guidance", "4", "--out", str(out), "--quiet"])
    assert code == 0 and capsys.readouterr().out.strip() == str(out)
    expected = run_to_end(studio.generate(GenerateParams(prompt="a red circle", steps=3, seed=5, guidance=4)))
    written = Image.open(out)
    assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(expected.image.convert("RGB")))
    meta = read_metadata(out)
    assert meta == read_metadata(expected.image)
    assert meta["seed"] == 5 and meta["steps"] == 3 and meta["guidance"] == 4 and meta["prompt"] == "a red circle"


@pytest.mark.slow
def test_sdedit_repeats_write_numbered_files(tmp_path, photo, studio):
    out = tmp_path / "s.png"
    code = main(["sdedit", "--model", "tiny-random", "--image", str(photo), "--prompt", "a blue square",
                 "--steps", "6", "--strength", "0.5", "--seed", "2", "--repeats", "2", "--out", str(out), "--quiet"])
    assert code == 0 and not out.exists()
    files = [tmp_path / "s_000.png", tmp_path / "s_001.png"]
    expected = run_to_end(studio.sdedit(str(photo), SDEditParams(prompt="a blue square", steps=6, strength=0.5,
                                                                  seed=2, repeats=2)))
    for path, want in zip(files, expected.images, strict=True):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(want.image.convert("RGB")))
        assert read_metadata(path)["seed"] == want.seed
    assert read_metadata(files[0])["seed"] != read_metadata(files[1])["seed"]


@pytest.mark.slow
def test_invert_and_drag_write_an_image_of_the_input_size(tmp_path, photo):
    recon, dragged = tmp_path / "r.png", tmp_path / "d.png"
    assert main(["invert", "--model", "tiny-random", "--image", str(photo), "--steps", "4", "--out", str(recon),
                 "--quiet"]) == 0
    assert main(["drag", "--model", "tiny-random", "--image", str(photo), "--points", "20,20,28,20",
                 "--lora-steps", "0", "--drag-iterations", "2", "--steps", "4", "--out", str(dragged), "--quiet"]) == 0
    for path, task in ((recon, "invert"), (dragged, "drag")):
        assert Image.open(path).size == (64, 64)
        assert task in str(read_metadata(path).get("task", ""))


def test_bad_input_gets_the_pipeline_message_and_writes_nothing(tmp_path, photo, capsys):
    out = tmp_path / "x.png"
    assert main(["generate", "--model", "tiny-random", "--prompt", "   ", "--out", str(out)]) == 2
    assert "Please enter a prompt" in capsys.readouterr().err and not out.exists()
    assert main(["generate", "--model", "tiny-random", "--prompt", "a", "--steps", "100000", "--out", str(out)]) == 2
    assert "Steps" in capsys.readouterr().err and not out.exists()
    assert main(["drag", "--model", "tiny-random", "--image", str(photo), "--points", "1,2,3",
                 "--out", str(out)]) == 2
    assert "pair" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit):
        main(["drag", "--model", "tiny-random", "--image", str(photo), "--points", "a,b,c,d", "--out", str(out)])
    with pytest.raises(SystemExit):  # argparse: not a number
        main(["generate", "--prompt", "a", "--steps", "many", "--out", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: c.name)
def test_options_mirror_the_parameter_dataclass(cmd):
    """Every scalar field of the command's parameters is an option whose default is the dataclass default, so
    the command line never drifts from what the pipeline accepts."""
    parser, offered = build_parser()
    required = ["--out", "o.png"] + [a for name in cmd.images for a in (f"--{name}", "i.png")]
    required += ["--points", "1,2,3,4"] if cmd.name == "drag" else []
    args = parser.parse_args([cmd.name, *required])
    params_cls = _resolve(cmd.params)
    scalar = [f for f in dataclasses.fields(params_cls) if _field_parser(f.type)[0] is not None
              and f.name not in cmd.skip and f.name != "lora"]
    assert scalar and sorted(offered[cmd.name]) == sorted(f.name for f in scalar)
    for f in scalar:
        default = None if f.default is dataclasses.MISSING else f.default
        assert getattr(args, f.name) == default, f.name


def test_bool_options_take_words():
    parser, _ = build_parser()
    args = parser.parse_args(["drag", "--image", "i.png", "--points", "1,2,3,4", "--out", "o.png",
                              "--warm-start", "yes", "--smooth-lora", "false"])
    assert args.warm_start is True and args.smooth_lora is False
    with pytest.raises(SystemExit):
        parser.parse_args(["drag", "--image", "i.png", "--points", "1,2,3,4", "--out", "o.png", "--warm-start", "2"])


@pytest.mark.slow
def test_interpolate_writes_one_png_per_frame_whose_ends_are_the_seeds_images(tmp_path, studio):
    out = tmp_path / "f.png"
    assert main(["interpolate", "--model", "tiny-random", "--prompt-a", "a red circle", "--prompt-b", "a red circle",
                 "--seed-a", "1", "--seed-b", "2", "--steps", "3", "--frames", "3", "--out", str(out), "--quiet"]) == 0
    frames = [np.asarray(Image.open(tmp_path / f"f_{k:03d}.png").convert("RGB")) for k in range(3)]
    assert not (tmp_path / "f_003.png").exists()
    for seed, frame in ((1, frames[0]), (2, frames[2])):
        alone = run_to_end(studio.generate(GenerateParams(prompt="a red circle", steps=3, seed=seed)))
        assert np.abs(frame.astype(int) - np.asarray(alone.image.convert("RGB")).astype(int)).max() <= 1
    assert not np.array_equal(frames[0], frames[1])
