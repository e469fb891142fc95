"""A small bounded LRU map: every cache in the studio is bounded by entry count, and optionally by bytes."""
from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict

import numpy as np
import torch
from PIL import Image


def nbytes(value, _seen: set | None = None) -> int:
    """Approximate memory held by a cached value: tensors, arrays and images, found through containers and
    dataclasses (the heavy parts of inversions, trajectories and LoRA state dicts; small scalars count 0)."""
    seen = set() if _seen is None else _seen
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, Image.Image):
        return value.width * value.height * len(value.getbands())
    if isinstance(value, LRUCache):
        return value.total_bytes()
    if isinstance(value, dict):
        return sum(nbytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return sum(nbytes(v, seen) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes(getattr(value, f.name), seen) for f in dataclasses.fields(value))
    return 0


class LRUCache:
    def __init__(self, maxsize: int = 8, max_bytes: int | None = None):
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self._data: OrderedDict = OrderedDict()
        self._sizes: dict = {}
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key not in self._data:
                return None
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key, value) -> None:
        size = nbytes(value) if self.max_bytes is not None else 0
        with self._lock:
            if self.max_bytes is not None and size > self.max_bytes:
                # larger than the whole budget: not kept (the job still returns it; only reuse is lost)
                self._data.pop(key, None)
                self._sizes.pop(key, None)
                return
            self._data[key] = value
            self._sizes[key] = size
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize or (
                    self.max_bytes is not None and sum(self._sizes.values()) > self.max_bytes):
                old, _ = self._data.popitem(last=False)
                self._sizes.pop(old, None)

    def total_bytes(self) -> int:
        """Bytes held now (values are re-measured: a nested cache may have grown since it was put)."""
        with self._lock:
            values = list(self._data.values())
        return sum(nbytes(v) for v in values)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._sizes.clear()

    def __len__(self) -> int:
        return len(self._data)
