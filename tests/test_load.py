"""Load: five visitors using the studio at once get exactly what each would get alone.

Ten distinct requests (generate, interpolate_frame, invert and InstructPix2Pix on uploaded images, SDEdit on an
uploaded canvas; fixed seeds, 2-4 steps on the tiny model) are first run one by one, each in a fresh
gradio_client Client: the references. Then five clients run all ten concurrently, each in its own order (50
jobs sharing the one GPU queue): every job succeeds and every output equals its reference, pixel for pixel
and number for number.

The per-visitor cap (JOBS_PER_VISITOR = 3 running or queued GPU jobs per address): all clients connect from
127.0.0.1, so each client sends its own X-Forwarded-For address (uvicorn trusts the header from 127.0.0.1) and is
a separate visitor, as five people would be. The shared production server (`app_url`) is used as it is: the cap
keeps its production value and nothing is patched; each client runs its jobs one after another, so each
visitor has one job in flight while five are queued together.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

CLIENTS = 5
WAIT = 120
PROMPT = "a small red circle on the left on a white background"


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two small pictures to upload: a red disc on white, and blue/yellow stripes."""
    folder = tmp_path_factory.mktemp("load_images")
    yy, xx = np.mgrid[0:64, 0:64]
    disc = np.full((64, 64, 3), 255, np.uint8)
    disc[(xx - 22) ** 2 + (yy - 30) ** 2 < 14 ** 2] = (220, 30, 30)
    stripes = np.zeros((48, 64, 3), np.uint8)
    stripes[:] = (30, 60, 220)
    stripes[(xx[:48] // 8) % 2 == 1] = (240, 220, 40)
    a, b = folder / "disc.png", folder / "stripes.png"
    Image.fromarray(disc).save(a)
    Image.fromarray(stripes).save(b)
    return str(a), str(b)


def requests_(images) -> list[tuple[str, tuple, str]]:
    """(label, arguments, api name) of the ten requests; file arguments are built per call (handle_file)."""
    a, b = images
    canvas = lambda p: {"background": handle_file(p), "layers": [], "composite": None}  # noqa: E731
    return [
        ("generate 101", (PROMPT, "", 101, 3, 7.5, 64, 64, False, 1.0), "/generate"),
        ("generate 102", ("a blue square", "", 102, 2, 7.5, 64, 64, False, 1.0), "/generate"),
        ("generate 103 w48", (PROMPT, "blurry", 103, 3, 5.0, 48, 64, False, 1.0), "/generate"),
        ("frame 0.3", (PROMPT, "a large blue square", "", 5, 6, 3, 7.5, 64, 64, False, 1.0, 0.3),
         "/interpolate_frame"),
        ("frame 0.8", (PROMPT, "", "", 7, 8, 2, 7.5, 64, 64, False, 1.0, 0.8), "/interpolate_frame"),
        ("invert disc", (lambda: handle_file(a), PROMPT, 3, 1.0, 1.0, False, 1.0, "ddim", 10, False), "/invert"),
        ("invert stripes", (lambda: handle_file(b), "stripes", 2, 1.0, 3.0, False, 1.0, "ddim", 10, False),
         "/invert"),
        ("sdedit disc", (lambda: canvas(a), PROMPT, "", 0.6, 4, 7.5, 9, 1, False), "/sdedit"),
        ("sdedit stripes 2", (lambda: canvas(b), "stripes", "", 0.5, 4, 6.0, 10, 2, False), "/sdedit"),
        ("instruct stripes", (lambda: handle_file(b), "make it red", 3, "Fix seed", 7, "Fix CFG", 7.5, 1.5,
                              "euler_a"), "/instruct"),
    ]


def run(client: Client, request) -> dict:
    """Runs one request; returns what must match: pixels of every image output and the numbers."""
    label, args, api = request
    args = tuple(a() if callable(a) else a for a in args)
    out = client.predict(*args, api_name=api)
    if api == "/generate":
        _, image, seed, status = out
        assert status.startswith("Done"), (label, status)
        return {"image": pixels(image), "seed": seed}
    if api == "/interpolate_frame":
        frame, status = out
        assert status.startswith("Frame"), (label, status)
        return {"image": pixels(frame)}
    if api == "/invert":
        _, source, recon, _, metrics, status = out
        assert status.startswith("Done"), (label, status)
        return {"source": pixels(source), "recon": pixels(recon),
                **{k: metrics[k] for k in ("psnr", "ssim", "mse")}}
    if api == "/sdedit":
        _, gallery, _chosen, status = out
        assert "candidate" in status or "Done" in status, (label, status)
        return {"gallery": [pixels(item["image"]) for item in gallery], "n": len(gallery)}
    if api == "/instruct":
        _, edited, seed, text_g, image_g, status = out
        assert status.startswith("Done"), (label, status)
        return {"image": pixels(edited), "seed": seed, "text_g": text_g, "image_g": image_g}
    raise AssertionError(api)


def same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, list):
            if len(x) != len(y) or not all(np.array_equal(p, q) for p, q in zip(x, y)):
                return False
        elif isinstance(x, np.ndarray):
            if not np.array_equal(x, y):
                return False
        elif x != y:
            return False
    return True


def client_for(url, folder, n: int) -> Client:
    return Client(url, verbose=False, download_files=str(folder), headers={"X-Forwarded-For": f"10.88.0.{n}"})


def test_five_concurrent_clients_get_what_each_gets_alone(app_url, images, tmp_path):
    """Five visitors x ten mixed jobs at once: no errors, and each output equal to the same request run alone
    in a fresh client beforehand."""
    todo = requests_(images)
    reference = {}
    for k, request in enumerate(todo):  # alone: one fresh client (and session) per request, nothing else queued
        reference[request[0]] = run(client_for(app_url, tmp_path / f"ref{k}", 100 + k), request)

    clients = [client_for(app_url, tmp_path / f"load{i}", 1 + i) for i in range(CLIENTS)]
    errors, outputs, lock = [], [], threading.Lock()
    start = threading.Barrier(CLIENTS)

    def visitor(i: int):
        order = todo[2 * i:] + todo[:2 * i]  # each client its own order: different jobs meet in the queue
        start.wait(30)
        for request in order:
            try:
                got = run(clients[i], request)
            except Exception as exc:  # noqa: BLE001 - collected, reported together
                with lock:
                    errors.append(f"client {i} {request[0]}: {type(exc).__name__}: {exc}")
                continue
            with lock:
                outputs.append((i, request[0], got))

    t0 = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(visitor, range(CLIENTS)))
    took = time.monotonic() - t0
    assert not errors, "\n".join(errors)
    assert len(outputs) == CLIENTS * len(todo)
    wrong = [f"client {i} {label}" for i, label, got in outputs if not same(got, reference[label])]
    assert not wrong, "outputs differ from the same request run alone: " + ", ".join(wrong)
    assert took < WAIT * 2, took
