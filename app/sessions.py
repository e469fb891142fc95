"""Per-browser-session data (job tokens, caches, hand-offs, output folder), keyed by Gradio's session hash.

The session hash is chosen by the client, so it is a cache key, never an authorisation: whatever a client does
with hashes can only make the studio refuse new sessions or forget idle ones' caches. A session with a job
running or queued is never evicted, and eviction never cancels anything. Sessions are bounded in count (overall
and per visitor) and each session's caches in bytes.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from pipelines.core.cache import LRUCache
from pipelines.core.errors import InputError
from pipelines.core.events import CancelToken
from pipelines.core.metadata import save_png
from pipelines.core.stream import PreviewOptions

from .history import History

MAX_SESSIONS = 64                  # sessions holding caches, all visitors together
SESSIONS_PER_VISITOR = 8           # one visitor (IP or login) opening many tabs or minting hashes
SESSION_BYTES = int(float(os.environ.get("STUDIO_SESSION_MB", "1536")) * 2**20)  # caches of one session
JOBS_PER_VISITOR = 3               # running + queued GPU jobs of one visitor
ADMISSION_TTL = 900.0              # seconds after which an admitted job that never ran stops counting
TOO_MANY_SESSIONS = ("The studio has too many open sessions right now. Please try again in a few minutes.")
TOO_MANY_JOBS = (f"You already have {JOBS_PER_VISITOR} jobs running or waiting. Wait for one to finish "
                 "(or stop it) before starting another.")


def visitor_of(request) -> str:
    """Who sent a request: the logged-in user when there is one, else the client's address."""
    user = getattr(request, "username", None)
    if user:
        return f"user:{user}"
    client = getattr(request, "client", None)
    host = getattr(client, "host", None)
    return f"ip:{host}" if host else "anonymous"


class JobToken(CancelToken):
    """A job's cancel token that also tells its session when the job ends (so eviction knows it is idle)."""

    def __init__(self, on_finish) -> None:
        super().__init__()
        self._on_finish = on_finish
        self._finished = False

    def finish(self) -> None:
        if not self._finished:
            self._finished = True
            self._on_finish(self)

    @property
    def finished(self) -> bool:
        return self._finished


def _cache(n: int) -> LRUCache:
    return LRUCache(n, max_bytes=SESSION_BYTES)


@dataclass
class Session:
    visitor: str = "anonymous"
    interpolation_cache: LRUCache = field(default_factory=lambda: _cache(4))
    inversion_cache: LRUCache = field(default_factory=lambda: _cache(4))
    diffedit_cache: LRUCache = field(default_factory=lambda: _cache(4))   # DiffEdit's inverted trajectories
    # Drag: per-image LoRAs and inversions, plus (in one slot, its own LRU) the trajectories of generated images
    drag_cache: LRUCache = field(default_factory=lambda: _cache(8))
    preview: PreviewOptions = field(default_factory=PreviewOptions)
    model_id: str | None = None      # hosted mode: the allow-listed model this session chose
    handoff: dict = field(default_factory=dict)   # results the "Send to" buttons pass on, kept server-side
    last_seeds: dict = field(default_factory=dict)  # seed box id -> the seed its tab's last run used ("reuse")
    history: History = field(init=False)          # results across tabs, PNGs in this session's folder
    token: CancelToken = field(default_factory=CancelToken)
    _live: set = field(default_factory=set)
    _out_dir: Path | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.history = History(lambda: self.out_dir)

    def new_job(self) -> JobToken:
        """A fresh token per job, so a Stop aimed at an old job cannot cancel the next one."""
        token = JobToken(self._job_ended)
        with self._lock:
            self._live.add(token)
            self.token = token
        return token

    def _job_ended(self, token) -> None:
        with self._lock:
            self._live.discard(token)
        self.trim()

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._live)

    def cancel_jobs(self) -> None:
        with self._lock:
            live = list(self._live)
        for token in live:
            token.cancel()

    def caches(self) -> list[LRUCache]:
        return [self.interpolation_cache, self.inversion_cache, self.diffedit_cache, self.drag_cache]

    def cache_bytes(self) -> int:
        return sum(c.total_bytes() for c in self.caches())

    def trim(self) -> None:
        """Keeps all of a session's caches together under SESSION_BYTES: the largest caches are emptied first."""
        sizes = sorted(((c.total_bytes(), i) for i, c in enumerate(self.caches())), reverse=True)
        total = sum(s for s, _ in sizes)
        caches = self.caches()
        for size, i in sizes:
            if total <= SESSION_BYTES:
                break
            caches[i].clear()
            total -= size

    @property
    def out_dir(self) -> Path:
        """Created on first use (API clients that never render a GIF leave nothing behind)."""
        if self._out_dir is None:
            self._out_dir = Path(tempfile.mkdtemp(prefix="studio_session_"))
        return self._out_dir

    def keep_result(self, key: str, image: Image.Image | None) -> None:
        """Remembers a result this session made, for the "Send to ..." hand-offs (never a client's path)."""
        if image is not None:
            self.handoff[key] = image

    def handoff_png(self, key: str) -> str | None:
        """The kept result as a PNG in this session's own folder (lossless: Drag recognises generated PNGs)."""
        image = self.handoff.get(key)
        if image is None:
            return None
        if isinstance(image, str):
            return image
        return str(save_png(image, self.out_dir / f"{key}_{time.monotonic_ns()}.png"))  # with its parameters

    def release(self) -> None:
        """Frees caches and files; never cancels (a session with live jobs is never released by eviction)."""
        for cache in self.caches():
            cache.clear()
        self.handoff.clear()
        self.history.clear()
        if self._out_dir is not None:
            shutil.rmtree(self._out_dir, ignore_errors=True)
            self._out_dir = None

    def close(self) -> None:
        """The tab itself went away: its own jobs stop and everything is freed."""
        self.cancel_jobs()
        self.release()


@dataclass
class _Ticket:
    session: str | None
    since: float
    event_id: str | None = None
    running: bool = False


class Admission:
    """Counts each visitor's running and queued GPU jobs. A ticket is taken when a job joins the queue (the
    event's validator), learns its event id from the join's answer (`bind`) or when the handler starts, and is
    given back when the handler ends (`finish`) or when the job is stopped while still queued (`withdraw`). A
    queued ticket whose job never ran (client gone) stops counting after ADMISSION_TTL."""

    def __init__(self, max_jobs: int = JOBS_PER_VISITOR, ttl: float = ADMISSION_TTL):
        self.max_jobs = max_jobs
        self.ttl = ttl
        self._tickets: dict[str, list[_Ticket]] = defaultdict(list)
        self._lock = threading.Lock()

    def _live(self, visitor: str, now: float) -> list[_Ticket]:
        tickets = self._tickets[visitor]
        tickets[:] = [t for t in tickets if t.running or now - t.since <= self.ttl]
        return tickets

    def _drop_if_empty(self, visitor: str) -> None:
        if not self._tickets.get(visitor):
            self._tickets.pop(visitor, None)

    def admit(self, visitor: str, session: str | None = None) -> bool:
        now = time.monotonic()
        with self._lock:
            tickets = self._live(visitor, now)
            if len(tickets) >= self.max_jobs:
                return False
            tickets.append(_Ticket(session, now))
            return True

    def bind(self, session: str | None, event_id: str) -> None:
        """The queue accepted a job of `session` as `event_id`: the newest ticket of that session without an id
        takes it (tickets of one session are interchangeable until they have ids)."""
        with self._lock:
            if session is None or self._find(event_id) is not None:
                return
            for tickets in self._tickets.values():
                for ticket in reversed(tickets):
                    if ticket.session == session and ticket.event_id is None:
                        ticket.event_id = event_id
                        return

    def _find(self, event_id: str | None):
        if event_id is None:
            return None
        for visitor, tickets in self._tickets.items():
            for ticket in tickets:
                if ticket.event_id == event_id:
                    return visitor, ticket
        return None

    def start(self, visitor: str, session: str | None, event_id: str | None) -> None:
        """The handler of `event_id` begins: its ticket (or the oldest unbound one of its session) is running."""
        with self._lock:
            found = self._find(event_id)
            if found is None:  # bound later than it started, or joined without a session (/call/<name>)
                for ticket in self._tickets.get(visitor, []):
                    if ticket.session in (session, None) and ticket.event_id is None and not ticket.running:
                        ticket.event_id = event_id
                        found = visitor, ticket
                        break
            if found is not None:
                found[1].running = True

    def finish(self, visitor: str, session: str | None, event_id: str | None) -> None:
        """The handler ended (done, failed or stopped): its ticket is given back."""
        with self._lock:
            found = self._find(event_id)
            if found is None:  # no id known (never bound): the oldest running ticket of that session
                for ticket in self._tickets.get(visitor, []):
                    if ticket.session == session and ticket.running:
                        found = visitor, ticket
                        break
            if found is not None:
                self._tickets[found[0]].remove(found[1])
                self._drop_if_empty(found[0])

    def withdraw(self, event_id: str) -> None:
        """`event_id` was stopped: if it never started, its ticket is given back now (no handler will end)."""
        with self._lock:
            found = self._find(event_id)
            if found is not None and not found[1].running:
                self._tickets[found[0]].remove(found[1])
                self._drop_if_empty(found[0])

    def held(self, visitor: str) -> int:
        with self._lock:
            n = len(self._live(visitor, time.monotonic()))
            self._drop_if_empty(visitor)
            return n


class SessionRegistry:
    def __init__(self, max_sessions: int = MAX_SESSIONS, per_visitor: int = SESSIONS_PER_VISITOR,
                 admission: Admission | None = None):
        self.max_sessions = max_sessions
        self.per_visitor = per_visitor
        self.admission = admission or Admission()
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(request) -> str:
        return getattr(request, "session_hash", None) or "anonymous"

    def _evict_idle(self, among: list[str]) -> bool:
        """Releases the least recently used idle session among `among` (oldest first); False if all are busy."""
        for key in among:
            session = self._sessions[key]
            if not session.busy:
                del self._sessions[key]
                session.release()
                return True
        return False

    def get(self, request) -> Session:
        """This request's session, created on first use. Full registry: an idle session of the same visitor goes
        first, then any idle one; if every session is busy, the new one is refused (nobody's job is touched)."""
        key = self.key(request)
        visitor = visitor_of(request)
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                mine = [k for k, s in self._sessions.items() if s.visitor == visitor]
                if len(mine) >= self.per_visitor and not self._evict_idle(mine):
                    raise InputError(TOO_MANY_SESSIONS)
                if len(self._sessions) >= self.max_sessions and not self._evict_idle(list(self._sessions)):
                    raise InputError(TOO_MANY_SESSIONS)
                session = self._sessions[key] = Session(visitor=visitor)
            self._sessions.move_to_end(key)
            return session

    def peek(self, request) -> Session | None:
        """The request's session if it exists (Stop and other cheap events never create one)."""
        with self._lock:
            return self._sessions.get(self.key(request))

    def drop(self, request) -> None:
        with self._lock:
            session = self._sessions.pop(self.key(request), None)
        if session is not None:
            session.close()

    def sessions(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def clear_inversions(self) -> None:
        """Forgets every session's cached inversions (they key on a LoRA's name, not on its weights)."""
        for session in self.sessions():
            session.inversion_cache.clear()

    def __len__(self) -> int:
        return len(self._sessions)
