"""DreamBooth personalisation (Ruiz et al. 2023) as a peft LoRA: 3-5 images of a subject, captioned
"a <token> <class word>", teach the UNet that a rare identifier token means that subject, while a prior loss on
images the frozen model itself makes for "a <class word>" keeps the rest of the class as it was.

How it runs (in-process, like the drag's per-image LoRA in pipelines/drag/lora.py):
- everything is checked before any work (`validate`): 3-5 images of one size after the model's preprocessing, an
  identifier that is no common word of the tokenizer, a class word, the numbers;
- the instance images are encoded once (posterior mean and std; a fresh posterior sample per step);
- the class latents come from the frozen model (every adapter off) through the studio's DDIM sampler, cached per
  (model, prompts, seed, count, steps, guidance, size);
- a rank-r adapter (alpha = rank, Gaussian init) on every attention projection of the UNet, trained with AdamW at
  a constant learning rate, no warm-up; each step one batch holds the instance items and as many class items,
  loss = MSE(instance) + prior_weight * MSE(class);
- every step yields a Progress event with both loss curves, every `preview_every` steps a preview of one token
  prompt and one class prompt (drift shows there), and checks the cancel token (also before every UNet call of the
  class sampling and the previews);
- all of it runs inside `peft_state_restored`: Stop or an error leaves the UNet as it was (no half adapter, the
  Smooth LoRA and other adapters untouched). Only a finished run saves the adapter (diffusers' LoRA format through
  `save_lora_weights`: `unet.` keys, its LoraConfig in the file's metadata, plus a sidecar JSON) and loads it back
  through the studio's own LoRA loader as `db_<token>`: the adapter every tab's LoRA menu offers is exactly the
  file's.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from peft import LoraConfig, get_peft_model_state_dict
from PIL import Image

from .core import ddim
from .core.cache import LRUCache
from .core.errors import InputError
from .core.events import CancelToken, Kind, Progress
from .core.image_io import pil_to_tensor
from .core.latents import decode_latents, initial_noise
from .core.limits import get_limits
from .core.lora import load_lora
from .core.peft_state import adapter_configs, freeze_lora, peft_state_restored, quiet_peft
from .core.text import encode_prompt
from .core.tiny_model import default_cache_dir
from .core.validation import check_number, shown
from .inversion import prepare_image

ADAPTER_PREFIX = "db_"
TRAINING_ADAPTER = "dreambooth_training"   # the adapter's name while it trains (an old db_<token> stays usable)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]   # every attention projection, self and cross (diffusers' script)
MIN_IMAGES, MAX_IMAGES = 3, 5
MAX_STEPS = 5000
MAX_TOKEN_PIECES = 3     # the paper: 1-3 rare tokens
# The CLIP BPE vocabulary lists byte symbols first (2 x 256), then merges from the most frequent down: a whole
# word among the first COMMON_MERGES merges is an ordinary word ("dog", "red"), whose prior DreamBooth would
# overwrite. Small tokenizers (the world's, the tiny model's) hold nothing but such words.
COMMON_MERGES = 20_000
IDENTIFIER = re.compile(r"^[a-z0-9]{2,16}$")
CLASS_WORD = re.compile(r"^[a-z][a-z0-9 -]{0,39}$")
WEIGHT_DECAY = 1e-2      # AdamW as diffusers' script (beta 0.9 / 0.999, eps 1e-8)
FORMAT_VERSION = 1

_class_cache = LRUCache(8)   # class latents (CPU tensors) by (model, prompts, seed, count, steps, guidance, size)


@dataclass
class DreamBoothParams:
    token: str = "sks"
    class_word: str = ""
    steps: int = 400
    lr: float = 1e-4
    rank: int = 4
    prior: bool = True
    prior_images: int = 8            # class images the frozen model makes (cycling through class_prompts)
    prior_weight: float = 1.0
    seed: int = 0
    instance_prompts: tuple[str, ...] = ()   # one per image (each naming the token); default "a <token> <class>"
    class_prompts: tuple[str, ...] = ()      # default ("a <class>",)
    prior_steps: int = 25            # DDIM steps of the class sampling
    guidance: float = 7.5            # class sampling and previews
    preview_every: int = 50          # 0: no previews
    preview_steps: int = 20
    out_dir: str | None = None       # where the adapter file and sidecar go (default: the studio's cache)

    @property
    def adapter(self) -> str:
        return adapter_name_of(self.token)

    @property
    def instance_prompt(self) -> str:
        return f"a {self.token} {self.class_word}"

    @property
    def class_prompt(self) -> str:
        return f"a {self.class_word}"


@dataclass
class DreamBoothResult:
    name: str                        # the adapter's name (db_<token>), loaded and in model.loras
    path: Path                       # the .safetensors file (diffusers' LoRA format)
    sidecar: Path                    # its JSON sidecar
    losses: dict = field(default_factory=dict)   # {"instance": [...], "prior": [...]}
    seconds: float = 0.0
    info: dict = field(default_factory=dict)     # the sidecar's content
    preview: Image.Image | None = None           # the last preview (token prompt | class prompt)


def adapter_name_of(token: str) -> str:
    return ADAPTER_PREFIX + str(token or "").strip().lower()


# --------------------------------------------------------------------------------------------- validation


def check_identifier(tokenizer, token: str, class_word: str = "") -> str:
    """The identifier, lower-cased, or InputError: short letters/digits, 1-3 tokenizer pieces, and no common word
    of the model's vocabulary (its prior would fight the subject)."""
    text = str(token or "").strip().lower()
    if not text:
        raise InputError("Give an identifier: a short made-up word such as 'sks' that names your subject.")
    if not IDENTIFIER.match(text):
        raise InputError(f"The identifier {shown(text)} must be 2-16 letters or digits (one made-up word, e.g. "
                         "'sks').")
    words = set(str(class_word or "").lower().split())
    if text in words:
        raise InputError(f"The identifier {text!r} is the class word itself: choose a made-up word such as 'sks'.")
    pieces = tokenizer.tokenize(text)
    if len(pieces) == 1 and pieces[0].endswith("</w>"):
        index = tokenizer.convert_tokens_to_ids(pieces[0])
        if index is not None and index < 512 + COMMON_MERGES:
            raise InputError(f"The identifier {text!r} is already a word of this model's vocabulary: it has a "
                             "meaning the training would fight. Choose a rare made-up word (e.g. 'sks', 'zqx').")
    if len(pieces) > MAX_TOKEN_PIECES:
        raise InputError(f"The identifier {text!r} splits into {len(pieces)} tokens ({' '.join(pieces)}); use a "
                         f"shorter made-up word of at most {MAX_TOKEN_PIECES}.")
    return text


def check_class_word(word: str) -> str:
    text = " ".join(str(word or "").strip().lower().split())
    if not text:
        raise InputError("Give a class word: what the subject is ('dog', 'mug', 'circle').")
    if not CLASS_WORD.match(text):
        raise InputError(f"The class word {shown(text)} must be a plain word or two (letters, digits, spaces).")
    return text


def validate(model, images: Sequence, p: DreamBoothParams) -> tuple[list[Image.Image], DreamBoothParams]:
    """Checks everything before any work: returns the images as the model sees them and the cleaned parameters."""
    class_word = check_class_word(p.class_word)
    token = check_identifier(model.tokenizer, p.token, class_word)
    p = replace(p, token=token, class_word=class_word,
                steps=check_number(p.steps, "Training steps", 1, MAX_STEPS, integer=True),
                lr=check_number(p.lr, "Learning rate", 1e-7, 1e-2),
                rank=check_number(p.rank, "LoRA rank", 1, 64, integer=True),
                prior=bool(p.prior),
                prior_images=check_number(p.prior_images, "Class images", 1, 200, integer=True),
                prior_weight=check_number(p.prior_weight, "Prior loss weight", 0, 10),
                seed=check_number(p.seed, "Seed", 0, 2**32 - 1, integer=True),
                prior_steps=check_number(p.prior_steps, "Class sampling steps", 1, get_limits().max_steps,
                                         integer=True),
                guidance=check_number(p.guidance, "Guidance", 0, 30),
                preview_every=check_number(p.preview_every, "Preview every", 0, MAX_STEPS, integer=True),
                preview_steps=check_number(p.preview_steps, "Preview steps", 1, get_limits().max_steps,
                                           integer=True))
    prompts = tuple(" ".join(str(t).split()) for t in (p.instance_prompts or ()))
    if prompts:
        if len(prompts) != len(images):
            raise InputError(f"Give one caption per image ({len(images)} images, {len(prompts)} captions).")
        missing = [t for t in prompts if token not in t.lower().split()]
        if missing:
            raise InputError(f"Every caption must name the identifier {token!r}: {shown(missing[0])} does not.")
    classes = tuple(" ".join(str(t).split()) for t in (p.class_prompts or ()) if str(t).strip())
    if any(token in t.lower().split() for t in classes):
        raise InputError(f"Class prompts must not name the identifier {token!r}: they keep the class as it was.")
    p = replace(p, instance_prompts=prompts, class_prompts=classes)
    name = p.adapter
    if name not in model.loras and len(model.loras) >= get_limits().max_loras:
        raise InputError(f"{len(model.loras)} LoRAs are loaded, the most allowed: unload one "
                         f"({', '.join(model.loras)}) before training another.")
    images = [im for im in (images or []) if im is not None]
    if not MIN_IMAGES <= len(images) <= MAX_IMAGES:
        raise InputError(f"DreamBooth needs {MIN_IMAGES}-{MAX_IMAGES} images of the subject; "
                         f"{len(images)} {'was' if len(images) == 1 else 'were'} given.")
    prepared = [prepare_image(model, im) for im in images]
    sizes = sorted({im.size for im in prepared})
    if len(sizes) > 1:
        listed = ", ".join(f"{w}x{h}" for w, h in sizes)
        raise InputError(f"The images have different sizes after resizing to the model ({listed}): give images of "
                         "one size and shape (crop them alike).")
    return prepared, p


# --------------------------------------------------------------------------------------------- pieces


def image_hash(image: Image.Image) -> str:
    """sha256 of the image as trained on (RGB pixels and size), so the sidecar names the exact inputs."""
    arr = np.ascontiguousarray(np.asarray(image.convert("RGB")))
    return hashlib.sha256(f"{arr.shape}".encode() + arr.tobytes()).hexdigest()


def instance_prompts_of(p: DreamBoothParams, count: int) -> list[str]:
    return list(p.instance_prompts) if p.instance_prompts else [p.instance_prompt] * count


def class_prompts_of(p: DreamBoothParams) -> list[str]:
    return list(p.class_prompts) if p.class_prompts else [p.class_prompt]


@torch.no_grad()
def encode_instances(model, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """The instance images' VAE posteriors (mean, std; unscaled, float32), encoded once."""
    vae = model.vae
    x = torch.cat([pil_to_tensor(im) for im in images]).to(model.device, next(vae.parameters()).dtype)
    post = vae.encode(x).latent_dist
    return post.mean.float(), post.std.float()


def _embed(model, prompts: Sequence[str]) -> torch.Tensor:
    return torch.cat([encode_prompt(model, t) for t in prompts])


def class_latents(model, prompts: Sequence[str], seed: int, count: int, size: tuple[int, int], steps: int,
                  guidance: float, cancel: CancelToken | None = None, offset: int = 0, total: int | None = None
                  ) -> Generator[Progress, None, torch.Tensor]:
    """`count` latents of the class prompts (cycling) from the frozen model, seeds seed, seed+1, ...; call with
    every adapter off. Cached per (model, prompts, seed, count, steps, guidance, size); returns model-space
    latents (CPU, float32)."""
    width, height = size
    key = (model.id, id(model.unet), tuple(prompts), int(seed), int(count), int(steps), float(guidance), width,
           height)
    cached = _class_cache.get(key)
    if cached is not None:
        yield Progress("class images", offset + count * steps, total or count * steps, cached=True,
                       message=f"Reusing {count} class images of {prompts[0]!r}")
        return cached
    uncond = encode_prompt(model, "")
    out = []
    chunk = 8
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        batch_prompts = [prompts[(start + i) % len(prompts)] for i in range(n)]
        cond = _embed(model, batch_prompts)
        x = torch.cat([initial_noise(model, seed + start + i, width, height) for i in range(n)])
        for state in ddim.sample(model.unet, x, cond, uncond.expand(n, -1, -1), guidance, steps,
                                 model.scheduler_config, cancel):
            x = state.latents
            done = start * steps + (state.index + 1) * n
            yield Progress("class images", offset + done, total or count * steps, stage_step=start + n,
                           stage_total=count, message=f"Class images {start + n}/{count} ({batch_prompts[0]!r}): "
                                                     f"step {state.index + 1}/{state.total}")
        out.append(x.float().cpu())
    latents = torch.cat(out)
    _class_cache.put(key, latents)
    return latents


@torch.no_grad()
def preview_pair(model, token_prompt: str, class_prompt: str, seed: int, size: tuple[int, int], steps: int,
                 guidance: float, cancel: CancelToken | None = None) -> Image.Image:
    """One image of the token prompt and one of the class prompt, side by side, with the UNet as it is now."""
    width, height = size
    x = torch.cat([initial_noise(model, seed, width, height)] * 2)
    cond = _embed(model, [token_prompt, class_prompt])
    uncond = encode_prompt(model, "").expand(2, -1, -1)
    for state in ddim.sample(model.unet, x, cond, uncond, guidance, steps, model.scheduler_config, cancel):
        x = state.latents
    images = ((decode_latents(model, x).clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return Image.fromarray(np.concatenate(list(images), axis=1))


def add_training_adapter(unet, rank: int, seed: int, name: str = TRAINING_ADAPTER) -> list[torch.nn.Parameter]:
    """The adapter to train: rank `rank`, alpha = rank, Gaussian init (peft draws lora_A from torch's global
    generator: seeded here and put back), fp32 weights; returns its parameters."""
    if name in adapter_configs(unet):
        with quiet_peft():
            unet.delete_adapters(name)
    device = next(unet.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), quiet_peft():
        torch.manual_seed(int(seed))
        unet.add_adapter(lora_config(rank), name)
    params = [prm for n, prm in unet.named_parameters() if f".{name}." in n]
    for prm in params:
        prm.data = prm.data.float()
    return params


def lora_config(rank: int) -> LoraConfig:
    return LoraConfig(r=int(rank), lora_alpha=int(rank), init_lora_weights="gaussian", target_modules=TARGETS)


def adapter_metadata(rank: int) -> dict:
    """The LoraConfig as JSON-able kwargs (diffusers stores them in the file; its loader then uses them)."""
    config = lora_config(rank).to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()
            if isinstance(v, (str, int, float, bool, list, set, dict, type(None)))}


def training_step(model, params_state: dict, batch: dict, gen: torch.Generator) -> tuple[torch.Tensor, float, float]:
    """One step's loss: instance posterior samples plus class latents in one batch, noised at random timesteps,
    noise (or v) prediction; returns (loss, instance MSE, prior MSE)."""
    unet, sched = model.unet, params_state["sched"]
    mean, std = batch["mean"], batch["std"]
    sf = model.vae.config.scaling_factor
    z = (mean + std * torch.randn(mean.shape, generator=gen).to(mean.device)) * sf
    n_inst = z.shape[0]
    cond = batch["instance_cond"]
    if batch.get("class_latents") is not None:
        z = torch.cat([z, batch["class_latents"]])
        cond = torch.cat([cond, batch["class_cond"]])
    noise = torch.randn(z.shape, generator=gen).to(z.device)
    t = torch.randint(0, sched.config.num_train_timesteps, (z.shape[0],), generator=gen).to(z.device)
    z_t = sched.add_noise(z, noise, t)
    pred = unet(z_t.to(model.dtype), t, encoder_hidden_states=cond).sample.float()
    target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(z, noise, t)
    inst = F.mse_loss(pred[:n_inst], target[:n_inst])
    if n_inst == z.shape[0]:
        return inst, float(inst.detach()), float("nan")
    prior = F.mse_loss(pred[n_inst:], target[n_inst:])
    return inst + params_state["prior_weight"] * prior, float(inst.detach()), float(prior.detach())


def save_adapter(state: dict[str, torch.Tensor], folder: Path, name: str, rank: int, info: dict) -> tuple[Path, Path]:
    """Writes `<name>.safetensors` (diffusers' LoRA format: `unet.` keys with lora.down/lora.up, the LoraConfig
    as adapter metadata) and `<name>.json` (the sidecar), each to a temporary name first and then renamed, so
    no half file is ever left behind."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    folder.mkdir(parents=True, exist_ok=True)
    path, sidecar = folder / f"{name}.safetensors", folder / f"{name}.json"
    with tempfile.TemporaryDirectory(dir=folder, prefix=".saving_") as tmp:
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=convert_state_dict_to_diffusers(state),
                                                  weight_name=path.name, safe_serialization=True,
                                                  unet_lora_adapter_metadata=adapter_metadata(rank))
        saved = Path(tmp) / path.name
        info = {**info, "file_sha256": hashlib.sha256(saved.read_bytes()).hexdigest()}
        (Path(tmp) / sidecar.name).write_text(json.dumps(info, indent=1))
        os.replace(saved, path)
        os.replace(Path(tmp) / sidecar.name, sidecar)
    return path, sidecar


def default_out_dir() -> Path:
    return default_cache_dir() / "dreambooth"


# --------------------------------------------------------------------------------------------- the job


@dataclass
class TrainingData:
    """What every step draws from: the instance posteriors and prompt embeddings, the class latents and theirs."""
    mean: torch.Tensor
    std: torch.Tensor
    instance_cond: torch.Tensor
    pool: torch.Tensor | None = None           # class latents (CPU), None without prior preservation
    class_cond: torch.Tensor | None = None     # one embedding per class latent


def training_data(model, prepared: Sequence[Image.Image], p: DreamBoothParams, cancel: CancelToken | None = None,
                  total: int | None = None) -> Generator[Progress, None, TrainingData]:
    """Encodes the instance images and prompts once and samples (or reuses) the class latents; call inside
    `peft_state_restored` with every adapter off (the frozen model)."""
    yield Progress("preparing", 0, total or 1, message=f"Encoding {len(prepared)} images")
    mean, std = encode_instances(model, prepared)
    data = TrainingData(mean, std, _embed(model, instance_prompts_of(p, len(prepared))))
    if p.prior:
        prompts = class_prompts_of(p)
        data.pool = yield from class_latents(model, prompts, p.seed, p.prior_images, prepared[0].size,
                                             p.prior_steps, p.guidance, cancel, 0, total)
        data.class_cond = _embed(model, [prompts[i % len(prompts)] for i in range(p.prior_images)])
    return data


def next_batch(data: TrainingData, gen: torch.Generator, device) -> dict:
    """One step's batch: every instance item, and as many class latents drawn from the pool (without repeats
    while the pool lasts)."""
    batch = {"mean": data.mean, "std": data.std, "instance_cond": data.instance_cond}
    if data.pool is not None:
        n = len(data.mean)
        pick = torch.randperm(len(data.pool), generator=gen)[:n]
        pick = torch.cat([pick, torch.randint(0, len(data.pool), (n - len(pick),), generator=gen)])
        batch["class_latents"] = data.pool[pick].to(device)
        batch["class_cond"] = data.class_cond[pick.to(data.class_cond.device)]
    return batch


def start_training(unet, p: DreamBoothParams) -> list[torch.nn.Parameter]:
    """Adds the training adapter and makes it the only active one, every other LoRA weight frozen; returns its
    parameters (requiring grad). Call inside `peft_state_restored`."""
    params = add_training_adapter(unet, p.rank, p.seed)
    unet.enable_lora()
    unet.set_adapters([TRAINING_ADAPTER], [1.0])
    freeze_lora(unet)
    for prm in params:
        prm.requires_grad_(True)
    return params


def optimizer_for(params, p: DreamBoothParams) -> torch.optim.Optimizer:
    """AdamW at a constant learning rate (no warm-up), as diffusers' script otherwise."""
    return torch.optim.AdamW(params, lr=p.lr, betas=(0.9, 0.999), weight_decay=WEIGHT_DECAY, eps=1e-8)


def trained_state(unet) -> dict[str, torch.Tensor]:
    """The training adapter's weights (peft names, float32, CPU)."""
    return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in
            get_peft_model_state_dict(unet, adapter_name=TRAINING_ADAPTER).items()}


def sidecar_info(model, p: DreamBoothParams, prepared: Sequence[Image.Image], losses: dict, seconds: float) -> dict:
    """What the JSON sidecar records: identifier, class, prompts, settings, base model, instance image hashes."""
    prior = losses.get("prior") or []
    return {"format": "studio-dreambooth", "version": FORMAT_VERSION, "adapter": p.adapter, "token": p.token,
            "class_word": p.class_word, "instance_prompts": instance_prompts_of(p, len(prepared)),
            "class_prompts": class_prompts_of(p), "steps": p.steps, "lr": p.lr, "rank": p.rank, "alpha": p.rank,
            "targets": TARGETS, "prior": p.prior, "prior_images": p.prior_images if p.prior else 0,
            "prior_weight": p.prior_weight, "seed": p.seed, "size": list(prepared[0].size), "base_model": model.id,
            "base_label": model.label, "trained_with_adapters": [],
            "instance_images_sha256": [image_hash(im) for im in prepared],
            "final_instance_loss": (losses.get("instance") or [None])[-1],
            "final_prior_loss": prior[-1] if p.prior and prior else None, "seconds": round(seconds, 1),
            "params": {k: v for k, v in asdict(p).items() if k != "out_dir"}}


def dreambooth(model, images: Sequence, p: DreamBoothParams, cancel: CancelToken | None = None
               ) -> Generator[Progress, None, DreamBoothResult]:
    """Trains the concept, saves it and loads it as adapter `db_<token>` (see the module doc). `images`: 3-5
    PIL images or paths."""
    started = time.perf_counter()
    prepared, p = validate(model, images, p)
    size = prepared[0].size
    unet = model.unet
    token_prompt, class_prompt = instance_prompts_of(p, len(prepared))[0], class_prompts_of(p)[0]
    class_calls = p.prior_images * p.prior_steps if p.prior else 0
    total = class_calls + p.steps
    losses: dict[str, list[float]] = {"instance": [], "prior": []}
    last_preview = None
    with peft_state_restored(unet):
        if adapter_configs(unet):
            unet.disable_lora()          # the frozen model: every loaded adapter off (put back on exit)
        data = yield from training_data(model, prepared, p, cancel, total)
        params = start_training(unet, p)
        opt = optimizer_for(params, p)
        fp16 = model.device.type == "cuda" and model.dtype == torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        state = {"sched": DDPMScheduler.from_config(model.scheduler_config), "prior_weight": p.prior_weight}
        gen = torch.Generator("cpu").manual_seed(int(p.seed))
        try:
            for step in range(p.steps):
                if cancel is not None:
                    cancel.check()
                batch = next_batch(data, gen, model.device)
                with torch.enable_grad():
                    loss, inst, prior = training_step(model, state, batch, gen)
                    scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                losses["instance"].append(inst)
                losses["prior"].append(prior)
                message = f"Step {step + 1}/{p.steps}: instance loss {inst:.4f}" + (
                    f", prior loss {prior:.4f}" if p.prior else "")
                yield Progress("training", class_calls + step + 1, total, partial={k: list(v) for k, v in
                                                                                    losses.items()},
                               kind=Kind.LOSSES, message=message, stage_step=step + 1, stage_total=p.steps)
                if p.preview_every and ((step + 1) % p.preview_every == 0 or step + 1 == p.steps):
                    last_preview = preview_pair(model, token_prompt, class_prompt, p.seed, size, p.preview_steps,
                                                p.guidance, cancel)
                    yield Progress("training", class_calls + step + 1, total, preview=last_preview,
                                   message=f"Preview at step {step + 1}: {token_prompt!r} | {class_prompt!r}",
                                   stage_step=step + 1, stage_total=p.steps)
            trained = trained_state(unet)
        finally:
            for prm in params:
                prm.grad = None
    # the UNet is as before training (peft_state_restored): now the adapter goes to a file and loads from it
    seconds = time.perf_counter() - started
    folder = Path(p.out_dir) if p.out_dir else default_out_dir()
    path, sidecar = save_adapter(trained, folder, p.adapter, p.rank, sidecar_info(model, p, prepared, losses, seconds))
    name = load_lora(model, str(path), p.adapter)
    info = json.loads(sidecar.read_text())
    result = DreamBoothResult(name, path, sidecar, losses, seconds, info, last_preview)
    yield Progress("done", total, total, result=result, preview=last_preview,
                   message=f"Adapter {name!r} trained in {seconds:.0f} s and loaded: use it from any tab's LoRA "
                           f"menu, with {p.token!r} in the prompt.")
    return result
