"""Result files as the tabs return them: each result is a PNG at its native size, with its parameters as text
chunks (pipelines/core/metadata.py), in the session's own folder, under a name that says the method, seed and
time (`generate_seed1234_20261204-163000.png`). Gradio copies a returned file into its cache under the same
base name and the download button uses that name, so the download is this file, byte for byte. The folder goes
with the session (app/sessions.py) and keeps at most MAX_FILES results.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from PIL import Image

from pipelines.core.limits import get_limits
from pipelines.core.metadata import save_png

MAX_FILES = 256            # results kept per session; the oldest go first (never those of the current job)
FOLDER = "results"


def _params(image) -> dict:
    try:
        params = json.loads(image.info.get("studio") or "{}") if image is not None else {}
    except (AttributeError, TypeError, ValueError):
        params = {}
    return params if isinstance(params, dict) else {}


def task_of(image, default: str) -> str:
    """The method an image's own parameters name (their "task"), else `default`."""
    return str(_params(image).get("task") or default)


def seed_label(image: Image.Image | None = None, seed=None) -> str | None:
    """The seed part of a name: `seed` when given (a seed of -1 means none), else what the image's own
    parameters say (seed, or seed_a-seed_b for an interpolation frame)."""
    if seed is None:
        params = _params(image)
        seed = params.get("seed")
        if seed is None and params.get("seed_a") is not None and params.get("seed_b") is not None:
            seed = f"{params['seed_a']}-{params['seed_b']}"
    if seed is None or str(seed) in ("", "-1"):
        return None
    return re.sub(r"[^0-9A-Za-z-]+", "", str(seed))[:40] or None


def result_name(method: str, seed: str | None, when: float | None = None, index: int | None = None,
                ext: str = "png") -> str:
    """`method_seed<seed>_<YYYYmmdd-HHMMSS>[_<index>].<ext>`; without a seed the seed part is left out."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if when is None else when))
    parts = [re.sub(r"[^0-9A-Za-z-]+", "-", method)] + ([f"seed{seed}"] if seed else []) + [stamp]
    if index is not None:
        parts.append(f"{index:02d}")
    return "_".join(parts) + f".{ext}"


def _folder(session) -> Path:
    folder = session.out_dir / FOLDER
    folder.mkdir(exist_ok=True)
    return folder


def _free_path(folder: Path, name: str) -> Path:
    path = folder / name
    stem, ext = os.path.splitext(name)
    n = 2
    while path.exists():
        path = folder / f"{stem}-{n}{ext}"
        n += 1
    return path


def _prune(folder: Path) -> None:
    keep = max(MAX_FILES, 4 * get_limits().max_frames)  # a comparison returns two full sequences at once
    files = sorted((p for p in folder.iterdir() if p.is_file()), key=lambda p: p.stat().st_mtime_ns)
    for old in files[:max(0, len(files) - keep)]:
        old.unlink(missing_ok=True)


def result_file(session, item, method: str, seed=None, index: int | None = None) -> str | None:
    """The path to return for a result: a PIL image is written as PNG (its .info text chunks with it); a file
    the pipeline wrote into the session's folder (GIF, MP4) is moved there under the new name. None stays None."""
    if item is None:
        return None
    folder = _folder(session)
    if isinstance(item, Image.Image):
        path = _free_path(folder, result_name(method, seed_label(item, seed), index=index))
        save_png(item, path)
    else:
        source = Path(item)
        path = _free_path(folder, result_name(method, seed_label(None, seed), index=index,
                                              ext=source.suffix.lstrip(".") or "bin"))
        if source.resolve().is_relative_to(session.out_dir.resolve()):
            os.replace(source, path)
        else:
            shutil.copyfile(source, path)
    _prune(folder)
    return str(path)


def result_files(session, items, method: str, seeds=None) -> list:
    """result_file for each item of a gallery (numbered in order); `seeds` gives each item's seed if known."""
    items = list(items or [])
    seeds = list(seeds) if seeds is not None else [None] * len(items)
    return [result_file(session, item, method, seed, index=k + 1) for k, (item, seed) in
            enumerate(zip(items, seeds, strict=True))]
