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
def _studio_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("studio_cache")
    os.environ["STUDIO_CACHE"] = str(cache)
    yield cache


@pytest.fixture(scope="session")
def tiny_model(_studio_cache):
    """The shared tiny model (tests that change shared state must restore it; that is what they check)."""
    from pipelines.events import run_to_end
    from pipelines.models import load_model

    return run_to_end(load_model("tiny-random"))


@pytest.fixture(scope="session")
def studio(tiny_model):
    from pipelines.studio import Studio

    s = Studio()
    s.model = tiny_model
    return s
