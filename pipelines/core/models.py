"""Model loading: any SD-1.x-compatible diffusers folder (Hub id or local path), the embedded model, or the
tiny random model. Components load once and are shared by every session."""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .devices import pick_device, pick_dtype
from .errors import InputError
from .events import Progress
from .previews import LatentPreviewer, previewer_for
from .tiny_model import TINY_ID, TINY_LABEL, ensure_tiny_model

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
EMBEDDED_DIR = REPO_ROOT / "assets" / "model"
EMBEDDED_ID = "embedded"
INSTRUCT_SUBFOLDER = "unet_instruct"  # our layout: an InstructPix2Pix UNet beside the text-to-image one
INSTRUCT_HUB_MODEL = "timbrooks/instruct-pix2pix"
INPAINT_SUBFOLDER = "unet_inpaint"  # our layout: a 9-channel inpainting UNet beside the text-to-image one
SMOOTH_SUBFOLDER = "smooth_lora"  # our layout: the model's own Smooth LoRA, loaded with it as adapter "smooth"
CODI_SUBFOLDER = "codi"  # our layout: a CoDi few-step editing model (pipelines/codi.py), loaded on first use

HUB_MODELS = [
    "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "SG161222/Realistic_Vision_V2.0",
    "prompthero/openjourney-v4",
    INSTRUCT_HUB_MODEL,
]
MODEL_ENV = "STUDIO_MODEL"


@dataclass
class CodiModel:
    """A CoDi student: the UNet (the model's own text-to-image UNet, or a full-CoDi student's), the condition
    adapter (a diffusers ControlNetModel reading the input image's latent) and codi.json's settings."""

    unet: object
    adapter: object
    config: dict


@dataclass
class LoadedModel:
    """The shared, read-mostly components of one model, plus what the engine needs to know about it."""

    id: str
    label: str
    pipe: object  # diffusers StableDiffusionPipeline (kept for LoRA loading and the benchmark)
    previewer: LatentPreviewer
    device: torch.device
    dtype: torch.dtype
    random_weights: bool = False
    folder: Path | None = None
    loras: dict = field(default_factory=dict)  # adapter name -> source
    info: dict = field(default_factory=dict)  # the folder's studio_model.json (label, recommended settings)
    _instruct: object = field(default=None, repr=False)  # the InstructPix2Pix UNet, loaded on first use
    _inpaint: object = field(default=None, repr=False)  # the inpainting UNet (unet_inpaint/), loaded on first use
    singdiffusion_path: Path | None = None  # a SingDiffusion module folder given for this model (panel, CLI)
    _singdiffusion: tuple | None = field(default=None, repr=False)  # (source folder, module), loaded on first use
    _codi: CodiModel | None = field(default=None, repr=False)  # the CoDi model (codi/), loaded on first use

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def text_encoder(self):
        return self.pipe.text_encoder

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def scheduler_config(self):
        return self.pipe.scheduler.config

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def is_instruct(self) -> bool:
        """The main UNet itself takes [noisy latent, image latent] (e.g. timbrooks/instruct-pix2pix loaded as
        the model): it edits images but cannot generate from text alone."""
        return int(self.unet.config.in_channels) == 2 * self.latent_channels

    def instruct_unet(self):
        """The InstructPix2Pix UNet of this model: the main UNet of an InstructPix2Pix model, or the
        `unet_instruct/` folder next to a text-to-image UNet (the embedded model ships one); None if neither.
        Loaded once and shared, read-only, like the other components."""
        if self.is_instruct:
            return self.unet
        if (self._instruct is None and self.folder is not None
                and (self.folder / INSTRUCT_SUBFOLDER / "config.json").is_file()):
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.from_pretrained(self.folder / INSTRUCT_SUBFOLDER, dtype=self.dtype,
                                                        use_safetensors=True)
            self._instruct = unet.to(self.device).eval().requires_grad_(False)
        return self._instruct

    @property
    def is_inpaint(self) -> bool:
        """The main UNet itself takes [noisy latent, mask, masked-image latent] (a Hub SD-inpainting checkpoint
        loaded as the model): it inpaints but cannot generate from text alone."""
        return int(self.unet.config.in_channels) == 2 * self.latent_channels + 1

    def inpaint_unet(self):
        """The 9-channel inpainting UNet of this model: the main UNet of an inpainting model, or the
        `unet_inpaint/` folder next to a text-to-image UNet; None if neither (the Inpaint tab then blends latents
        with the 4-channel UNet). Loaded once and shared, read-only, like the other components."""
        if self.is_inpaint:
            return self.unet
        if (self._inpaint is None and self.folder is not None
                and (self.folder / INPAINT_SUBFOLDER / "config.json").is_file()):
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.from_pretrained(self.folder / INPAINT_SUBFOLDER, dtype=self.dtype,
                                                        use_safetensors=True)
            self._inpaint = unet.to(self.device).eval().requires_grad_(False)
        return self._inpaint

    def has_inpaint_unet(self) -> bool:
        """Whether inpaint_unet() has a UNet to give, without loading it."""
        return self.is_inpaint or self._inpaint is not None or (
            self.folder is not None and (self.folder / INPAINT_SUBFOLDER / "config.json").is_file())

    def codi_config(self) -> dict | None:
        """The settings of this model's CoDi model (`codi/codi.json`, read without loading weights), or None when
        the folder has none."""
        if self._codi is not None:
            return self._codi.config
        path = None if self.folder is None else self.folder / CODI_SUBFOLDER / "codi.json"
        if path is None or not path.is_file():
            return None
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError):
            config = None
        return config if isinstance(config, dict) else {}

    def codi(self) -> CodiModel | None:
        """The CoDi few-step editing model of this folder (`codi/`: controlnet/, optional unet/, codi.json), or
        None; loaded once on first use, shared read-only like the other components."""
        config = self.codi_config()
        if self._codi is None and config is not None:
            from diffusers import ControlNetModel, UNet2DConditionModel

            folder = self.folder / CODI_SUBFOLDER
            try:
                adapter = ControlNetModel.from_pretrained(folder / "controlnet", dtype=self.dtype,
                                                          use_safetensors=True)
                unet = self.unet
                if (folder / "unet" / "config.json").is_file():
                    unet = UNet2DConditionModel.from_pretrained(folder / "unet", dtype=self.dtype,
                                                                use_safetensors=True)
                    unet = unet.to(self.device).eval().requires_grad_(False)
            except Exception as exc:  # noqa: BLE001 - a broken folder becomes a clear message; details to the log
                log.warning("CoDi model in %s did not load", folder, exc_info=True)
                raise InputError(f"The CoDi model of {self.label} ({CODI_SUBFOLDER}/) could not be loaded: its "
                                 "files are missing or incomplete.") from exc
            self._codi = CodiModel(unet, adapter.to(self.device).eval().requires_grad_(False), config)
        return self._codi

    def singdiffusion_source(self) -> Path | None:
        """Where this model's SingDiffusion module is (pipelines/singdiffusion.py), without loading it: a folder
        given for it (Model panel, --singdiffusion), else the model folder's `singdiffusion/`, else
        $STUDIO_SINGDIFFUSION; None if none of them has a config.json."""
        from .singular_module import CONFIG, ENV, SUBFOLDER

        env = os.environ.get(ENV, "").strip()
        for where in (self.singdiffusion_path, self.folder / SUBFOLDER if self.folder is not None else None,
                      Path(env).expanduser() if env else None):
            if where is not None and (Path(where) / CONFIG).is_file():
                return Path(where)
        return None

    def singdiffusion(self):
        """The SingDiffusion module (a timestep-free UNet) of this model, loaded once from singdiffusion_source()
        and shared read-only; None if there is none. A module that does not fit raises InputError."""
        source = self.singdiffusion_source()
        if source is None:
            return None
        if self._singdiffusion is None or self._singdiffusion[0] != source:
            from .singular_module import load_module

            module = load_module(source, self.device, self.dtype, expect_channels=self.latent_channels,
                                 expect_text_dim=int(self.text_encoder.config.hidden_size))
            self._singdiffusion = (source, module)
        return self._singdiffusion[1]

    def use_singdiffusion(self, folder: Path):
        """Gives this model the SingDiffusion module in `folder` and loads it (returned); if it does not load, the
        model keeps the module it had and the InputError says why."""
        before = self.singdiffusion_path, self._singdiffusion
        self.singdiffusion_path = Path(folder)
        try:
            return self.singdiffusion()
        except Exception:
            self.singdiffusion_path, self._singdiffusion = before
            raise

    @property
    def resolution(self) -> int:
        """The native image side (e.g. 512 for SD1.5)."""
        return int(self.unet.config.sample_size) * self.vae_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (8, or the VAE factor if larger)."""
        return max(8, self.vae_factor)

    @property
    def display_name(self) -> str:
        return f"{self.label} [{self.device.type}, {str(self.dtype).replace('torch.', '')}]"


def model_choices() -> list[str]:
    """What the UI dropdown offers (a free-text local path or Hub id is accepted too)."""
    choices = []
    if embedded_available():
        choices.append(EMBEDDED_ID)
    return choices + HUB_MODELS + [TINY_ID]


def embedded_available() -> bool:
    return (EMBEDDED_DIR / "model_index.json").is_file()


def default_source() -> str:
    """--model / STUDIO_MODEL if set, else the embedded model when present, else the tiny model."""
    env = os.environ.get(MODEL_ENV, "").strip()
    if env:
        return env
    return EMBEDDED_ID if embedded_available() else TINY_ID


def resolve_source(source: str) -> tuple[str, str | Path, str | None]:
    """Returns (id, what to pass to from_pretrained, label override)."""
    source = (source or "").strip()
    if not source:
        raise InputError("No model given: choose one from the list or type a Hub id or local folder.")
    if source == TINY_ID:
        return TINY_ID, ensure_tiny_model(), TINY_LABEL
    if source == EMBEDDED_ID:
        if not embedded_available():
            raise InputError("The embedded model is not present in assets/model.")
        return EMBEDDED_ID, EMBEDDED_DIR, None
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise InputError(f"{source} is not a diffusers model folder (no model_index.json).")
        return str(path.resolve()), path, None
    if source.count("/") != 1 or source.startswith((".", "/")):
        raise InputError(f"{source!r} is neither an existing folder nor a Hub id like 'owner/name'.")
    return source, source, None


def _read_info(folder: Path | None) -> dict:
    """The studio's notes on a model folder (studio_model.json: label, random_weights, recommended settings);
    empty for folders without one, e.g. Hub checkouts."""
    if folder is not None and (folder / "studio_model.json").is_file():
        info = json.loads((folder / "studio_model.json").read_text())
        return info if isinstance(info, dict) else {}
    return {}


def load_model(source: str, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Iterator[Progress]:
    """Loads a model as a job of progress events; the last event's result is the LoadedModel.

    Safetensors only, no remote code. With HF_HUB_OFFLINE=1 (or no network) only the local cache is used.
    """
    from diffusers import StableDiffusionPipeline

    total = 3
    yield Progress("resolving model", 0, total, message=f"Resolving {source}")
    model_id, where, label = resolve_source(source)
    device = device or pick_device()
    dtype = dtype or pick_dtype(device)
    yield Progress("loading weights", 1, total, message=f"Loading {model_id}")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            where, dtype=dtype, use_safetensors=True, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    except Exception as exc:  # noqa: BLE001 - any loading failure becomes a clear message; details to the log
        log.warning("model %s did not load", model_id, exc_info=True)
        offline = isinstance(exc, OSError) and ("cache" in str(exc) or "offline" in str(exc).lower())
        why = ("it is not in the local cache and cannot be downloaded here" if offline else
               "its files are missing, incomplete or not a Stable Diffusion 1.x diffusers model")
        raise InputError(f"Could not load model {model_id!r}: {why}.") from exc
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if dtype == torch.float16:
        pipe.vae.to(torch.float32)  # SD VAEs can overflow in fp16 decode; fp32 keeps it safe
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval().requires_grad_(False)
    folder = Path(where) if isinstance(where, Path) else _hub_snapshot_folder(pipe)
    yield Progress("preview factors", 2, total, message="Preparing latent previews")
    previewer = previewer_for(pipe.vae, folder)
    info = _read_info(folder)
    model = LoadedModel(
        id=model_id, label=label or info.get("label", model_id), pipe=pipe, previewer=previewer, device=device,
        dtype=dtype, random_weights=bool(info.get("random_weights", False)), folder=folder, info=info,
    )
    smooth = bundled_smooth_lora(folder)
    if smooth is not None:
        from .lora import SMOOTH_NAME, load_lora

        load_lora(model, str(smooth), SMOOTH_NAME)
    yield Progress("loaded", total, total, result=model, message=f"Loaded {model.display_name}")


def bundled_smooth_lora(folder: Path | None) -> Path | None:
    """The Smooth LoRA shipped inside a model folder (`smooth_lora/*smooth*.safetensors`), if any."""
    if folder is None or not (folder / SMOOTH_SUBFOLDER).is_dir():
        return None
    return next(iter(sorted((folder / SMOOTH_SUBFOLDER).glob("*smooth*.safetensors"))), None)


def _hub_snapshot_folder(pipe) -> Path | None:
    name = getattr(pipe.config, "_name_or_path", None)
    return Path(name) if name and Path(name).is_dir() else None
