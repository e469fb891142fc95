"""pipelines/core/video.py: the animated GIF and the H.264 MP4 of a frame sequence, decoded back with imageio-ffmpeg."""
from __future__ import annotations

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from pipelines.core.video import video_frame, video_scale, write_gif, write_mp4


def smooth_frames(n: int, w: int, h: int) -> list[np.ndarray]:
    """Gradients that move from frame to frame (like an interpolation sequence, unlike white noise)."""
    yy, xx = np.mgrid[0:h, 0:w]
    return [np.stack([(xx * 256 // w + 9 * t) % 256, yy * 256 // h, ((xx + yy) * 2 + 20 * t) % 256],
                     -1).astype(np.uint8) for t in range(n)]


def decode(path) -> tuple[dict, list[np.ndarray]]:
    gen = imageio_ffmpeg.read_frames(str(path))
    meta = next(gen)
    w, h = meta["size"]
    return meta, [np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in gen]


def test_mp4_is_browser_playable_h264(tmp_path):
    arrs = smooth_frames(5, 64, 64)
    path = write_mp4([Image.fromarray(a) for a in arrs], tmp_path / "seq.mp4", fps=8)
    assert path == str(tmp_path / "seq.mp4")
    data = (tmp_path / "seq.mp4").read_bytes()
    assert data[4:8] == b"ftyp"
    assert b"avc1" in data                          # H.264 sample entry (mp4v would be MPEG-4 part 2)
    assert data.find(b"moov") < data.find(b"mdat")  # +faststart: the index first, so playback starts at once
    assert imageio_ffmpeg.count_frames_and_secs(path) == (5, pytest.approx(5 / 8, abs=0.01))
    meta, frames = decode(path)
    assert meta["codec"].startswith("h264") and meta["pix_fmt"].startswith("yuv420p")
    assert meta["fps"] == 8 and meta["size"] == (256, 256)  # 64 px frames scaled up 4x (nearest)
    assert len(frames) == 5
    for a, d in zip(arrs, frames, strict=True):
        blocks = d.reshape(64, 4, 64, 4, 3).astype(np.float64).mean(axis=(1, 3))  # back to one value per pixel
        err = np.abs(blocks - a)
        assert err.mean() < 3 and err.max() < 24, (err.mean(), err.max())


def test_mp4_of_odd_sized_and_large_frames(tmp_path):
    # 63 x 45: scaled 6x (smaller side >= 256) -> 378 x 270, already even; 513 x 301: padded to 514 x 302
    for (w, h), want in [((63, 45), (378, 270)), ((513, 301), (514, 302))]:
        arrs = smooth_frames(3, w, h)
        path = write_mp4([Image.fromarray(a) for a in arrs], tmp_path / f"{w}x{h}.mp4", fps=4)
        meta, frames = decode(path)
        assert meta["size"] == want and len(frames) == 3 and meta["codec"].startswith("h264")
        k = video_scale(w, h)
        for a, d in zip(arrs, frames, strict=True):
            inner = d[:h * k, :w * k].reshape(h, k, w, k, 3).astype(np.float64).mean(axis=(1, 3))
            assert np.abs(inner - a).mean() < 3


def test_video_frame_scaling_and_padding():
    assert video_scale(64, 64) == 4 and video_scale(8, 8) == 32 and video_scale(512, 512) == 1
    assert video_scale(64, 1024) == 2  # the larger side stays within MAX_VIDEO_SIDE
    img = Image.fromarray(np.arange(5 * 3 * 3, dtype=np.uint8).reshape(5, 3, 3))
    arr = video_frame(img, (3, 5), 1)
    assert arr.shape == (6, 4, 3) and np.array_equal(arr[:5, :3], np.asarray(img))
    assert np.array_equal(arr[5, :3], arr[4, :3]) and np.array_equal(arr[:, 3], arr[:, 2])  # edge repeated
    big = video_frame(img, (3, 5), 2)
    assert big.shape == (10, 6, 3) and np.array_equal(big[::2, ::2], np.asarray(img))
    # frames of another size are resized to the first one's
    assert video_frame(Image.new("RGB", (7, 7), (1, 2, 3)), (3, 5), 1).shape == (6, 4, 3)


def test_gif_keeps_size_frames_and_timing(tmp_path):
    arrs = smooth_frames(4, 64, 64)
    path = write_gif([Image.fromarray(a) for a in arrs], tmp_path / "a" / "seq.gif", fps=5)
    with Image.open(path) as gif:
        assert gif.n_frames == 4 and gif.size == (64, 64) and gif.info["duration"] == 200 and gif.info["loop"] == 0


def test_mp4_is_none_when_ffmpeg_is_missing(tmp_path, monkeypatch):
    def missing():
        raise RuntimeError("No ffmpeg exe could be found.")

    monkeypatch.setattr(imageio_ffmpeg._io, "get_ffmpeg_exe", missing)  # what write_frames asks for the binary
    arrs = smooth_frames(2, 16, 16)
    assert write_mp4([Image.fromarray(a) for a in arrs], tmp_path / "x.mp4") is None
    assert not (tmp_path / "x.mp4").exists()
