"""End-to-end tests (gradio_client against the running app, tiny model) of the real-image tabs: inversion
methods with the null-text loss plot, metrics and re-invert; text editing (threshold r and Prompt-to-Prompt)
on the session's cached inversion; real-image interpolation (frame and sequence with GIF, MP4 and ISTD).

Steps and inner iterations are kept tiny: these check the wiring, the pipelines' own tests check the maths.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio_client")
from gradio_client import handle_file  # noqa: E402
from test_app_e2e import app_error, assert_mp4, new_client, pixels, wait_for  # noqa: E402

from app import examples  # noqa: E402

IMAGE, CAPTION = examples.IMAGES[0]
_, _, TARGET = examples.EDITS[0]       # same caption, one word recoloured
IMAGE_B, CAPTION_B = examples.IMAGES[1]
STEPS, INNER = 3, 2


# ------------------------------------------------------------------------------------------ helpers
def invert(client, image, prompt=CAPTION, steps=STEPS, inv_g=1.0, guidance=7.5, method="nti", inner_steps=INNER,
           force=False):
    """-> (preview, source, reconstruction, loss plot, metrics, status)"""
    return client.predict(image, prompt, steps, inv_g, guidance, False, 1.0, method, inner_steps, force,
                          api_name="/invert")


def edit(client, image, source=CAPTION, target=TARGET, method="threshold", r=0.8, inversion="nti",
         inner_steps=INNER, force=False, steps=STEPS, guidance=7.5, mode="replace", cross=0.8, self_=0.4,
         reweight_words="", reweight_scale=2.0, blend_words="", blend_threshold=0.5, blend_keep=True):
    """-> (preview, edited, source reconstruction, blend mask, status)"""
    return client.predict(image, source, target, method, r, inversion, inner_steps, force, steps, guidance, False,
                          1.0, mode, cross, self_, reweight_words, reweight_scale, blend_words, blend_threshold,
                          blend_keep, api_name="/edit")


def real_args(image_a, image_b, prompt_a=CAPTION, prompt_b=CAPTION_B, inversion="nti", inner_steps=1, force=False,
              steps=2, guidance=7.5):
    return (image_a, image_b, prompt_a, prompt_b, inversion, inner_steps, force, steps, guidance, False, 1.0)


def plot_rows(plot) -> list:
    return [] if plot is None else plot["data"]


def meta(path) -> dict:
    with Image.open(path) as im:
        return json.loads(im.info["studio"])


@pytest.fixture(scope="module")
def client(app_url, tmp_path_factory):
    return new_client(app_url, tmp_path_factory.mktemp("edit_downloads"))


@pytest.fixture
def fresh_image(tmp_path):
    """An image no other test has inverted (so its first inversion cannot come from the session cache)."""
    rng = np.random.default_rng(abs(hash(str(tmp_path))) % 2**32)
    img = Image.open(IMAGE).convert("RGB")
    arr = np.asarray(img).copy()
    arr[:4, :4] = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    path = tmp_path / "fresh.png"
    Image.fromarray(arr).save(path)
    return str(path)


# ------------------------------------------------------------------------------------------ the API
def test_new_endpoints_and_parameter_order(client):
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    names = lambda ep: [p["parameter_name"] for p in api[ep]["parameters"]]  # noqa: E731
    assert names("/edit") == ["image", "source_prompt", "target_prompt", "method", "r", "inversion", "inner_steps",
                              "force", "steps", "guidance", "use_lora", "strength", "p2p_mode", "cross_replace_steps",
                              "self_replace_steps", "reweight_words", "reweight_scale", "blend_words",
                              "blend_threshold", "blend_keep", "lora_adapter"]
    real = ["image_a", "image_b", "prompt_a", "prompt_b", "inversion", "inner_steps", "force", "steps", "guidance",
            "use_lora", "strength"]
    assert names("/interpolate_images_frame") == real + ["eta", "lora_adapter"]
    assert names("/interpolate_images_sequence") == real + ["n", "lora_adapter"]
    assert len(api["/invert"]["returns"]) == 6 and len(api["/edit"]["returns"]) == 5
    assert len(api["/interpolate_images_sequence"]["returns"]) == 7


# ------------------------------------------------------------------------------------------- Invert
def test_invert_nti_loss_plot_and_metrics(client, fresh_image):
    job = client.submit(handle_file(fresh_image), CAPTION, STEPS, 1.0, 7.5, False, 1.0, "nti", INNER, False,
                        api_name="/invert")
    _, source, recon, plot, metrics, status = job.result(timeout=60)
    assert status.startswith("Done") and "cached" not in status
    rows = plot_rows(plot)
    assert [r[0] for r in rows] == list(range(1, STEPS + 1)), rows  # one fitted loss per inversion step
    assert all(np.isfinite(r[1]) and r[1] >= 0 for r in rows)
    assert metrics["unet_forward_backward"] > 0 and metrics["unet_forward"] > 0
    assert {"psnr", "ssim", "mse", "psnr_vs_vae", "vae_psnr"} <= set(metrics)
    assert metrics["method"] == "nti" and metrics["cached"] is False
    m = meta(recon)
    assert m["method"] == "nti" and m["inner_steps"] == INNER and m["guidance"] == 7.5
    # the curve was streamed while fitting: partial plots (fewer rows) before the final one
    partial = [len(plot_rows(o[3])) for o in job.outputs()[:-1]
               if isinstance(o[3], dict) and "data" in o[3]]
    assert any(0 < n < STEPS for n in partial), partial


def test_invert_ddim_has_an_empty_loss_plot(client):
    _, _, recon, plot, metrics, status = invert(client, handle_file(IMAGE), method="ddim", guidance=1.0, force=True)
    assert status.startswith("Done")
    assert plot_rows(plot) == []
    assert np.isfinite(metrics["psnr"]) and metrics["method"] == "ddim"
    assert meta(recon)["method"] == "ddim"


def test_reinvert_ignores_the_cached_inversion(client, fresh_image):
    first = invert(client, handle_file(fresh_image), method="npi")
    assert "cached" not in first[5]
    second = invert(client, handle_file(fresh_image), method="npi")
    assert "reused from cache" in second[5] and second[4]["cached"] is True
    forced = invert(client, handle_file(fresh_image), method="npi", force=True)
    assert "cached" not in forced[5] and forced[4]["cached"] is False
    assert np.array_equal(pixels(forced[2]), pixels(first[2]))  # deterministic: the same reconstruction


def test_invert_unknown_method(client):
    msg = app_error(lambda: invert(client, handle_file(IMAGE), method="magic"))
    assert "Unknown inversion method" in msg


# --------------------------------------------------------------------------------------------- Edit
def test_edit_threshold_r0_equals_the_inversion_reconstruction(client, fresh_image):
    _, _, recon, _, _, _ = invert(client, handle_file(fresh_image))
    _, edited, source_recon, mask, status = edit(client, handle_file(fresh_image), r=0.0)
    assert status.startswith("Done") and "reused from cache" in status  # the Invert tab's inversion
    assert np.array_equal(pixels(edited), pixels(recon))
    assert mask is None and source_recon is not None
    m = meta(edited)
    assert m["task"] == "edit" and m["edit_method"] == "threshold" and m["r"] == 0.0
    assert m["source_prompt"] == CAPTION and m["prompt"] == TARGET
    assert m["inversion"] == "nti" and m["inner_steps"] == INNER and m["steps"] == STEPS and m["guidance"] == 7.5


def test_edit_prompt_to_prompt_with_local_blend(client):
    _, edited, source_recon, mask, status = edit(client, handle_file(IMAGE), method="p2p", blend_words="triangle",
                                                 reweight_words="red", reweight_scale=2.0, blend_threshold=0.4)
    assert status.startswith("Done") and "Prompt-to-Prompt (replace)" in status
    assert Image.open(edited).size == (64, 64)
    assert Image.open(source_recon).size == (64, 64) and Image.open(mask).size == (64, 64)
    m = meta(edited)
    assert m["edit_method"] == "p2p" and m["p2p_mode"] == "replace"
    assert m["cross_replace_steps"] == 0.8 and m["self_replace_steps"] == 0.4
    assert m["blend_words"] == "triangle" and m["blend_threshold"] == 0.4
    assert m["reweight_words"] == "red" and m["reweight_scale"] == 2.0
    assert m["keep_background"] is True  # a partial region: the input pasted back outside it


def test_edit_local_blend_without_keeping_the_input(client):
    _, edited, _, mask, status = edit(client, handle_file(IMAGE), method="p2p", blend_words="triangle",
                                      blend_threshold=0.4, blend_keep=False)
    assert status.startswith("Done") and mask is not None
    assert meta(edited)["keep_background"] is False


def test_edit_p2p_replace_needs_the_same_word_count(client):
    msg = app_error(lambda: edit(client, handle_file(IMAGE), method="p2p", target="a large red triangle in the centre, "
                                 "bright yellow background"))
    assert "words" in msg and "refine" in msg, msg


@pytest.mark.parametrize("kw, fragment", [
    (dict(target=""), "target prompt"),
    (dict(target="   "), "target prompt"),
    (dict(source=""), "source prompt"),
])
def test_edit_empty_prompts(client, kw, fragment):
    msg = app_error(lambda: edit(client, handle_file(IMAGE), **kw))
    assert fragment in msg, msg


def test_edit_without_an_image(client):
    assert "Please upload an image to edit" in app_error(lambda: edit(client, None))


# ----------------------------------------------------------------------------- real interpolation
def test_real_image_interpolation_sequence_and_frame(client):
    args = real_args(handle_file(IMAGE), handle_file(IMAGE_B))
    last, gallery, gif, mp4, istd, plot, status = client.predict(*args, 3, api_name="/interpolate_images_sequence")
    assert len(gallery) == 3 and status.startswith("3 frames")
    with Image.open(gif) as im:
        assert im.format == "GIF" and im.n_frames == 3
    assert_mp4(mp4)
    distances = [row[1] for row in plot["data"]]
    assert len(distances) == 2
    assert istd == pytest.approx(float(np.std(distances)), rel=1e-6, abs=1e-9)
    assert np.array_equal(pixels(last), pixels(gallery[-1]["image"]))
    m = meta(last)
    assert m["task"] == "interpolate_images" and m["inversion"] == "nti" and m["interpolation_eta"] == 1.0
    # a frame with the same images and settings reuses the sequence's inversion (the eta slider's scrub)
    frame, status = client.predict(*args, 0.0, api_name="/interpolate_images_frame")
    assert status.startswith("Frame at eta=0.00") and "reused from cache" in status
    assert np.array_equal(pixels(frame), pixels(gallery[0]["image"]))


def test_real_image_interpolation_rejects_an_unreadable_upload(client, tmp_path):
    fake = tmp_path / "not_an_image.png"
    fake.write_text("hello, I am text, not a PNG\n")
    msg = app_error(lambda: client.predict(*real_args(handle_file(IMAGE), handle_file(str(fake))), 0.5,
                                           api_name="/interpolate_images_frame"))
    assert "not an image I can read" in msg


def test_real_image_interpolation_needs_both_images(client):
    msg = app_error(lambda: client.predict(*real_args(handle_file(IMAGE), None), 0.5,
                                           api_name="/interpolate_images_frame"))
    assert "Please upload image B" in msg


def test_stop_ends_a_running_edit(client, studio):
    """The session's Stop (the /stop endpoint sets this session's cancel token) ends an edit mid-way: the job
    checks its new token, says "Stopped." and frees the model."""
    job = client.submit(handle_file(IMAGE), CAPTION, TARGET, "threshold", 0.8, "ddim", 1, True, 150, 7.5, False,
                        1.0, "replace", 0.8, 0.4, "", 2.0, "", 0.5, api_name="/edit")
    wait_for(lambda: any(str(o[4]).startswith(("inverting", "editing")) for o in job.outputs()),
             what="the edit to be running")
    assert client.predict(api_name="/stop") == "Stopped."
    wait_for(job.done, timeout=20, what="the stopped edit to end")
    final = [str(o[4]) for o in job.outputs()]
    assert final[-1] == "Stopped." and not any(s.startswith("Done") for s in final), final
    assert studio._lock.acquire(timeout=10), "the stopped edit still holds the model"
    studio._lock.release()
