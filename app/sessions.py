"""Per-browser-session data (cancel token, caches, output folder), keyed by Gradio's session hash.

Kept server-side because tokens and tensors cannot live in gr.State; bounded so abandoned sessions
cannot grow memory, and dropped when the browser tab unloads.
"""
from __future__ import annotations

import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.cache import LRUCache
from pipelines.events import CancelToken
from pipelines.stream import PreviewOptions

MAX_SESSIONS = 64


@dataclass
class Session:
    token: CancelToken = field(default_factory=CancelToken)
    interpolation_cache: LRUCache = field(default_factory=lambda: LRUCache(4))
    inversion_cache: LRUCache = field(default_factory=lambda: LRUCache(4))
    diffedit_cache: LRUCache = field(default_factory=lambda: LRUCache(4))   # DiffEdit's inverted trajectories
    # Drag: per-image LoRAs and inversions, plus (in one slot, its own LRU) the trajectories of generated images
    drag_cache: LRUCache = field(default_factory=lambda: LRUCache(8))
    preview: PreviewOptions = field(default_factory=PreviewOptions)
    _out_dir: Path | None = None

    def new_job(self) -> CancelToken:
        """A fresh token per job, so a Stop aimed at an old job cannot cancel the next one."""
        self.token = CancelToken()
        return self.token

    @property
    def out_dir(self) -> Path:
        """Created on first use (API clients that never render a GIF leave nothing behind)."""
        if self._out_dir is None:
            self._out_dir = Path(tempfile.mkdtemp(prefix="studio_session_"))
        return self._out_dir

    def close(self) -> None:
        self.token.cancel()
        if self._out_dir is not None:
            shutil.rmtree(self._out_dir, ignore_errors=True)


class SessionRegistry:
    def __init__(self, max_sessions: int = MAX_SESSIONS):
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(request) -> str:
        return getattr(request, "session_hash", None) or "anonymous"

    def get(self, request) -> Session:
        key = self.key(request)
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                session = self._sessions[key] = Session()
            self._sessions.move_to_end(key)
            while len(self._sessions) > self.max_sessions:
                _, old = self._sessions.popitem(last=False)
                old.close()
            return session

    def drop(self, request) -> None:
        with self._lock:
            session = self._sessions.pop(self.key(request), None)
        if session is not None:
            session.close()

    def clear_inversions(self) -> None:
        """Forgets every session's cached inversions (they key on a LoRA's name, not on its weights)."""
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.inversion_cache.clear()

    def __len__(self) -> int:
        return len(self._sessions)
