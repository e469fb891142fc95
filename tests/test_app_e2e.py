"""End-to-end tests of the running Gradio app through gradio_client: every tab's named API endpoint,
streaming, Stop/cancel, error messages, model/LoRA loading and per-session isolation.

All tests share one server (the `app_url` fixture) and the session-wide tiny model, so every test that
changes shared state (model, LoRA) restores it and checks that the base output is back, pixel for pixel.
"""
from __future__ import annotations

import json
import time
import uuid

import httpx
import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from gradio_client.utils import Status  # noqa: E402

PROMPT = "a small red circle on the left on a white background"
SEED = 1234
STEPS = 4          # few steps: the tiny model needs no more, and the suite must stay fast
LONG_STEPS = 150   # the slider's maximum: a run long enough to be stopped mid-way
WAIT = 60          # generous upper bound for anything the box is slow at (it may be loaded)


# ------------------------------------------------------------------------------------------ helpers
def new_client(url: str, download_dir) -> Client:
    return Client(url, verbose=False, download_files=str(download_dir))


def gen_args(prompt=PROMPT, seed=SEED, steps=STEPS, guidance=7.5, w=64, h=64, use_lora=False, strength=1.0, neg="",
             adapter=None):
    # /generate(prompt, neg, seed, steps, guidance, w, h, use_lora, strength[, lora_adapter])
    args = (prompt, neg, seed, steps, guidance, w, h, use_lora, strength)
    return args if adapter is None else args + (adapter,)


def generate(client: Client, **kw):
    """-> (preview path, result PNG path, seed used, status)"""
    return client.predict(*gen_args(**kw), api_name="/generate")


def interp_args(pa=PROMPT, pb="", neg="", sa=0, sb=1, steps=STEPS, guidance=7.5, w=64, h=64, use_lora=False,
                strength=1.0):
    return (pa, pb, neg, sa, sb, steps, guidance, w, h, use_lora, strength)


def invert(client: Client, image, prompt=PROMPT, steps=20, inv_g=1.0, guidance=1.0, method="ddim", inner_steps=10,
           force=False):
    """-> (preview, source, reconstruction, loss plot, metrics, status)"""
    return client.predict(image, prompt, steps, inv_g, guidance, False, 1.0, method, inner_steps, force,
                          api_name="/invert")


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def app_error(call) -> str:
    """Runs `call`, which must fail with the app's own message (gr.Error), and returns that message. A value
    outside a component's range is refused when the job joins the queue (HTTP 400 with Gradio's message)."""
    try:
        call()
    except AppError as exc:
        text = str(exc)
    except httpx.HTTPStatusError as exc:
        assert exc.response.status_code in (400, 422), exc
        text = exc.response.text
    else:
        pytest.fail("the call did not fail")
    assert "Traceback" not in text and 'File "' not in text, text
    return text


def assert_mp4(path):
    """An H.264 MP4 browsers play inline (ISO base media: an 'ftyp' box first, an 'avc1' sample entry)."""
    assert path and str(path).endswith(".mp4"), path
    with open(path, "rb") as f:
        data = f.read()
    assert data[4:8] == b"ftyp", data[:12]
    assert b"avc1" in data


def wait_for(cond, timeout=WAIT, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def statuses(job) -> list[str]:
    return [str(o[3]) for o in job.outputs()]


def is_sampling(job) -> bool:
    return any(s.startswith("sampling") for s in statuses(job))


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    return tmp_path_factory.mktemp("client_downloads")


@pytest.fixture(scope="module")
def client(app_url, downloads):
    return new_client(app_url, downloads)


@pytest.fixture(scope="module")
def baseline(client):
    """The base model's output for (PROMPT, SEED, STEPS): the reference every state-changing test checks."""
    _, path, seed, status = generate(client)
    assert seed == SEED and status.startswith("Done")
    return pixels(path)


@pytest.fixture(scope="module")
def generated_png(client):
    _, path, _, _ = generate(client, seed=7)
    return path


def assert_base_output(client, baseline):
    assert np.array_equal(pixels(generate(client)[1]), baseline), "the base model's output changed"


# ------------------------------------------------------------------------------------------ the API
def test_named_endpoints_and_parameter_order(client):
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    for name in ("/generate", "/interpolate_frame", "/interpolate_sequence", "/invert", "/load_model", "/load_lora"):
        assert name in api, sorted(api)
    names = lambda ep: [p["parameter_name"] for p in api[ep]["parameters"]]  # noqa: E731
    # new inputs are appended (the LoRA adapter menu last), so the original positional order stays valid
    assert names("/generate") == ["prompt", "neg", "seed", "steps", "guidance", "w", "h", "use_lora", "strength",
                                  "lora_adapter", "batch_count", "fast", "singular_step"]
    assert names("/interpolate_frame")[-2:] == ["eta", "lora_adapter"]
    assert names("/interpolate_sequence")[-2:] == ["n", "lora_adapter"]
    assert names("/invert") == ["image", "prompt", "steps", "inv_g", "guidance", "use_lora", "strength",
                                "method", "inner_steps", "force", "lora_adapter"]


# ------------------------------------------------------------------------------------------ Generate
def test_generate_outputs_and_png_metadata(client):
    preview, path, seed, status = generate(client, seed=SEED, steps=STEPS, guidance=6.5)
    assert seed == SEED
    assert status.startswith("Done") and f"seed {SEED}" in status
    assert Image.open(preview).size == (64, 64)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (64, 64)
        params = im.info["parameters"]
        studio_meta = json.loads(im.info["studio"])
    assert PROMPT in params and f"Seed: {SEED}" in params
    assert studio_meta["steps"] == STEPS
    assert studio_meta["guidance"] == 6.5
    assert studio_meta["model"] == "tiny-random"
    assert studio_meta["seed"] == SEED and studio_meta["prompt"] == PROMPT


def test_random_seed_is_reported_and_reproducible(client):
    _, path, seed, status = generate(client, seed=-1)
    assert isinstance(seed, int) and 0 <= seed < 2**32
    assert f"seed {seed}" in status
    assert f"Seed: {seed}" in Image.open(path).info["parameters"]
    _, again, seed2, _ = generate(client, seed=seed)
    assert seed2 == seed
    assert np.array_equal(pixels(again), pixels(path))


def test_generate_streams_previews_before_the_result(client):
    job = client.submit(*gen_args(steps=12), api_name="/generate")
    job.result(timeout=WAIT)
    outputs = job.outputs()
    assert len(outputs) > 1, outputs
    *streamed, final = outputs
    assert str(final[3]).startswith("Done") and final[1]
    assert not any(str(o[3]).startswith("Done") for o in streamed)
    assert any(o[0] for o in streamed), "no live preview was streamed before the final result"
    assert any(str(o[3]).startswith("sampling: step") for o in streamed)


def test_stop_cancels_a_running_generate(client, studio, baseline):
    job = client.submit(*gen_args(steps=LONG_STEPS), api_name="/generate")
    wait_for(lambda: is_sampling(job), what="the job to be iterating")
    assert job.status().code == Status.ITERATING
    t0 = time.monotonic()
    job.cancel()
    wait_for(job.done, timeout=10, what="the cancelled job to end")
    assert time.monotonic() - t0 < 10
    assert job.status().code == Status.CANCELLED
    # The server side really stopped: the job released the model lock (Gradio closed the generator).
    assert studio._lock.acquire(timeout=10), "the cancelled job still holds the model"
    studio._lock.release()
    time.sleep(0.3)  # nothing late arrives either
    assert not any(s.startswith("Done") for s in statuses(job)), statuses(job)
    # and the next normal run is unaffected
    assert_base_output(client, baseline)


# --------------------------------------------------------------------------------------- Interpolate
def test_interpolate_frame_at_eta0_equals_generate_with_seed_a(client):
    _, gen_path, _, _ = generate(client, prompt=PROMPT, seed=11, steps=STEPS, guidance=7.5)
    frame, status = client.predict(*interp_args(pa=PROMPT, pb="a large blue square", sa=11, sb=12), 0.0,
                                   api_name="/interpolate_frame")
    assert "eta=0.00" in status and "11" in status and "12" in status
    assert np.array_equal(pixels(frame), pixels(gen_path))
    meta = json.loads(Image.open(frame).info["studio"])
    assert meta["task"] == "interpolate" and meta["seed_a"] == 11 and meta["seed_b"] == 12


def test_interpolate_sequence_gif_istd_and_plot(client):
    last, gallery, gif, istd, plot, status, mp4 = client.predict(*interp_args(sa=3, sb=4, steps=3), 5,
                                                                 api_name="/interpolate_sequence")
    assert_mp4(mp4)
    assert len(gallery) == 5
    with Image.open(gif) as im:
        assert im.format == "GIF" and im.n_frames == 5
    distances = [row[1] for row in plot["data"]]
    assert [row[0] for row in plot["data"]] == [0, 1, 2, 3]
    assert len(distances) == 4 and all(d > 0 for d in distances)
    assert istd == pytest.approx(float(np.std(distances)), rel=1e-6, abs=1e-9)
    assert status.startswith("5 frames") and f"{istd:.4f}" in status
    assert np.array_equal(pixels(last), pixels(gallery[-1]["image"]))


# ------------------------------------------------------------------------------------------- Invert
def test_invert_generated_png(client, generated_png):
    preview, source, recon, _, metrics, status = invert(client, handle_file(generated_png), steps=20)
    assert status.startswith("Done")
    assert {"psnr", "ssim", "mse"} <= set(metrics)
    assert all(np.isfinite(metrics[k]) for k in ("psnr", "ssim", "mse"))
    assert metrics["mse"] >= 0 and -1 <= metrics["ssim"] <= 1
    with Image.open(recon) as im:
        assert im.format == "PNG" and im.size == (64, 64)
        assert json.loads(im.info["studio"])["task"] == "invert"
    assert Image.open(source).size == (64, 64)


@pytest.mark.parametrize("kind, size", [("huge", (64, 40)), ("grayscale", (64, 64)), ("rgba", (64, 64))])
def test_invert_accepts_odd_images(client, tmp_path, kind, size):
    if kind == "huge":
        x = np.linspace(0, 255, 3000, dtype=np.uint8)
        img = Image.fromarray(np.broadcast_to(x, (2000, 3000)).copy(), "L").convert("RGB")
    elif kind == "grayscale":
        img = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1)), "L")
    else:
        img = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
        img.paste((0, 0, 255, 255), (16, 16, 48, 48))
    path = tmp_path / f"{kind}.png"
    img.save(path)
    _, source, recon, _, metrics, status = invert(client, handle_file(str(path)), steps=2)
    assert status.startswith("Done")
    assert Image.open(source).size == size  # long side at the model's resolution (64)
    assert Image.open(recon).size == size
    assert {"psnr", "ssim", "mse"} <= set(metrics)


def test_invert_rejects_a_text_file_named_png(client, tmp_path):
    fake = tmp_path / "not_an_image.png"
    fake.write_text("hello, I am text, not a PNG\n")
    msg = app_error(lambda: invert(client, handle_file(str(fake)), steps=2))
    assert "not an image I can read" in msg


def test_invert_without_an_image(client):
    msg = app_error(lambda: invert(client, None, steps=2))
    assert "Please upload an image" in msg


# ----------------------------------------------------------------------------------- input checking
@pytest.mark.parametrize("kw, fragment", [
    (dict(prompt=""), "Please enter a prompt"),
    (dict(prompt="   "), "Please enter a prompt"),
    (dict(steps=0), "minimum"),
    (dict(steps=10000), "maximum"),
    (dict(w=60), "Width must be a multiple of 8"),
    (dict(h=100), "Height must be a multiple of 8"),
])
def test_generate_bad_inputs_give_clear_errors(client, kw, fragment):
    msg = app_error(lambda: generate(client, **kw))
    assert fragment in msg, msg


# -------------------------------------------------------------------------------------- model loads
@pytest.mark.parametrize("source, fragment", [
    ("/nonexistent", "neither an existing folder nor a Hub id"),
    ("owner/missing-model", "Could not load model 'owner/missing-model'"),
])
def test_load_model_bad_source_keeps_the_model(client, studio, baseline, source, fragment):
    before = studio.model
    msg = app_error(lambda: client.predict(source, api_name="/load_model"))
    assert fragment in msg, msg
    assert studio.model is before
    assert_base_output(client, baseline)


def _other_tiny_model(folder):
    """A copy of the tiny model with another label and native size 96 px (same weights: the UNet is
    convolutional, sample_size is only its default latent size)."""
    import shutil

    from pipelines.core.tiny_model import ensure_tiny_model

    shutil.copytree(ensure_tiny_model(), folder)
    info = json.loads((folder / "studio_model.json").read_text())
    (folder / "studio_model.json").write_text(json.dumps({**info, "label": "other tiny e2e model",
                                                          "instruct_guidance": {"text": 3.5, "image": 2.25}}))
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**cfg, "sample_size": 24}))
    return folder


def test_load_model_shows_the_new_model(client, studio, tmp_path):
    before = studio.model
    folder = _other_tiny_model(tmp_path / "other-tiny")
    try:
        model_md, load_md, *sizes, text_g, image_g = client.predict(str(folder), api_name="/load_model")
        assert "Loaded" in load_md and "other tiny e2e model" in load_md
        # the InstructPix2Pix sliders move to the scales the model's folder recommends
        assert (text_g.get("value"), image_g.get("value")) == (3.5, 2.25)
        assert "other tiny e2e model" in model_md  # the new model, not the one it replaces
        # all four size sliders (Generate and Interpolate, width and height) get the new model's range
        # and native size (gr.update dicts through the API), each its own value, not just the first
        assert [s.get("value") for s in sizes] == [96, 96, 96, 96], sizes
        assert all(s["minimum"] == 8 and s["step"] == 8 and s["maximum"] == 1024 for s in sizes), sizes
    finally:
        studio.model = before  # the session-wide model object other tests hold


def test_load_model_tiny_random_becomes_active(client, studio, baseline):
    before = studio.model
    try:
        model_md, load_md, *sizes, text_g, image_g = client.predict("tiny-random", api_name="/load_model")
        assert "Loaded" in load_md
        assert "tiny SD-architecture model" in model_md
        assert [s.get("value") for s in sizes] == [64, 64, 64, 64], sizes
        assert (text_g.get("value"), image_g.get("value")) == (7.5, 1.5)  # no recommendation: the paper's
        assert studio.model is not None and studio.model is not before, "the loaded model is not active"
        assert studio.model.id == "tiny-random"
        # the same weights from the same folder: the freshly loaded model draws the same picture
        assert_base_output(client, baseline)
    finally:
        studio.model = before  # the session-wide model object other tests hold


# ------------------------------------------------------------------------------------------- LoRA
def write_legacy_lora(unet, path, rank=8, std=0.5, seed=0):
    """A Smooth-LoRA-style file: attention-processor key names (`...processor.to_q_lora.down.weight`)."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    sd = {}
    for name in unet.attn_processors:
        attn = modules[name[: -len(".processor")]]
        for proj, lin in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v), ("to_out", attn.to_out[0])):
            sd[f"{name}.{proj}_lora.down.weight"] = torch.randn(rank, lin.in_features, generator=gen) * std
            sd[f"{name}.{proj}_lora.up.weight"] = torch.randn(lin.out_features, rank, generator=gen) * std
    save_file(sd, str(path))
    return path


def test_load_lora_missing_file(client, tmp_path, studio):
    loras = dict(studio.model.loras)
    msg = app_error(lambda: client.predict(str(tmp_path / "missing.safetensors"), api_name="/load_lora"))
    assert "missing.safetensors" in msg and "LoRA file not found" in msg
    assert studio.model.loras == loras


def test_legacy_lora_changes_output_only_when_used(client, studio, baseline, tmp_path):
    name = f"e2e_lora_{uuid.uuid4().hex[:8]}"
    if "smooth" not in studio.model.loras:  # "Use the Smooth LoRA" applies the adapter named "smooth" only
        assert "The Smooth LoRA is not loaded" in app_error(lambda: generate(client, use_lora=True))
    path = write_legacy_lora(studio.model.unet, tmp_path / f"{name}.safetensors")
    try:
        model_md, load_md = client.predict(str(path), api_name="/load_lora")
        assert name in load_md and "loaded" in load_md
        assert "Loaded LoRA" in model_md and name in model_md
        assert name in studio.model.loras
        assert "not loaded" in app_error(lambda: generate(client, use_lora=True))  # not the one loaded last
        _, on_path, _, _ = generate(client, use_lora=True, strength=1.0, adapter=name)
        on = pixels(on_path)
        assert not np.array_equal(on, baseline), "the LoRA had no effect"
        assert json.loads(Image.open(on_path).info["studio"])["lora"] == name
        assert_base_output(client, baseline)  # off after on: exactly the base model
        _, again, _, _ = generate(client, use_lora=True, strength=1.0, adapter=name)
        assert np.array_equal(pixels(again), on)
    finally:
        unet = studio.model.unet
        if name in getattr(unet, "peft_config", {}):
            unet.delete_adapters(name)
        studio.model.loras.pop(name, None)
    assert_base_output(client, baseline)


def test_unload_lora_restores_the_base_output(client, studio, baseline, tmp_path):
    """Locally a loaded LoRA can be unloaded by its adapter name: it is gone, and the base output is exact."""
    name = f"e2e_unload_{uuid.uuid4().hex[:8]}"
    path = write_legacy_lora(studio.model.unet, tmp_path / f"{name}.safetensors")
    try:
        client.predict(str(path), api_name="/load_lora")
        assert name in studio.model.loras
        model_md, load_md = client.predict(name, api_name="/unload_lora")
        assert "unloaded" in load_md and name not in studio.model.loras and name not in model_md
        assert "not loaded" in app_error(lambda: client.predict(name, api_name="/unload_lora"))
    finally:
        studio.model.loras.pop(name, None)
    assert_base_output(client, baseline)


# -------------------------------------------------------------------------------- session isolation
def test_stop_from_another_session_does_not_cancel(app_url, downloads):
    c1, c2 = new_client(app_url, downloads), new_client(app_url, downloads)
    assert c1.session_hash != c2.session_hash
    job1 = c1.submit(*gen_args(steps=120, seed=99), api_name="/generate")
    wait_for(lambda: is_sampling(job1), what="client 1's job to be iterating")
    assert c2.predict(api_name="/stop") == "Stopped."             # client 2's Stop: its own session only
    job2 = c2.submit(*gen_args(steps=STEPS), api_name="/generate")  # waits behind client 1 (one GPU job) ...
    wait_for(lambda: job2.status().code == Status.IN_QUEUE, what="client 2's job to be queued")
    assert not job1.done(), "client 1's job ended too early for this test to mean anything"
    job2.cancel()                                                   # ... and is cancelled by client 2
    _, path, seed, status = job1.result(timeout=WAIT)
    assert status.startswith("Done") and seed == 99, statuses(job1)
    assert Image.open(path).size == (64, 64)
    wait_for(job2.done, timeout=10, what="client 2's cancelled job to end")
    assert not any(s.startswith("Done") for s in statuses(job2))


# ------------------------------------------------------------------- Stop vs. late progress (no server)
def test_stream_renders_nothing_after_stop():
    """A Stop set while the job is between token checks (mid UNet call) must not be followed by one more
    progress line in the UI: the stream says "Stopped." instead and closes the job."""
    from app.streaming import stream
    from pipelines.core.events import CancelToken, Progress

    token, closed = CancelToken(), []

    def job():
        try:
            for k in range(1, 100):
                if k == 3:
                    token.cancel()  # pressed during step 3; the job itself would only notice before step 4
                yield Progress("sampling", k, 100)
        finally:
            closed.append(True)

    out = list(stream(job(), lambda ev, final: (f"step {ev.step}",), lambda: ("Stopped.",), min_interval=0,
                      cancel=token))
    assert out == [("step 1",), ("step 2",), ("Stopped.",)]
    assert closed == [True]
