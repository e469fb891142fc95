"""Animations of a frame sequence: an animated GIF (Pillow) and an H.264 MP4 (imageio with imageio-ffmpeg's
ffmpeg, libx264, yuv420p, moov atom first) that browsers play inline.

yuv420p stores colour at half resolution and needs even sides, so frames smaller than MIN_VIDEO_SIDE are scaled
up by a whole factor with nearest neighbour (every pixel an exact k x k block: a 64 x 64 frame becomes 256 x 256
and its colours stay put), and an odd side is padded by repeating the last row or column."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MIN_VIDEO_SIDE = 256   # the smaller side of the video is at least this (nearest-neighbour scaling by a whole factor)
MAX_VIDEO_SIDE = 2048  # ... unless that would take the larger side past this
VIDEO_QUALITY = 8      # imageio's 0-10 scale; libx264 CRF = int((1 - q/10) * 51) = 10


def write_gif(frames: list, path: str | Path, fps: int = 8) -> Path:
    """Looping animated GIF, one frame every 1/fps s."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = [f.convert("RGB") for f in frames]
    rgb[0].save(path, save_all=True, append_images=rgb[1:], duration=int(1000 / max(fps, 1)), loop=0)
    return path


def video_scale(width: int, height: int) -> int:
    """Whole nearest-neighbour factor for frames of this size (1 when they are large enough already)."""
    want = math.ceil(MIN_VIDEO_SIDE / max(min(width, height), 1))
    return max(1, min(want, MAX_VIDEO_SIDE // max(width, height, 1)))


def video_frame(frame, size: tuple[int, int], k: int) -> np.ndarray:
    """A PIL frame -> RGB uint8 array of the video: at `size` (the first frame's), scaled up k times (nearest),
    then padded to even sides by repeating its last row / column."""
    img = frame.convert("RGB")
    if img.size != size:
        img = img.resize(size)
    arr = np.asarray(img)
    if k > 1:
        arr = arr.repeat(k, axis=0).repeat(k, axis=1)
    h, w = arr.shape[:2]
    if h % 2 or w % 2:
        arr = np.pad(arr, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return np.ascontiguousarray(arr)


def write_mp4(frames: list, path: str | Path, fps: int = 8) -> str | None:
    """H.264 MP4 (yuv420p, +faststart) of the frames at `fps`, sized as video_frame says; None if this install
    cannot write one (imageio-ffmpeg or its ffmpeg missing, or ffmpeg failing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = frames[0].size
    k = video_scale(*size)
    try:
        import imageio.v2 as imageio

        # macro_block_size=2: the frames are already even, so imageio must not rescale them to multiples of 16.
        with imageio.get_writer(path, format="FFMPEG", mode="I", fps=max(int(fps), 1), codec="libx264",
                                pixelformat="yuv420p", quality=VIDEO_QUALITY, macro_block_size=2,
                                ffmpeg_log_level="error", output_params=["-movflags", "+faststart"]) as writer:
            for f in frames:
                writer.append_data(video_frame(f, size, k))
    except (ImportError, OSError, RuntimeError) as exc:
        log.warning("Could not write %s: %s", path, exc)
        path.unlink(missing_ok=True)
        return None
    return str(path) if path.is_file() and path.stat().st_size > 0 else None
