"""Per-model recommended settings (pipelines/recommended.py): read from a model folder's studio_model.json, the
reference defaults for folders without them, bad entries ignored; the embedded model recommends the drag
settings its evaluation measured; the Drag tab's controls start at the active model's values, say whose, and
move to another model's on a switch."""
from __future__ import annotations

import ast
import dataclasses
import json
import shutil
from pathlib import Path

import gradio as gr
import pytest

from pipelines.core.events import run_to_end
from pipelines.core.models import EMBEDDED_DIR, load_model
from pipelines.drag import DragParams
from pipelines.recommended import overrides, recommended, recommended_params, reference, source_note
from pipelines.sdedit import SDEditParams

ROOT = Path(__file__).resolve().parent.parent
DRAG = {"lora_steps": 40, "drag_iterations": 160, "latent_lr": 0.03, "inversion_strength": 0.5, "r1": 2,
        "warm_start": True}


def with_info(model, info: dict, label: str = "test model"):
    """The same loaded model with other studio_model.json notes (a shallow copy: weights shared)."""
    return dataclasses.replace(model, info=info, label=label)


def test_reference_defaults_are_the_params_dataclass_defaults():
    ref = reference("drag")
    assert ref["lora_steps"] == DragParams.lora_steps == 80 and ref["drag_iterations"] == 80
    assert ref["latent_lr"] == 0.01 and ref["inversion_strength"] == 0.7 and ref["warm_start"] is False
    assert "handles" not in ref and "prompt" not in ref
    assert reference("sdedit")["strength"] == SDEditParams.strength


def test_a_folder_with_and_without_the_section(tiny_model, tmp_path):
    """Read from the folder's studio_model.json when the model loads; a folder without one gets the reference."""
    assert recommended(tiny_model, "drag") == reference("drag") and overrides(tiny_model, "drag") == {}
    assert source_note(tiny_model, "drag", "lora_steps") == "reference default"
    folder = shutil.copytree(Path(tiny_model.folder), tmp_path / "tiny-with-section")
    info = json.loads((folder / "studio_model.json").read_text())
    info.update(label="tiny with recommendations", recommended={"drag": {"lora_steps": 12, "warm_start": True}})
    (folder / "studio_model.json").write_text(json.dumps(info))
    model = run_to_end(load_model(str(folder)))
    rec = recommended(model, "drag")
    assert rec == {**reference("drag"), "lora_steps": 12, "warm_start": True}
    assert rec["drag_iterations"] == 80  # not named: the reference's
    assert source_note(model, "drag", "lora_steps") == "recommended for tiny with recommendations"
    assert source_note(model, "drag", "r2") == "reference default"
    assert recommended(model, "sdedit") == reference("sdedit")  # no entry for that method


def test_recommended_params_for_the_python_api(tiny_model):
    model = with_info(tiny_model, {"recommended": {"drag": DRAG}})
    p = recommended_params(model, "drag", handles=[(1, 2)], targets=[(3, 4)], drag_iterations=7)
    assert isinstance(p, DragParams) and p.handles == [(1, 2)] and p.drag_iterations == 7  # the caller's value wins
    assert (p.lora_steps, p.latent_lr, p.warm_start, p.r2) == (40, 0.03, True, DragParams.r2)
    assert recommended_params(tiny_model, "drag", handles=[], targets=[]) == DragParams([], [])


@pytest.mark.parametrize("entry, expected", [
    ({"lora_steps": "40"}, {}),                       # text is not a number
    ({"lora_steps": 40.5}, {}),                       # an int parameter takes integral values only
    ({"lora_steps": 40.0}, {"lora_steps": 40}),
    ({"lora_steps": True}, {}),                       # a bool is not a count
    ({"warm_start": 1}, {}),                          # nor a number a bool
    ({"latent_lr": 3}, {"latent_lr": 3.0}),
    ({"latent_lr": float("nan")}, {}),
    ({"no_such_parameter": 1, "handles": [[1, 2]]}, {}),
])
def test_bad_entries_are_ignored(tiny_model, entry, expected):
    model = with_info(tiny_model, {"recommended": {"drag": entry}})
    assert overrides(model, "drag") == expected
    assert recommended(model, "drag") == {**reference("drag"), **expected}


@pytest.mark.parametrize("info", [{"recommended": None}, {"recommended": []}, {"recommended": {"drag": 3}}, {}])
def test_malformed_sections_give_the_reference(tiny_model, info):
    assert recommended(with_info(tiny_model, info), "drag") == reference("drag")


def _eval_drag_tuned() -> dict:
    """benchmarks/eval_embedded.py's DRAG_TUNED, read from its source (importing it loads the training code)."""
    tree = ast.parse((ROOT / "benchmarks" / "eval_embedded.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "DRAG_TUNED":
            return {k.arg: ast.literal_eval(k.value) for k in node.value.keywords}
    raise AssertionError("DRAG_TUNED not found")


def test_the_embedded_model_recommends_the_drag_settings_its_evaluation_measured():
    """The "tuned + warm start, LoRA 40 steps" row of benchmarks/RESULTS.md (success 0.75 against the reference
    settings' 0.15): the eval's tuned settings, the warm start and a 40-step LoRA."""
    info = json.loads((EMBEDDED_DIR / "studio_model.json").read_text())
    assert info["recommended"]["drag"] == {**_eval_drag_tuned(), "warm_start": True, "lora_steps": 40} == DRAG
    # the inpainting UNet's guidance: the 'inpaint' eval rows measure it against the reference 7.5
    assert info["recommended"]["inpaint"] == {"guidance": 3.0}


# ------------------------------------------------------------------------------------------------ the UI

def _by_id(demo, elem_id):
    found = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id]
    assert len(found) == 1, elem_id
    return found[0]


def _by_label(demo, label):
    found = [b for b in demo.blocks.values() if getattr(b, "label", None) == label]
    assert len(found) == 1, label
    return found[0]


def test_drag_controls_start_at_the_models_recommended_values_and_follow_a_switch(tiny_model):
    from app.context import Context
    from app.hosting import Hosting
    from app.sessions import SessionRegistry
    from app.tabs import drag as drag_tab
    from app.ui import build_demo
    from pipelines.studio import Studio

    tuned = with_info(tiny_model, {"recommended": {"drag": DRAG, "sdedit": {"strength": 0.4},
                                                   "inpaint": {"guidance": 3.0}}}, "tuned tiny")
    studio = Studio()
    studio.model = tuned
    demo = build_demo(studio)
    values = {"drag-lora-steps": 40, "drag-iters": 160, "drag-warm": True}
    for elem_id, value in values.items():
        control = _by_id(demo, elem_id)
        assert control.value == value and control.info.endswith("Recommended for tuned tiny"), elem_id
    assert _by_label(demo, "Latent learning rate").value == 0.03
    assert _by_label(demo, "r1 (supervision patch)").value == 2
    assert _by_label(demo, "Inversion strength (of 50 steps)").value == 0.5
    strength = _by_id(demo, "sdedit-strength")   # SDEdit's t0 follows the model's recommendation too
    assert strength.value == 0.4 and strength.info.endswith("· Recommended for tuned tiny"), strength.info
    guidance = _by_id(demo, "inpaint-guidance")   # and Inpaint's guidance
    assert guidance.value == 3.0 and guidance.info == "Recommended for tuned tiny", guidance.info
    r2 = _by_label(demo, "r2 (tracking radius)")
    assert r2.value == 3 and r2.info == "Reference default"   # not in the model's section

    # the tab alone on a model without recommendations: the reference values, said so
    studio.model = tiny_model
    ctx = Context(studio, SessionRegistry(), Hosting())
    with gr.Blocks():
        drag_tab.build(ctx)
    by_name = {c.name: c.control for c in ctx.recommended if c.method == "drag"}
    assert set(by_name) >= set(DRAG)
    assert {name: by_name[name].value for name in DRAG} == {name: reference("drag")[name] for name in DRAG}
    assert by_name["lora_steps"].info == "Reference default"
    # a model switch: the updates the model panel chains after a load move every control to the new model's
    studio.model = tuned
    updates = dict(zip([c.name for c in ctx.recommended], ctx.recommended_updates()))
    assert {name: updates[name]["value"] for name in DRAG} == DRAG
    assert updates["lora_steps"]["info"] == "Recommended for tuned tiny"
    studio.model = tiny_model
    updates = dict(zip([c.name for c in ctx.recommended], ctx.recommended_updates()))
    assert {name: updates[name]["value"] for name in DRAG} == {name: reference("drag")[name] for name in DRAG}
    assert updates["lora_steps"]["info"] == "Reference default"
    assert updates["warm_start"]["info"].endswith("Reference default") and "Needs a painted region" in \
        updates["warm_start"]["info"]


def test_the_command_line_takes_the_models_recommendations_for_options_left_out(tiny_model, tmp_path):
    """`studio drag` on a folder recommending 3 iterations and strength 0.5: those are used, while the options
    given (LoRA steps 0, 4 steps) win over the folder's."""
    from app.cli import main
    from pipelines.core.metadata import read_metadata

    folder = shutil.copytree(Path(tiny_model.folder), tmp_path / "tiny-cli")
    info = json.loads((folder / "studio_model.json").read_text())
    info["recommended"] = {"drag": {"drag_iterations": 3, "inversion_strength": 0.5, "lora_steps": 60}}
    (folder / "studio_model.json").write_text(json.dumps(info))
    image, out = tmp_path / "in.png", tmp_path / "dragged.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 40, 40)).save(image)
    assert main(["drag", "--model", str(folder), "--image", str(image), "--points", "20,20,28,20", "--lora-steps",
                 "0", "--steps", "4", "--out", str(out), "--quiet"]) == 0
    meta = read_metadata(out)
    assert (meta["drag_iterations"], meta["inversion_strength"]) == (3, 0.5)    # the folder's
    assert (meta["lora_steps"], meta["steps"]) == (0, 4)                         # given: the caller's
    assert meta["r2"] == DragParams.r2                                            # neither: the reference
