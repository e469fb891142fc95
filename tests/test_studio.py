"""The Studio engine: cancelled jobs leave no trace, one job at a time, safe model switching, the start-up
fallback, and clear InputErrors for bad inputs. Uses a private Studio with its own tiny model (a LoRA is
attached to it)."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import pixels
from safetensors.torch import save_file

from pipelines.core.errors import InputError
from pipelines.core.events import Cancelled, CancelToken, run_to_end
from pipelines.generate import GenerateParams
from pipelines.interpolation import InterpolationParams
from pipelines.inversion import InversionParams
from pipelines.studio import Studio


def _make_lora(unet, path: Path) -> Path:
    """A legacy Smooth-LoRA-format file (see test_lora.py) with large random weights."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.rsplit(".processor", 1)[0])
        for proj, lin in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v), ("to_out", attn.to_out[0])):
            sd[f"{name}.{proj}_lora.down.weight"] = torch.randn(8, lin.in_features, generator=g) * 0.5
            sd[f"{name}.{proj}_lora.up.weight"] = torch.randn(lin.out_features, 8, generator=g) * 0.5
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="module")
def own(_studio_cache, tmp_path_factory):
    """A private Studio on a freshly loaded tiny model with the 'smooth' LoRA attached (disabled)."""
    from pipelines.core.models import load_model

    s = Studio()
    s.model = run_to_end(load_model("tiny-random"))
    path = _make_lora(s.model.unet, tmp_path_factory.mktemp("lora") / "smooth_lora.safetensors")
    assert run_to_end(s.load_lora(str(path), "smooth")) == "smooth"
    return s


@pytest.fixture(scope="module")
def probe(own):
    g = torch.Generator().manual_seed(9)
    x, cond = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)

    @torch.no_grad()
    def run():
        return own.model.unet(x, 500, encoder_hidden_states=cond).sample

    return run


JOB_A = GenerateParams("a red circle", seed=7, steps=3)


@pytest.fixture(scope="module")
def image_a(own):
    """Job A's image, generated once before any other job ran on this studio."""
    return run_to_end(own.generate(JOB_A)).image


# --- cancellation ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_cancelled_job_leaves_no_trace(own, probe, image_a):
    from pipelines.core.lora import lora_applied

    base = probe()
    with lora_applied(own.model, "smooth", 1.0):
        assert not torch.equal(probe(), base)  # the LoRA matters, so a leak would show
    assert torch.equal(probe(), base)

    token = CancelToken()
    seen = []
    with pytest.raises(Cancelled):
        for ev in own.generate(GenerateParams("a blue square", seed=3, steps=8, lora="smooth"), cancel=token):
            seen.append(ev)
            if len(seen) == 4:  # "encoding prompt" + 3 of 8 steps
                token.cancel()
    assert len(seen) == 4 and all(ev.result is None for ev in seen)

    assert torch.equal(probe(), base)  # the adapter is switched off again
    assert own._lock.acquire(blocking=False)  # and the GPU lock is free
    own._lock.release()
    image2 = run_to_end(own.generate(JOB_A)).image
    assert np.array_equal(pixels(image_a), pixels(image2))


# --- one job at a time ----------------------------------------------------------------------------

class _Runner(threading.Thread):
    """Drains a job in a thread, recording its events and how it ended."""

    def __init__(self, job):
        super().__init__(daemon=True)
        self.job, self.events, self.error, self.result = job, [], None, None
        self.first_event = threading.Event()

    def run(self):
        try:
            for ev in self.job:
                self.events.append(ev)
                self.first_event.set()
                if ev.result is not None:
                    self.result = ev.result
        except BaseException as exc:  # noqa: BLE001 - recorded for the test
            self.error = exc
        finally:
            self.first_event.set()


def test_second_job_waits_for_the_first_to_finish(own):
    first = own.generate(GenerateParams("a cat", seed=1, steps=3))
    runner = None
    try:
        ev = next(first)  # the first job now holds the lock, suspended mid-run
        assert ev.stage == "encoding prompt"
        runner = _Runner(own.generate(GenerateParams("a dog", seed=2, steps=3)))
        runner.start()
        assert runner.first_event.wait(10)
        time.sleep(0.3)
        assert [e.stage for e in runner.events] == ["waiting for the GPU"]  # announced once, no progress
        assert runner.is_alive()
        result = run_to_end(first)  # finish the first job
        assert result is not None
        runner.join(30)
        assert not runner.is_alive() and runner.error is None
        stages = [e.stage for e in runner.events]
        assert stages[0] == "waiting for the GPU" and stages[1] == "encoding prompt" and stages[-1] == "done"
        assert runner.result is not None and runner.result.seed == 2
    finally:
        first.close()
        if runner is not None:
            runner.join(30)


def test_closing_a_suspended_job_releases_the_lock(own):
    first = own.generate(GenerateParams("a cat", seed=1, steps=3))
    next(first)
    next(first)  # one sampling step done
    runner = _Runner(own.generate(GenerateParams("a dog", seed=2, steps=2)))
    runner.start()
    try:
        assert runner.first_event.wait(10)
        time.sleep(0.2)
        assert [e.stage for e in runner.events] == ["waiting for the GPU"]
    finally:
        first.close()  # e.g. the browser went away
        runner.join(30)
    assert not runner.is_alive() and runner.error is None and runner.result is not None


def test_a_waiting_job_can_be_cancelled(own):
    first = own.generate(GenerateParams("a cat", seed=1, steps=2))
    next(first)
    token = CancelToken()
    runner = _Runner(own.generate(GenerateParams("a dog", seed=2, steps=2), cancel=token))
    runner.start()
    try:
        assert runner.first_event.wait(10)
        token.cancel()
        runner.join(15)
        assert not runner.is_alive()
        assert isinstance(runner.error, Cancelled)
        assert [e.stage for e in runner.events] == ["waiting for the GPU"]
        assert run_to_end(first) is not None  # the running job is unaffected
    finally:
        first.close()
    assert own._lock.acquire(blocking=False)
    own._lock.release()


# --- model switching and start-up -----------------------------------------------------------------

@pytest.mark.parametrize("source,message", [
    ("/nonexistent/folder", "neither an existing folder nor a Hub id"),
    ("not a model id", "neither an existing folder nor a Hub id"),
    ("", "No model given"),
])
def test_switch_to_a_bad_model_keeps_the_previous_one(own, image_a, source, message):
    before_model = own.model
    with pytest.raises(InputError, match=message):
        run_to_end(own.switch_model(source))
    assert own.model is before_model


def test_switch_to_a_folder_without_model_index(own, image_a, tmp_path):
    before_model = own.model
    with pytest.raises(InputError, match="not a diffusers model folder"):
        run_to_end(own.switch_model(str(tmp_path)))
    assert own.model is before_model
    # After all failed switches the previous model still generates the identical picture.
    image2 = run_to_end(own.generate(JOB_A)).image
    assert np.array_equal(pixels(image_a), pixels(image2))


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection is recorded and refused."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", lambda self, *a, **k: refuse(*a))
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, *a, **k: refuse(*a))
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_start_falls_back_to_the_tiny_model_with_a_notice(monkeypatch, no_network, _studio_cache):
    import os

    import pipelines.studio as studio_module

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    monkeypatch.setattr(studio_module, "embedded_available", lambda: False)
    s = Studio().start("some/missing-model")
    assert s.model is not None and s.model.id == "tiny-random" and s.model.random_weights
    assert "some/missing-model" in s.notice and "Could not load" in s.notice
    assert "instead" in s.notice and s.model.label in s.notice
    assert no_network == []
    # and the fallback model works
    img = run_to_end(s.generate(GenerateParams("a cat", seed=1, steps=2))).image
    assert img.size == (64, 64)


def test_start_with_the_tiny_model_has_no_notice(monkeypatch, no_network, _studio_cache):
    import pipelines.studio as studio_module

    monkeypatch.setattr(studio_module, "embedded_available", lambda: False)
    s = Studio().start("tiny-random")
    assert s.model.id == "tiny-random" and s.notice == ""
    assert no_network == []


# --- bad inputs -----------------------------------------------------------------------------------

def _gen(**kw):
    return GenerateParams(**{"prompt": "a cat", "seed": 1, "steps": 2, **kw})


@pytest.mark.parametrize("params,message", [
    (_gen(prompt=""), "Please enter a prompt: it is empty"),
    (_gen(prompt="   \n "), "Please enter a prompt"),
    (_gen(steps=0), "Steps must be between 1 and 150, got 0"),
    (_gen(steps=10000), "Steps must be between 1 and 150, got 10000"),
    (_gen(steps=2.5), "Steps must be a whole number, got 2.5"),
    (_gen(steps="many"), "Steps must be a number"),
    (_gen(steps=float("nan")), "Steps must be between"),
    (_gen(guidance=-1), "Guidance must be between 0 and 50, got -1"),
    (_gen(guidance=float("nan")), "Guidance must be between 0 and 50, got nan"),
    (_gen(width=60), "Width must be a multiple of 8 for this model, got 60"),
    (_gen(height=4), "Height must be between 8 and 1024"),
    (_gen(seed=float("nan")), "Seed must be between"),
    (_gen(seed=2**40), "Seed must be between"),
    (_gen(lora_strength=float("inf")), "LoRA strength must be between"),
    (_gen(lora="never-loaded"), "not loaded for this model"),
])
def test_bad_generate_inputs(own, params, message):
    with pytest.raises(InputError, match=message):
        run_to_end(own.generate(params))


def _interp(**kw):
    return InterpolationParams(**{"prompt_a": "a cat", "prompt_b": "a dog", "steps": 2, **kw})


def test_bad_interpolation_inputs(own):
    with pytest.raises(InputError, match="Interpolation ratio must be between 0 and 1, got 1.5"):
        run_to_end(own.interpolation_frame(_interp(), 1.5))
    with pytest.raises(InputError, match="Interpolation ratio must be between 0 and 1"):
        run_to_end(own.interpolation_frame(_interp(), float("nan")))
    with pytest.raises(InputError, match="Number of frames must be between 2 and 64, got 1"):
        run_to_end(own.interpolation_sequence(_interp(), n_frames=1))
    with pytest.raises(InputError, match="Please enter a prompt A"):
        run_to_end(own.interpolation_frame(_interp(prompt_a=""), 0.5))
    with pytest.raises(InputError, match="Seed must be between"):
        run_to_end(own.interpolation_frame(_interp(seed_b=float("nan")), 0.5))


def test_bad_inversion_inputs(own, tmp_path):
    p = InversionParams(steps=2)
    with pytest.raises(InputError, match="not an image I can read"):
        run_to_end(own.invert(b"\x89PNG\r\n\x1a\n this is not really a png", p))
    text = tmp_path / "notes.txt"
    text.write_text("hello, I am a text file\n" * 20)
    with pytest.raises(InputError, match="not an image I can read"):
        run_to_end(own.invert(str(text), p))
    with pytest.raises(InputError, match="was not found"):
        run_to_end(own.invert(str(tmp_path / "missing.png"), p))
    with pytest.raises(InputError, match="Inversion guidance must be between"):
        run_to_end(own.invert(b"x", InversionParams(steps=2, inversion_guidance=-3)))


def test_errors_release_the_lock(own):
    with pytest.raises(InputError):
        run_to_end(own.generate(_gen(prompt="")))
    assert own._lock.acquire(blocking=False)
    own._lock.release()
