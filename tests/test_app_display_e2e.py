"""Through gradio_client: a run that fails shows nothing of the run before it, and its status (or the model
panel's) says what failed instead of the last progress line."""
from __future__ import annotations

import pytest

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

PROMPT = "a small red circle on the left on a white background"
WAIT = 60
UNCHANGED = {"__type__": "update"}   # what the client reads for an output a yield leaves as it is (gr.skip)


def gen_args(use_lora=False, adapter=None):
    # /generate(prompt, neg, seed, steps, guidance, w, h, use_lora, strength, lora_adapter)
    return (PROMPT, "", 7, 2, 7.5, 64, 64, use_lora, 1.0, adapter)


def failed_job(client: Client, *args, api_name: str):
    job = client.submit(*args, api_name=api_name)
    with pytest.raises(AppError):
        job.result(timeout=WAIT)
    return job.outputs()


@pytest.fixture(scope="module")
def client(app_url, tmp_path_factory):
    return Client(app_url, verbose=False, download_files=str(tmp_path_factory.mktemp("display_downloads")))


def test_a_failed_run_leaves_no_stale_result(client):
    preview, result, seed, status = client.predict(*gen_args(), api_name="/generate")
    assert result and seed == 7 and status.startswith("Done")
    # the next run fails once it has started (the adapter is checked inside the job)
    outputs = failed_job(client, *gen_args(use_lora=True, adapter="no_such_adapter"), api_name="/generate")
    start, *_, last = outputs
    assert start[:3] == (None, None, None) and start[3].startswith("Starting")
    assert not any(result in str(o) or preview in str(o) for o in outputs), outputs  # nothing of the last run
    assert last[3].startswith("Failed: ") and "no_such_adapter" in last[3], last
    assert last[1] in (None, UNCHANGED), last  # the result box stays as the start left it: empty


def test_a_failed_lora_load_says_what_failed(client, tmp_path):
    outputs = failed_job(client, str(tmp_path / "missing.safetensors"), api_name="/load_lora")
    model_md, message = outputs[-1]
    assert message.startswith("Failed: ") and "missing.safetensors" in message, outputs
    assert not any("step 0/1" in str(o) for o in outputs)
