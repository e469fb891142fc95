"""Device and dtype choice: CUDA fp16 when available, else CPU fp32."""
from __future__ import annotations

import os

import torch


def pick_device() -> torch.device:
    forced = os.environ.get("STUDIO_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device) -> torch.dtype:
    forced = os.environ.get("STUDIO_DTYPE")
    if forced:
        return getattr(torch, forced)
    return torch.float16 if device.type == "cuda" else torch.float32
