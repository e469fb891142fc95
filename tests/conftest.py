"""Shared fixtures: everything runs offline on the tiny random model, built once per test session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"          # tests must never touch the network
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("STUDIO_DEVICE", "cpu")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session", autouse=True)
def _one_cpu_thread():
    """One torch intra-op thread: the tiny model gains nothing from two, and on a 2-core box shared with the
    test server, its client and a browser, two spinning OpenMP threads make UNet calls many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _studio_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("studio_cache")
    os.environ["STUDIO_CACHE"] = str(cache)
    yield cache


@pytest.fixture(scope="session")
def tiny_model(_studio_cache):
    """The shared tiny model (tests that change shared state must restore it; that is what they check)."""
    from pipelines.core.events import run_to_end
    from pipelines.core.models import load_model

    return run_to_end(load_model("tiny-random"))


@pytest.fixture(scope="module")
def embedded(_studio_cache):
    """The committed embedded model (assets/model), one per test module: semantic checks. It is part of the
    repository, so a missing one fails the tests rather than skipping them."""
    from pipelines.core.events import run_to_end
    from pipelines.core.models import EMBEDDED_ID, load_model

    return run_to_end(load_model(EMBEDDED_ID))


@pytest.fixture(scope="session")
def studio(tiny_model):
    from pipelines.studio import Studio

    s = Studio()
    s.model = tiny_model
    return s


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def app_url(studio, tmp_path_factory):
    """The real Gradio app on 127.0.0.1 (queue and launch settings as in app.py), serving the shared tiny-model
    studio."""
    saved_env = {k: os.environ.get(k) for k in ("GRADIO_TEMP_DIR", "NO_PROXY", "no_proxy")}
    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio_tmp"))  # uploads and outputs
    for k in ("NO_PROXY", "no_proxy"):  # clients must reach 127.0.0.1 directly, never via a proxy
        os.environ[k] = ",".join(filter(None, [os.environ.get(k), "127.0.0.1", "localhost"]))
    from app.cli import launch

    demo = launch(studio, prevent_thread_lock=True, quiet=True)  # the production settings of app.py
    try:
        yield demo.local_url.rstrip("/") + "/"
    finally:
        demo.close()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# Markers (pyproject.toml): tests that start the Gradio server are e2e, those that drive Chromium are browser;
# both are slow, so `pytest -m "not slow"` (the fast lane) leaves them out. Other slow tests carry
# @pytest.mark.slow themselves.
_SERVER_FIXTURES = {"app_url", "app"}
_BROWSER_FIXTURES = {"page", "browser"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & _BROWSER_FIXTURES:
            item.add_marker(pytest.mark.browser)
        if names & (_SERVER_FIXTURES | _BROWSER_FIXTURES):
            item.add_marker(pytest.mark.e2e)
        if item.get_closest_marker("e2e") or item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.slow)
