"""The studio engine: one shared model, one GPU job at a time, every operation a generator of events.

The UI (or a script) owns per-session objects (cancel tokens, caches) and passes them in; nothing here is
per-session, so no browser session can see another's data.
"""
from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from .codi import CodiParams, codi_edit
from .core.errors import InputError
from .core.events import CancelToken, Job, Progress, run_to_end
from .core.lora import SMOOTH_LORA_FILE, SMOOTH_LORA_REPO, SMOOTH_NAME, load_lora, unload_lora
from .core.models import EMBEDDED_ID, default_source, embedded_available, load_model
from .core.tiny_model import TINY_ID
from .diffedit import DiffEditParams, diffedit_edit, diffedit_mask
from .drag import DragParams, drag
from .dreambooth import DreamBoothParams, dreambooth
from .edit import EditParams, text_edit
from .generate import GenerateParams, generate, generate_batch
from .inpaint import InpaintParams, inpaint
from .instruct import InstructParams, instruct_edit
from .interpolation import InterpolationParams, interpolation_compare, interpolation_frame, interpolation_sequence
from .inversion import InversionParams, invert_and_reconstruct
from .real_interpolation import (
    RealInterpolationParams,
    real_interpolation_compare,
    real_interpolation_frame,
    real_interpolation_sequence,
)
from .sdedit import SDEditParams, sdedit

log = logging.getLogger(__name__)


def adapter_name_for(source: str) -> str | None:
    """The adapter name a LoRA gets when none is given: "smooth" for the Smooth LoRA (its Hub repo, or a file
    named smooth_lora.safetensors), the name that "Use the Smooth LoRA" and the drag apply; else None (the
    loader names it after its file)."""
    source = (source or "").strip()
    if source.split(":")[0] == SMOOTH_LORA_REPO or Path(source).name == SMOOTH_LORA_FILE:
        return SMOOTH_NAME
    return None


class Studio:
    def __init__(self) -> None:
        self.model = None
        self.notice = ""            # e.g. why the requested model was not loaded at start-up
        self.pool: dict = {}        # hosted mode: the allow-listed models, preloaded, by source
        self._lock = threading.Lock()

    def with_model(self, model) -> Studio:
        """The same studio (same GPU lock) running its jobs on `model` instead of the active one: a hosted
        session's own model choice, which never changes what other sessions run on."""
        view = copy.copy(self)
        view.model = model
        return view

    # --- model management -------------------------------------------------------------------------
    def start(self, source: str | None = None) -> Studio:
        """Loads the requested/default model; if it cannot load, falls back (embedded, then tiny) and says why."""
        wanted = source or default_source()
        fallbacks = [wanted] + [s for s in (EMBEDDED_ID if embedded_available() else None, TINY_ID)
                                if s and s != wanted]
        errors = []
        for src in fallbacks:
            try:
                self.model = run_to_end(load_model(src))
                break
            except InputError as exc:
                errors.append(str(exc))
                log.warning("model %s did not load: %s", src, exc)
        if self.model is None:
            raise InputError("No model could be loaded: " + " | ".join(errors))
        if errors:
            self.notice = f"{errors[0]} Using {self.model.label} instead."
        return self

    def switch_model(self, source: str, cancel: CancelToken | None = None) -> Job:
        """Loads another model; on failure the previous one stays active and the error says why."""

        def job(_current):
            for ev in load_model(source):
                if ev.done:  # activate before the UI hears "loaded"
                    self.model = ev.result
                    self.notice = ""
                yield ev
            return self.model

        return self._exclusive(job, cancel)

    def load_lora(self, source: str, name: str | None = None, cancel: CancelToken | None = None) -> Job:
        """Loads a LoRA onto the active model (the Smooth LoRA as adapter "smooth", see adapter_name_for)."""
        name = name or adapter_name_for(source)

        def job(model):
            yield Progress("loading LoRA", 0, 1, message=f"Loading {Path(str(source)).name[:80]}")  # no server path
            adapter = load_lora(model, source, name)
            yield Progress("loaded", 1, 1, result=adapter, message=f"LoRA {adapter!r} loaded")

        return self._exclusive(job, cancel)

    def load_singdiffusion(self, source: str, cancel: CancelToken | None = None) -> Job:
        """Gives the active model a SingDiffusion module folder (config.json + diffusion_pytorch_model.safetensors,
        pipelines/singdiffusion.py) and loads it; on failure the model keeps what it had and the error says why."""
        from .core.singular_module import shown_path

        def job(model):
            text = str(source or "").strip()
            if not text:
                raise InputError("Give the folder of a SingDiffusion module (config.json and "
                                 "diffusion_pytorch_model.safetensors).")
            folder = Path(text).expanduser()
            if not folder.is_dir():
                raise InputError(f"{shown_path(folder)} is not a folder.")
            yield Progress("loading SingDiffusion module", 0, 1, message=f"Loading {shown_path(folder)}")
            module = model.use_singdiffusion(folder.resolve())
            count = sum(p.numel() for p in module.parameters())
            yield Progress("loaded", 1, 1, result=folder, message=f"SingDiffusion module loaded for {model.label} "
                                                                  f"({count / 1e6:.1f} M parameters)")

        return self._exclusive(job, cancel)

    def unload_lora(self, name: str, cancel: CancelToken | None = None) -> Job:
        """Deletes a loaded LoRA from the active model (under the GPU lock: no job is using it meanwhile)."""

        def job(model):
            yield Progress("unloading LoRA", 0, 1, message=f"Unloading {str(name)[:64]!r}")
            adapter = unload_lora(model, name)
            yield Progress("unloaded", 1, 1, result=adapter, message=f"LoRA {adapter!r} unloaded")

        return self._exclusive(job, cancel)

    # --- operations -------------------------------------------------------------------------------
    def generate(self, p: GenerateParams, cancel: CancelToken | None = None, preview=None, trajectories=None) -> Job:
        return self._exclusive(lambda m: generate(m, p, cancel, preview, trajectories), cancel)

    def generate_batch(self, p: GenerateParams, count: int = 1, cancel: CancelToken | None = None, preview=None,
                       trajectories=None) -> Job:
        """`count` images with consecutive seeds, one job holding the model (pipelines/generate.py)."""
        return self._exclusive(lambda m: generate_batch(m, p, count, cancel, preview, trajectories), cancel)

    def interpolation_frame(self, p: InterpolationParams, eta: float, cache=None, cancel=None, preview=None) -> Job:
        return self._exclusive(lambda m: interpolation_frame(m, p, eta, cache, cancel, preview), cancel)

    def interpolation_sequence(self, p: InterpolationParams, n_frames: int = 11, cache=None, cancel=None,
                               preview=None, gif_dir=None) -> Job:
        return self._exclusive(
            lambda m: interpolation_sequence(m, p, n_frames, cache, cancel, preview, gif_dir), cancel)

    def interpolation_compare(self, p: InterpolationParams, n_frames: int = 11, cache=None, cancel=None,
                              preview=None) -> Job:
        """The sequence without and with the LoRA `p.lora` (a LoraComparison)."""
        return self._exclusive(lambda m: interpolation_compare(m, p, n_frames, cache, cancel, preview), cancel)

    def invert(self, image, p: InversionParams, cache=None, cancel=None, preview=None) -> Job:
        return self._exclusive(lambda m: invert_and_reconstruct(m, image, p, cache, cancel, preview), cancel)

    def edit(self, image, p: EditParams, cache=None, cancel=None, preview=None) -> Job:
        return self._exclusive(lambda m: text_edit(m, image, p, cache, cancel, preview), cancel)

    def instruct(self, image, p: InstructParams, cancel=None, preview=None) -> Job:
        return self._exclusive(lambda m: instruct_edit(m, image, p, cancel, preview), cancel)

    def instruct_fast(self, image, p: CodiParams, cancel=None, preview=None) -> Job:
        """Instruction editing in 1, 2 or 4 steps with the model's CoDi model (pipelines/codi.py)."""
        return self._exclusive(lambda m: codi_edit(m, image, p, cancel, preview), cancel)

    def diffedit_mask(self, image, p: DiffEditParams, cancel=None, preview=None) -> Job:
        return self._exclusive(lambda m: diffedit_mask(m, image, p, cancel, preview), cancel)

    def diffedit(self, image, p: DiffEditParams, mask=None, cache=None, cancel=None, preview=None) -> Job:
        return self._exclusive(lambda m: diffedit_edit(m, image, p, mask, cache, cancel, preview), cancel)

    def drag(self, image, p: DragParams, mask=None, cache=None, cancel=None, preview=None) -> Job:
        return self._exclusive(lambda m: drag(m, image, p, mask, cache, cancel, preview), cancel)

    def dreambooth(self, images, p: DreamBoothParams, cancel=None) -> Job:
        """Trains a DreamBooth LoRA on 3-5 images and loads it as adapter db_<token> (pipelines/dreambooth.py)."""
        return self._exclusive(lambda m: dreambooth(m, images, p, cancel), cancel)

    def sdedit(self, image, p: SDEditParams, mask=None, cancel=None, preview=None) -> Job:
        return self._exclusive(lambda m: sdedit(m, image, p, mask, cancel, preview), cancel)

    def inpaint(self, image, mask, p: InpaintParams, cancel=None, preview=None) -> Job:
        """The masked region regenerated from a prompt (pipelines/inpaint.py)."""
        return self._exclusive(lambda m: inpaint(m, image, mask, p, cancel, preview), cancel)

    def real_interpolation_frame(self, image_a, image_b, p: RealInterpolationParams, eta: float, cache=None,
                                 cancel=None, preview=None) -> Job:
        return self._exclusive(
            lambda m: real_interpolation_frame(m, image_a, image_b, p, eta, cache, cancel, preview), cancel)

    def real_interpolation_sequence(self, image_a, image_b, p: RealInterpolationParams, n_frames: int = 11,
                                    cache=None, cancel=None, preview=None, gif_dir=None) -> Job:
        return self._exclusive(lambda m: real_interpolation_sequence(m, image_a, image_b, p, n_frames, cache, cancel,
                                                                     preview, gif_dir), cancel)

    def real_interpolation_compare(self, image_a, image_b, p: RealInterpolationParams, n_frames: int = 11,
                                   cache=None, cancel=None, preview=None) -> Job:
        """The real-image sequence without and with the LoRA `p.lora`, each from its own inversion."""
        return self._exclusive(lambda m: real_interpolation_compare(m, image_a, image_b, p, n_frames, cache, cancel,
                                                                    preview), cancel)

    # --- one job at a time ------------------------------------------------------------------------
    def _exclusive(self, make_job: Callable, cancel: CancelToken | None) -> Job:
        """Runs make_job(model) while holding the GPU lock; waiting stays cancellable."""
        announced = False
        while not self._lock.acquire(timeout=0.05):
            if cancel is not None:
                cancel.check()
            if not announced:
                announced = True
                yield Progress("waiting for the GPU", 0, 1, message="Another job is running; queued.")
        try:
            if cancel is not None:
                cancel.check()
            return (yield from make_job(self.model))
        finally:
            self._lock.release()
