"""The Smooth LoRA in the studio: the comparison jobs (an interpolation without and with a LoRA, seeds and real
images), and the UI's LoRA controls: "Use the Smooth LoRA" applies the adapter named "smooth" (never the one
loaded last), the adapter menu lists the loaded adapters, and the compare endpoints work end to end.

Everything runs on a private tiny model with a Smooth-LoRA-format file made here (tests/test_lora.py's), so the
shared session model never gets an adapter; the e2e tests run their own app on that model."""
from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from browser_support import app_only, launched_browser, needs_chromium
from helpers import forward_calls, pixels
from PIL import Image
from test_lora import make_peft_lora, make_smooth_lora

from pipelines.core.cache import LRUCache
from pipelines.core.errors import InputError
from pipelines.core.events import Cancelled, CancelToken, run_to_end
from pipelines.core.lora import SMOOTH_NAME, load_lora
from pipelines.generate import GenerateParams, generate
from pipelines.interpolation import (
    ComparisonFrames,
    InterpolationParams,
    interpolation_compare,
    interpolation_sequence,
    istd,
)
from pipelines.real_interpolation import (
    RealInterpolationParams,
    real_interpolation_compare,
    real_interpolation_sequence,
)

PROMPT_A, PROMPT_B = "a large red circle on the left on a white background", "a large blue square on the right"
STEPS, FRAMES = 2, 3


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model(_studio_cache):
    """A private tiny model (adapters are attached to its UNet), its base UNet output taken first."""
    from pipelines.core.models import load_model

    return run_to_end(load_model("tiny-random"))


@pytest.fixture(scope="module")
def probe(model):
    g = torch.Generator().manual_seed(7)
    x, cond = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)

    @torch.no_grad()
    def run():
        return model.unet(x, 500, encoder_hidden_states=cond).sample

    return run


@pytest.fixture(scope="module")
def base_out(model, probe):
    return probe()  # before any adapter is attached


@pytest.fixture(scope="module")
def smooth(model, base_out, tmp_path_factory):
    path = make_smooth_lora(model.unet, tmp_path_factory.mktemp("smooth") / "smooth_lora.safetensors")
    assert load_lora(model, str(path), SMOOTH_NAME) == SMOOTH_NAME
    return path


def assert_no_adapter_active(probe, base_out):
    assert torch.equal(probe(), base_out), "an adapter is still switched on"


def seed_params(**kw) -> InterpolationParams:
    return InterpolationParams(**{**dict(prompt_a=PROMPT_A, prompt_b=PROMPT_B, seed_a=3, seed_b=4, steps=STEPS,
                                         width=64, height=64, lora=SMOOTH_NAME, lora_strength=1.0), **kw})


def real_params(**kw) -> RealInterpolationParams:
    return RealInterpolationParams(**{**dict(prompt_a=PROMPT_A, prompt_b=PROMPT_B, steps=STEPS, inversion="nti",
                                             inner_steps=1, lora=SMOOTH_NAME, lora_strength=0.8), **kw})


def images():
    from app import examples

    return examples.IMAGES[0][0], examples.IMAGES[1][0]


def assert_same_frames(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert np.array_equal(pixels(x), pixels(y))


# ------------------------------------------------------------------------ comparison jobs (pipelines)
def test_seed_comparison_is_the_plain_sequences_without_and_with_the_lora(model, smooth, probe, base_out):
    p = seed_params()
    events = list(interpolation_compare(model, p, FRAMES))
    cmp = events[-1].result
    assert_no_adapter_active(probe, base_out)
    plain = run_to_end(interpolation_sequence(model, replace(p, lora=None), FRAMES))
    with_lora = run_to_end(interpolation_sequence(model, p, FRAMES))
    assert_same_frames(cmp.without.frames, plain.frames)
    assert_same_frames(cmp.with_lora.frames, with_lora.frames)
    assert not np.array_equal(pixels(cmp.without.frames[1]), pixels(cmp.with_lora.frames[1])), "the LoRA did nothing"
    assert cmp.without.istd == pytest.approx(istd(plain.frames), rel=1e-12)
    assert cmp.with_lora.istd == pytest.approx(istd(with_lora.frames), rel=1e-12)
    assert cmp.istd_ratio == pytest.approx(cmp.with_lora.istd / cmp.without.istd)
    assert (cmp.lora, cmp.strength) == (SMOOTH_NAME, 1.0)
    # the frames' metadata says which sequence they belong to
    assert json.loads(cmp.without.frames[0].info["studio"])["lora"] == "none"
    assert json.loads(cmp.with_lora.frames[0].info["studio"])["lora"] == SMOOTH_NAME
    # events: one result, at the end; every finished frame tagged with its sequence; progress over both
    assert [e.done for e in events].count(True) == 1 and events[-1].done
    tagged = [(e.partial.with_lora, len(e.partial.frames)) for e in events if isinstance(e.partial, ComparisonFrames)]
    assert tagged == [(False, 1), (False, 2), (False, 3), (True, 1), (True, 2), (True, 3)]
    steps = [e.step for e in events]
    assert steps == sorted(steps) and events[-1].total == 2 * STEPS * FRAMES == events[-1].step
    assert any(e.stage.startswith("without LoRA: ") for e in events)
    assert any(e.stage.startswith("with smooth x1: ") for e in events)


@pytest.mark.parametrize("how", ["cancel", "close"])
def test_seed_comparison_stopped_in_the_lora_sequence_switches_it_off(model, smooth, probe, base_out, how):
    token = CancelToken()
    job = interpolation_compare(model, seed_params(steps=3), FRAMES, cancel=token)
    for ev in job:
        if isinstance(ev.partial, ComparisonFrames) and ev.partial.with_lora:
            break  # mid-way through the sequence with the LoRA (switched on now)
    else:
        pytest.fail("the job never reached the sequence with the LoRA")
    assert not torch.equal(probe(), base_out)  # the LoRA is on while its sequence renders
    if how == "cancel":
        token.cancel()
        with pytest.raises(Cancelled):
            next(job)
    else:
        job.close()  # what the UI's stream does when a Stop ends the event
    assert_no_adapter_active(probe, base_out)


def test_comparison_needs_a_loaded_adapter_before_rendering(model, smooth, probe, base_out):
    with forward_calls(model.unet) as calls:
        with pytest.raises(InputError, match="'missing' is not loaded"):
            run_to_end(interpolation_compare(model, seed_params(lora="missing"), FRAMES))
        with pytest.raises(InputError, match="Choose the LoRA"):
            run_to_end(interpolation_compare(model, seed_params(lora=None), FRAMES))
        with pytest.raises(InputError, match="'missing' is not loaded"):
            run_to_end(real_interpolation_compare(model, *images(), real_params(lora="missing"), FRAMES))
    assert calls == []
    assert_no_adapter_active(probe, base_out)


@pytest.mark.slow
def test_real_comparison_inverts_again_with_the_lora(model, smooth, probe, base_out):
    a, b = images()
    p = real_params()
    cache = LRUCache(8)
    cmp = run_to_end(real_interpolation_compare(model, a, b, p, FRAMES, cache))
    assert_no_adapter_active(probe, base_out)
    # two inversions cached: one without the LoRA, one made with it switched on (its key names the LoRA)
    keys = list(cache._data)
    assert len(keys) == 2 and sorted(str(k[-2]) for k in keys) == ["None", SMOOTH_NAME]
    # each sequence equals the plain sequence job's (which inverts inside its own lora_applied), freshly inverted
    plain = run_to_end(real_interpolation_sequence(model, a, b, replace(p, lora=None), FRAMES))
    with_lora = run_to_end(real_interpolation_sequence(model, a, b, p, FRAMES))
    assert_same_frames(cmp.without.frames, plain.frames)
    assert_same_frames(cmp.with_lora.frames, with_lora.frames)
    assert not np.array_equal(pixels(cmp.without.frames[0]), pixels(cmp.with_lora.frames[0]))
    assert cmp.without.istd == pytest.approx(istd(plain.frames), rel=1e-12)
    assert cmp.with_lora.istd == pytest.approx(istd(with_lora.frames), rel=1e-12)
    assert cmp.strength == 0.8
    assert json.loads(cmp.with_lora.frames[0].info["studio"])["lora_strength"] == 0.8


def test_real_comparison_cancelled_while_inverting_with_the_lora(model, smooth, probe, base_out):
    token = CancelToken()
    job = real_interpolation_compare(model, *images(), real_params(inversion="ddim", steps=4), FRAMES,
                                     cancel=token)
    for ev in job:
        if ev.stage.startswith("with smooth") and "invert" in ev.stage:
            break
    else:
        pytest.fail("the job never inverted with the LoRA")
    token.cancel()
    with pytest.raises(Cancelled):
        run_to_end(job)
    assert_no_adapter_active(probe, base_out)


def test_studio_comparisons_release_the_model(model, smooth, probe, base_out):
    from pipelines.studio import Studio

    studio = Studio()
    studio.model = model
    cmp = run_to_end(studio.interpolation_compare(seed_params(), 2))
    assert len(cmp.without.frames) == len(cmp.with_lora.frames) == 2
    cmp = run_to_end(studio.real_interpolation_compare(*images(), real_params(inversion="ddim"), 2))
    assert len(cmp.with_lora.frames) == 2
    assert studio._lock.acquire(timeout=1)
    studio._lock.release()
    assert_no_adapter_active(probe, base_out)


# ------------------------------------------------------------------------------- LoRA controls (UI)
def _components(demo, kind):
    return [b for b in demo.blocks.values() if type(b).__name__ == kind]


def test_lora_controls_default_to_the_smooth_lora(model, smooth, tiny_model):
    import gradio as gr

    from app.context import SMOOTH_LABEL
    from app.ui import build_demo
    from pipelines.studio import Studio

    with_smooth, without = Studio(), Studio()
    with_smooth.model, without.model = model, tiny_model
    assert SMOOTH_NAME not in tiny_model.loras
    for studio, ticked in ((with_smooth, True), (without, False)):
        demo = build_demo(studio)
        boxes = [c for c in _components(demo, "Checkbox") if c.label == SMOOTH_LABEL]
        assert len(boxes) == 5 and all(c.value is ticked for c in boxes)  # Generate, 2 x Interpolate, Invert, Edit
        drag = [c for c in _components(demo, "Checkbox") if c.label == "Use the Smooth LoRA during the drag"]
        assert len(drag) == 1 and drag[0].value is ticked
        menus = [c for c in _components(demo, "Dropdown") if c.label == "LoRA adapter"]
        assert len(menus) == 5 and all(m.value == (SMOOTH_NAME if ticked else None) for m in menus)
        assert not any(m.visible for m in menus)  # nothing to choose with the Smooth LoRA alone (or none)
        buttons = [b for b in _components(demo, "Button") if b.value == "Compare with and without the Smooth LoRA"]
        assert len(buttons) == 2
        demo.close()
    assert isinstance(boxes[0], gr.Checkbox)


def test_control_updates_after_another_adapter_is_loaded(model, smooth, tmp_path, probe, base_out):
    from app.context import SMOOTH_LABEL, compare_label, lora_control_updates, use_label

    name = load_lora(model, str(make_peft_lora(model.unet, tmp_path / "later_style.safetensors")))
    try:
        upd = lora_control_updates(model, 5, 2, 1)
        assert len(upd) == 5 * 2 + 2 + 1
        for box, menu in zip(upd[0:10:2], upd[1:10:2]):
            assert box["value"] is True and box["label"] == SMOOTH_LABEL
            # the menu names both; the default stays the Smooth LoRA although another was loaded after it
            assert menu["choices"] == [SMOOTH_NAME, name] and menu["value"] == SMOOTH_NAME and menu["visible"]
        assert [u["value"] for u in upd[10:12]] == ["Compare with and without the Smooth LoRA"] * 2
        assert upd[12]["value"] is True
        assert use_label(name) == f"Use the LoRA '{name}'" and name in compare_label(name)
    finally:
        model.unet.delete_adapters(name)
        model.loras.pop(name)
    assert list(model.loras) == [SMOOTH_NAME]
    assert_no_adapter_active(probe, base_out)


def test_control_updates_without_the_smooth_lora(tiny_model):
    from app.context import lora_control_updates

    upd = lora_control_updates(tiny_model, 1, 1, 1)
    assert upd[0]["value"] is False and upd[1]["choices"] == [] and upd[1]["value"] is None
    assert upd[1]["visible"] is False and upd[3]["value"] is False


@pytest.mark.parametrize("source, name", [
    ("shi-labs/smooth-diffusion-lora", SMOOTH_NAME),
    ("shi-labs/smooth-diffusion-lora:smooth_lora.safetensors", SMOOTH_NAME),
    ("/some/where/smooth_lora.safetensors", SMOOTH_NAME),
    ("/some/where/my_style.safetensors", None),
    ("owner/other-lora", None),
])
def test_the_smooth_lora_loads_as_adapter_smooth(source, name):
    from pipelines.studio import adapter_name_for

    assert adapter_name_for(source) == name


# ------------------------------------------------------------------------ end to end (gradio_client)
@pytest.fixture(scope="module")
def app(model, smooth, tmp_path_factory):
    """The real app (queue as in app.py) on this module's model, which has the Smooth LoRA."""
    pytest.importorskip("gradio_client")
    from conftest import _free_port

    from app.sessions import SessionRegistry
    from app.ui import build_demo
    from pipelines.studio import Studio

    saved = {k: os.environ.get(k) for k in ("GRADIO_TEMP_DIR", "NO_PROXY", "no_proxy")}
    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("smooth_gradio_tmp"))
    for k in ("NO_PROXY", "no_proxy"):
        os.environ[k] = ",".join(filter(None, [os.environ.get(k), "127.0.0.1", "localhost"]))
    studio = Studio()
    studio.model = model
    demo = build_demo(studio, SessionRegistry())
    demo.queue(max_size=32, default_concurrency_limit=1)
    demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True,
                show_error=True)
    try:
        yield studio, demo.local_url.rstrip("/") + "/"
    finally:
        demo.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def client(app, tmp_path_factory):
    from test_app_e2e import new_client

    return new_client(app[1], tmp_path_factory.mktemp("smooth_downloads"))


def meta(path) -> dict:
    with Image.open(path) as im:
        return json.loads(im.info["studio"])


def seq_args(**kw):
    """/interpolate_sequence's first eleven parameters (as before the adapter menu was added)."""
    d = dict(pa=PROMPT_A, pb=PROMPT_B, neg="", sa=3, sb=4, steps=STEPS, guidance=7.5, w=64, h=64, use_lora=False,
             strength=1.0)
    d.update(kw)
    return tuple(d.values())


def test_endpoints_take_the_adapter_last(client):
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    for ep in ("/interpolate_frame", "/interpolate_sequence", "/invert", "/edit",
               "/interpolate_images_frame", "/interpolate_images_sequence"):
        last = api[ep]["parameters"][-1]
        assert last["parameter_name"] == "lora_adapter" and last["parameter_has_default"], ep
    # /generate took the batch count, Fast and the singular step after the adapter: all keep defaults, so older
    # positional calls work
    assert [(p["parameter_name"], p["parameter_has_default"]) for p in api["/generate"]["parameters"][-4:]] == \
        [("lora_adapter", True), ("batch_count", True), ("fast", True), ("singular_step", True)]
    names = lambda ep: [p["parameter_name"] for p in api[ep]["parameters"]]  # noqa: E731
    assert names("/interpolate_compare") == ["pa", "pb", "neg", "sa", "sb", "steps", "guidance", "w", "h",
                                             "strength", "n", "lora_adapter"]
    assert names("/interpolate_images_compare") == ["image_a", "image_b", "prompt_a", "prompt_b", "inversion",
                                                    "inner_steps", "force", "steps", "guidance", "strength", "n",
                                                    "lora_adapter"]
    assert len(api["/interpolate_compare"]["returns"]) == len(api["/interpolate_images_compare"]["returns"]) == 7


def test_use_lora_applies_smooth_even_after_another_lora_was_loaded(client, app, model, tmp_path, probe, base_out):
    """The old bug: "Use LoRA" applied whichever adapter was loaded last."""
    from test_app_e2e import app_error

    path = make_peft_lora(model.unet, tmp_path / "loaded_later.safetensors")
    try:
        model_md, load_md = client.predict(str(path), api_name="/load_lora")
        assert "loaded_later" in load_md and list(model.loras) == [SMOOTH_NAME, "loaded_later"]
        gen = (PROMPT_A, "", 5, STEPS, 7.5, 64, 64, True, 1.0)
        _, old_call, _, status = client.predict(*gen, api_name="/generate")  # a call from before the menu
        assert status.startswith("Done") and meta(old_call)["lora"] == SMOOTH_NAME
        smooth_ref = run_to_end(generate(model, GenerateParams(PROMPT_A, "", 5, STEPS, 7.5, 64, 64, SMOOTH_NAME)))
        assert np.array_equal(pixels(Image.open(old_call)), pixels(smooth_ref.image))
        _, chosen, _, _ = client.predict(*gen, "loaded_later", api_name="/generate")
        assert meta(chosen)["lora"] == "loaded_later"
        assert not np.array_equal(pixels(Image.open(chosen)), pixels(smooth_ref.image))
        _, same, _, _ = client.predict(*gen, SMOOTH_NAME, api_name="/generate")
        assert np.array_equal(pixels(Image.open(same)), pixels(smooth_ref.image))
        msg = app_error(lambda: client.predict(*gen, "nope", api_name="/generate"))
        assert "'nope' is not loaded" in msg and "'loaded_later'" in msg, msg
        # unticked: no adapter, whatever the menu says
        _, off, _, _ = client.predict(*gen[:7], False, 1.0, "loaded_later", api_name="/generate")
        assert meta(off)["lora"] == "none"
    finally:
        if "loaded_later" in model.loras:
            model.unet.delete_adapters("loaded_later")
            model.loras.pop("loaded_later")
    assert_no_adapter_active(probe, base_out)


def test_reloading_the_smooth_lora_replaces_it_and_forgets_cached_inversions(client, model, smooth, tmp_path, probe,
                                                                            base_out):
    from gradio_client import handle_file

    image = handle_file(images()[0])
    inv = lambda: client.predict(image, PROMPT_A, STEPS, 1.0, 1.0, True, 1.0, "ddim", 1, False,  # noqa: E731
                                 api_name="/invert")
    first, again = inv(), inv()
    assert again[4]["cached"] is True
    (tmp_path / "other").mkdir()
    other = make_smooth_lora(model.unet, tmp_path / "other" / "smooth_lora.safetensors", seed=5)
    try:
        _, load_md = client.predict(str(other), api_name="/load_lora")  # a smooth_lora.safetensors: adapter "smooth"
        assert "'smooth' loaded" in load_md and list(model.loras) == [SMOOTH_NAME]
        assert model.loras[SMOOTH_NAME] == str(other)
        fresh = inv()
        assert fresh[4]["cached"] is False, "an inversion made with the replaced weights was reused"
        assert not np.array_equal(pixels(Image.open(fresh[2])), pixels(Image.open(first[2])))
    finally:
        load_lora(model, str(smooth), SMOOTH_NAME)
    assert_no_adapter_active(probe, base_out)


def test_use_smooth_lora_on_a_model_without_it_says_so(tiny_model):
    """The message when the Smooth LoRA is missing (the shared tiny model has none): what to load, or untick."""
    from app.ui import build_demo
    from pipelines.studio import Studio

    studio = Studio()
    studio.model = tiny_model
    demo = build_demo(studio)
    fn = next(d.fn for d in demo.fns.values() if getattr(d, "api_name", None) == "generate")
    with pytest.raises(Exception) as info:
        list(fn(PROMPT_A, "", 5, STEPS, 7.5, 64, 64, True, 1.0, None, None))
    text = str(info.value)
    assert "The Smooth LoRA is not loaded" in text and "shi-labs/smooth-diffusion-lora" in text
    assert "untick 'Use the Smooth LoRA'" in text
    demo.close()


def plot_series(plot) -> dict:
    out = {}
    for pair, dist, series in plot["data"]:
        out.setdefault(series, []).append((pair, dist))
    return out


def test_compare_endpoint_matches_the_sequence_endpoint(client):
    job = client.submit(*seq_args(strength=0.9)[:9], 0.9, FRAMES, api_name="/interpolate_compare")
    without, with_lora, plot, istd_off, istd_on, ratio, status = job.result(timeout=120)
    assert len(without) == len(with_lora) == FRAMES
    series = plot_series(plot)
    assert list(series) == ["without LoRA", "with smooth x0.9"]
    for rows, value in zip(series.values(), (istd_off, istd_on)):
        assert [k for k, _ in rows] == list(range(FRAMES - 1))
        assert value == pytest.approx(float(np.std([d for _, d in rows])), rel=1e-6)
    assert ratio == pytest.approx(istd_on / istd_off, rel=1e-6)
    assert status.startswith(f"{FRAMES} frames each") and "ratio" in status
    # a comparison starts from cleared outputs, then streams each sequence's frames into its own gallery
    outs = job.outputs()
    assert outs[0][:2] == ([], []) and outs[0][3] is None
    # the same frames as the sequence endpoint, off and on
    _, off, *_ = client.predict(*seq_args(use_lora=False, strength=0.9), FRAMES, api_name="/interpolate_sequence")
    _, on, *_ = client.predict(*seq_args(use_lora=True, strength=0.9), FRAMES, api_name="/interpolate_sequence")
    for mine, ref in ((without, off), (with_lora, on)):
        for x, y in zip(mine, ref):
            assert np.array_equal(pixels(Image.open(x["image"])), pixels(Image.open(y["image"])))


def test_compare_endpoint_with_an_unloaded_adapter(client):
    from test_app_e2e import app_error

    msg = app_error(lambda: client.predict(*seq_args()[:9], 1.0, FRAMES, "nope", api_name="/interpolate_compare"))
    assert "'nope' is not loaded" in msg


def test_real_image_compare_endpoint(client):
    from gradio_client import handle_file

    a, b = images()
    without, with_lora, plot, istd_off, istd_on, ratio, status = client.predict(
        handle_file(a), handle_file(b), PROMPT_A, PROMPT_B, "ddim", 1, False, STEPS, 7.5, 1.0, 2,
        api_name="/interpolate_images_compare")
    assert len(without) == len(with_lora) == 2
    assert [len(v) for v in plot_series(plot).values()] == [1, 1]
    assert istd_off == istd_on == 0.0 and ratio is None  # one distance each: no spread
    assert meta(with_lora[0]["image"])["lora"] == SMOOTH_NAME and meta(without[0]["image"])["lora"] == "none"


def test_stop_a_comparison_in_its_lora_part(client, app, probe, base_out):
    from test_app_e2e import wait_for

    studio = app[0]
    job = client.submit(*seq_args(steps=60)[:9], 1.0, 4, api_name="/interpolate_compare")
    wait_for(lambda: any(str(o[6]).startswith("with smooth") for o in job.outputs()), timeout=120,
             what="the sequence with the LoRA to be rendering")
    assert client.predict(api_name="/stop") == "Stopped."
    wait_for(job.done, timeout=30, what="the stopped comparison to end")
    final = [str(o[6]) for o in job.outputs()]
    assert final[-1] == "Stopped." and not any("frames each" in s for s in final), final
    assert studio._lock.acquire(timeout=10), "the stopped comparison still holds the model"
    studio._lock.release()
    assert_no_adapter_active(probe, base_out)


# ------------------------------------------------------------------------------------ in a browser
@pytest.fixture
def page(app, tmp_path):
    """A headless Chromium on this module's app (every other request blocked), as tests/test_browser.py's."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with launched_browser() as browser:
        context = app_only(browser.new_context(viewport={"width": 1400, "height": 1800}), app[1])
        try:
            # this module's app is launched without the studio's page script: no wait for its key listener
            pg = context.new_page()
            pg.set_default_timeout(60_000)
            pg.goto(app[1], wait_until="domcontentloaded")
            pg.wait_for_selector("#gen-prompt textarea")
            try:
                yield pg, sync_api.expect
            finally:
                pg.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            context.close()


@needs_chromium
def test_browser_lora_menu_after_load_lora_and_compare(page, app, model, tmp_path, probe, base_out):
    pg, expect = page
    expect(pg.locator("#gen-use-lora input[type=checkbox]")).to_be_checked()   # the model has the Smooth LoRA
    expect(pg.locator("#gen-use-lora")).to_contain_text("Use the Smooth LoRA")
    expect(pg.locator("#gen-lora-adapter")).to_have_count(0)                   # nothing else to choose: hidden
    path = make_peft_lora(model.unet, tmp_path / "browser_style.safetensors")
    try:
        pg.get_by_text("Model and LoRA", exact=True).click()
        source = pg.locator("#lora-source textarea")

        # the page's load-time refresh can re-render the panel and drop a value typed before it lands: type again
        for _ in range(30):
            source.fill(str(path))
            source.press("Tab")
            pg.wait_for_timeout(500)
            if source.input_value() == str(path):
                break
        expect(source).to_have_value(str(path))
        pg.click("#lora-load")
        expect(pg.locator("#load-status")).to_contain_text("'browser_style' loaded")
        # the menu appears (chained after the load), on the Smooth LoRA; the checkbox still applies it
        expect(pg.locator("#gen-lora-adapter")).to_be_visible()
        expect(pg.locator("#gen-lora-adapter input")).to_have_value(SMOOTH_NAME)
        expect(pg.locator("#gen-use-lora input[type=checkbox]")).to_be_checked()
        expect(pg.locator("#gen-use-lora")).to_contain_text("Use the Smooth LoRA")

        pg.get_by_role("tab", name="Interpolate (seeds)").click()
        pg.fill("#int-prompt-a textarea", PROMPT_A)
        for elem_id, value in (("int-steps", 2), ("int-frames", 4)):
            box = pg.locator(f"#{elem_id} input[type=number]")
            box.fill(str(value))
            box.press("Tab")
        expect(pg.locator("#int-compare")).to_have_text("Compare with and without the Smooth LoRA")
        pg.click("#int-compare")
        expect(pg.locator("#int-status")).to_contain_text("4 frames each", timeout=60_000)  # a busy CI machine
        expect(pg.locator("#int-compare-without img")).to_have_count(4)
        expect(pg.locator("#int-compare-with img")).to_have_count(4)
        expect(pg.locator("#int-compare-plot")).to_contain_text("with smooth x1")  # the legend: both series
    finally:
        if "browser_style" in model.loras:
            model.unet.delete_adapters("browser_style")
            model.loras.pop("browser_style")
    assert_no_adapter_active(probe, base_out)
