"""Smooth LoRA training (Smooth Diffusion, arXiv 2312.04410) for any SD1.x model, on `accelerate`.

    python training/train_smooth_lora.py --out runs/smooth --steps 2000                  # the embedded model
    python training/train_smooth_lora.py --base stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --data my_images/ --out runs/smooth_sd15 --steps 30000 --batch 3 --grad-accum 8   # a folder + metadata.jsonl
    accelerate launch --multi_gpu --num_processes 4 training/train_smooth_lora.py ... --device cuda
    python training/train_smooth_lora.py ... --resume                                     # continue after a stop

The base UNet, VAE and text encoder stay frozen; a peft LoRA (rank 8 by default) sits on every attention layer's
to_q / to_k / to_v / to_out.0, self- and cross-attention, added through diffusers' adapter API. The loss is the
epsilon MSE plus lambda times the step-wise variation regularization (`training/smooth_reg.py`): the norm of a
vector-Jacobian product of the denoised estimate with respect to the noise, along a random unit direction scaled by
sqrt(1 - alpha_bar_t), pulled towards its running mean (decay 0.01). That running mean is part of every checkpoint
(`accelerator.save_state`), so a resumed run continues with it.

Data: the embedded synthetic world by default (training split, held-out prompts excluded); otherwise `--data`, a
folder of images with `metadata.jsonl` lines {"file_name": ..., "text": ...} (the Hub's imagefolder layout).

Writes into --out: checkpoint/ (resume), history.jsonl (loss, regularization loss, mean variation), and
`smooth_lora.safetensors` in diffusers' LoRA format (`pipe.load_lora_weights(out, weight_name=...)`) or, with
--legacy-format, the official release's attention-processor key layout (`...attn1.processor.to_q_lora.down.weight`).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training.schedule import own_accelerate_state  # noqa: E402
from training.smooth_reg import VariationTarget, smooth_losses  # noqa: E402

DEFAULT_BASE = ROOT / "assets" / "model"
TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
WEIGHT_NAME = "smooth_lora.safetensors"


class TrainingError(ValueError):
    """Bad training input (data, rank, base model): the message says what to change."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=str(DEFAULT_BASE), help="SD1.x diffusers folder or Hub id (default: embedded)")
    p.add_argument("--data", help="image folder with metadata.jsonl (file_name, text); default: the embedded world")
    p.add_argument("--world-samples", type=int, default=20000, help="world scenes to draw from (default data)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, required=True, help="optimiser steps (whole run, resumed parts included)")
    p.add_argument("--batch", type=int, default=16, help="images per process per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default=",".join(TARGET_MODULES),
                   help="comma-separated module names the LoRA adapts (default: every attention projection, as the "
                        "paper; e.g. add conv1,conv2 for the ResNet blocks of UNets with few attention layers)")
    p.add_argument("--lambda-reg", type=float, default=1.0, help="weight of the variation regularization")
    p.add_argument("--reg-min-t", type=int, default=0,
                   help="only timesteps >= this enter the regularization (0: all, as the paper)")
    p.add_argument("--ema-decay", type=float, default=0.01, help="decay of the variation's running-mean target")
    p.add_argument("--caption-dropout", type=float, default=0.0, help="share of empty captions")
    p.add_argument("--resolution", type=int, help="training image side (default: the model's native size)")
    p.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    p.add_argument("--legacy-format", action="store_true",
                   help="write the official release's attention-processor key layout instead of diffusers'")
    p.add_argument("--export", help="also copy the final LoRA file into this folder (e.g. <model>/smooth_lora)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--eval-every", type=int, default=50, help="history.jsonl row every this many steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (accelerate places the processes)")
    p.add_argument("--workers", type=int, default=0, help="data loader workers")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.rank < 1:
        p.error(f"--rank must be at least 1 (got {args.rank})")
    if args.steps < 1 or args.batch < 1 or args.grad_accum < 1:
        p.error("--steps, --batch and --grad-accum must be at least 1")
    if args.lambda_reg < 0 or not 0 < args.ema_decay <= 1:
        p.error("--lambda-reg must be >= 0 and --ema-decay in (0, 1]")
    return args


# --------------------------------------------------------------------------------------------- data


def _pixels(image, size: int) -> torch.Tensor:
    """PIL image -> (3, size, size) in [-1, 1]: shorter side resized to `size`, centre crop."""
    from PIL import Image

    image = image.convert("RGB")
    scale = size / min(image.size)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    array = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


class WorldCaptions(Dataset):
    """The embedded world's training split: (caption, scene) drawn once, rendered on access."""

    def __init__(self, count: int, size: int):
        from training import world

        self.world, self.size = world, size
        self.items = list(world.captioned_scenes(0, count, size, split="train"))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        text, scene = self.items[i]
        image = torch.from_numpy(self.world.render(scene).astype(np.float32)).permute(2, 0, 1) / 127.5 - 1.0
        return {"pixels": image, "text": text}


class ImageFolderCaptions(Dataset):
    """A folder of images with metadata.jsonl ({"file_name", "text"} per line), checked in full up front so a bad
    folder fails before any training starts."""

    def __init__(self, folder: str | Path, size: int):
        from PIL import Image

        self.folder, self.size = Path(folder), size
        meta = self.folder / "metadata.jsonl"
        if not self.folder.is_dir():
            raise TrainingError(f"Data folder {self.folder} does not exist.")
        if not meta.is_file():
            raise TrainingError(f"No captions: {self.folder} has no metadata.jsonl (one JSON line per image with "
                                "\"file_name\" and \"text\").")
        self.items: list[tuple[Path, str]] = []
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise TrainingError(f"metadata.jsonl line {n} is not JSON.") from None
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                raise TrainingError(f"metadata.jsonl line {n} has no \"file_name\".")
            text = row.get("text", row.get("caption"))
            if not isinstance(text, str) or not text.strip():
                raise TrainingError(f"metadata.jsonl line {n} ({row['file_name']}) has no caption (\"text\").")
            path = (self.folder / row["file_name"]).resolve()
            if self.folder.resolve() not in path.parents:
                raise TrainingError(f"metadata.jsonl line {n}: {row['file_name']!r} is outside the data folder.")
            try:
                with Image.open(path) as im:
                    im.verify()
            except Exception:  # noqa: BLE001 - missing, truncated or not an image
                raise TrainingError(f"Unreadable image {row['file_name']!r} (metadata.jsonl line {n}).") from None
            self.items.append((path, text.strip()))
        if not self.items:
            raise TrainingError("metadata.jsonl lists no images.")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        path, text = self.items[i]
        with Image.open(path) as im:
            return {"pixels": _pixels(im, self.size), "text": text}


# --------------------------------------------------------------------------------------------- model


def load_base(base: str):
    """(tokenizer, text_encoder, vae, unet, alphas_cumprod) of an SD1.x folder or Hub id, float32, frozen."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", use_safetensors=True)
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", use_safetensors=True, dtype=torch.float32)
        noise = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    except Exception as exc:  # noqa: BLE001 - missing folder, no network, wrong layout
        raise TrainingError(f"Could not load the base model {base!r}: {str(exc).splitlines()[0][:200]}") from None
    if noise.config.prediction_type != "epsilon":
        raise TrainingError(f"Only epsilon-prediction models are supported (this one: {noise.config.prediction_type}).")
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False).eval()
    return tokenizer, text_encoder, vae, unet.float(), noise.alphas_cumprod.float()


def add_smooth_lora(unet, rank: int, targets=TARGET_MODULES) -> int:
    """Adds the trainable LoRA (the only trainable weights); returns its parameter count."""
    from peft import LoraConfig

    names = {n.rsplit(".", 1)[-1] for n, _ in unet.named_modules()}
    if not {"to_q", "to_k", "to_v"} <= names:
        raise TrainingError("The base UNet has no attention layers (to_q / to_k / to_v): a Smooth LoRA needs them.")
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets))
    unet.add_adapter(config)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # trainable weights in float32 whatever the forward precision
    return sum(p.numel() for p in params)


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter's weights with diffusers' key names (no "unet." prefix), on the CPU."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in
            convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)).items()}


_PEFT_KEY = re.compile(r"^(?:unet\.)?(.+)\.to_(q|k|v|out\.0)\.(lora_A|lora_B|lora\.down|lora\.up)\.weight$")


def to_legacy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers/peft names -> the official release's attention-processor names:
    `...attn1.to_q.lora_A.weight` -> `...attn1.processor.to_q_lora.down.weight` (lora_B -> up, to_out.0 -> to_out)."""
    out = {}
    for key, value in state_dict.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise TrainingError(f"Unexpected LoRA key {key!r}")
        module, proj, half = match.groups()
        proj = "out" if proj == "out.0" else proj
        out[f"{module}.processor.to_{proj}_lora.{'down' if half in ('lora_A', 'lora.down') else 'up'}.weight"] = value
    return out


def save_lora(unet, folder: Path, legacy: bool = False, weight_name: str = WEIGHT_NAME) -> Path:
    """Writes the LoRA file atomically (a side file renamed over the final one)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / weight_name
    side = folder / (weight_name + ".partial")
    sd = lora_state_dict(unet)
    if legacy:
        save_file(to_legacy(sd), str(side), metadata={"format": "pt", "smooth_lora": "legacy attn-procs"})
    else:
        tmp = folder / ".partial_dir"
        shutil.rmtree(tmp, ignore_errors=True)
        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=sd, weight_name=weight_name)
        (tmp / weight_name).replace(side)
        shutil.rmtree(tmp, ignore_errors=True)
    side.replace(final)
    return final


class RunState:
    """What accelerate's save_state does not know about: step, the variation target (EMA) and the noise rng."""

    def __init__(self, target: VariationTarget, generator: torch.Generator):
        self.step, self.target, self.generator = 0, target, generator
        self.running: dict[str, float] = {}  # the logged losses' moving averages

    def state_dict(self) -> dict:
        return {"step": self.step, "target": self.target.state_dict(), "running": dict(self.running),
                "generator": self.generator.get_state().tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.running = int(state["step"]), dict(state.get("running", {}))
        self.target.load_state_dict(state["target"])
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))


# --------------------------------------------------------------------------------------------- training


def main(argv=None) -> dict:
    args = parse_args(argv)
    with own_accelerate_state():  # a fresh accelerate state per run, none left behind (training/schedule.py)
        return _train(args)


def _train(args: argparse.Namespace) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from peft.utils import set_peft_model_state_dict
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum,
                              cpu=args.device == "cpu", project_dir=str(out),
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    set_seed(args.seed)
    tokenizer, text_encoder, vae, unet, alphas = load_base(args.base)
    size = args.resolution or int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
    data = ImageFolderCaptions(args.data, size) if args.data else WorldCaptions(args.world_samples, size)
    n_params = add_smooth_lora(unet, args.rank, [t.strip() for t in args.targets.split(",") if t.strip()])

    def collate(rows):
        texts = ["" if np.random.random() < args.caption_dropout else r["text"] for r in rows]
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return {"pixels": torch.stack([r["pixels"] for r in rows]), "ids": ids}

    loader = DataLoader(data, batch_size=args.batch, shuffle=True, collate_fn=collate, num_workers=args.workers,
                        drop_last=len(data) >= args.batch)
    optimiser = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay)
    lr_schedule = get_scheduler("constant_with_warmup" if args.warmup else "constant", optimiser,
                                num_warmup_steps=args.warmup * accelerator.num_processes)
    unet, optimiser, loader, lr_schedule = accelerator.prepare(unet, optimiser, loader, lr_schedule)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae.to(accelerator.device, weight_dtype)
    text_encoder.to(accelerator.device, weight_dtype)
    scaling = float(vae.config.scaling_factor)

    # accelerate checkpoints the whole prepared model; only the LoRA is trained, so only the LoRA is saved (peft's
    # own key names, read back by peft)
    def save_hook(models, weights, folder):
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        if accelerator.is_main_process:
            for model in models:
                sd = get_peft_model_state_dict(accelerator.unwrap_model(model))
                save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()},
                          str(Path(folder) / "lora.safetensors"))
            weights.clear()

    def load_hook(models, folder):
        from safetensors.torch import load_file

        while models:
            model = accelerator.unwrap_model(models.pop())
            result = set_peft_model_state_dict(model, load_file(str(Path(folder) / "lora.safetensors")))
            if getattr(result, "unexpected_keys", None):
                raise TrainingError(f"The checkpoint's LoRA does not fit: {result.unexpected_keys[:3]}")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    generator = torch.Generator().manual_seed(args.seed + accelerator.process_index)
    state = RunState(VariationTarget(args.ema_decay), generator)
    accelerator.register_for_checkpointing(state)
    checkpoint = out / "checkpoint"
    if args.resume and (checkpoint / "custom_checkpoint_0.pkl").exists():
        accelerator.load_state(str(checkpoint))
    elif out.exists() and not args.resume:
        for stale in ("checkpoint", "history.jsonl"):
            p = out / stale
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(vars(args), indent=1))

    bar = tqdm(total=args.steps, initial=state.step, disable=args.no_progress or not accelerator.is_main_process,
               desc="smooth lora")
    start, running = time.time(), state.running
    per_epoch = max(1, len(loader) // args.grad_accum)
    while state.step < args.steps:
        epoch, done_in_epoch = divmod(state.step, per_epoch)
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, done_in_epoch * args.grad_accum) if done_in_epoch else loader
        for batch in batches:
            with accelerator.accumulate(unet):
                with torch.no_grad():
                    pixels = batch["pixels"].to(accelerator.device, weight_dtype)
                    dist = vae.encode(pixels).latent_dist
                    noise_z = torch.randn(dist.mean.shape, generator=generator).to(dist.mean.device)
                    x0 = ((dist.mean + dist.std * noise_z.to(dist.mean.dtype)) * scaling).float()
                    states = text_encoder(batch["ids"].to(accelerator.device))[0]
                eps = torch.randn(x0.shape, generator=generator).to(x0.device)
                t = torch.randint(0, len(alphas), (len(x0),), generator=generator).to(x0.device)
                # the plain attention kernel: the fused ones have no double backward
                with accelerator.autocast(), sdpa_kernel([SDPBackend.MATH]):
                    losses = smooth_losses(unet, x0, eps, t, states, alphas, state.target, generator, args.reg_min_t)
                loss = losses["mse"] + args.lambda_reg * losses["reg"]
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), 1.0)
                optimiser.step()
                lr_schedule.step()
                optimiser.zero_grad(set_to_none=True)
            for k, v in losses.items():
                value = float(accelerator.gather(v.detach().reshape(1)).mean())
                running[k] = value if k not in running else 0.98 * running[k] + 0.02 * value
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{running['mse']:.4f}", reg=f"{running['reg']:.3g}",
                            variation=f"{running['variation']:.3g}", target=f"{state.target.value:.3g}")
            if accelerator.is_main_process and (state.step % args.eval_every == 0 or state.step == args.steps):
                with (out / "history.jsonl").open("a") as f:
                    f.write(json.dumps({"step": state.step, "minutes": round((time.time() - start) / 60, 2),
                                        "loss": running["mse"], "reg_loss": running["reg"],
                                        "variation": running["variation"], "target": state.target.value}) + "\n")
            if state.step % args.checkpoint_every == 0 or state.step == args.steps:
                accelerator.save_state(str(checkpoint))
                if accelerator.is_main_process:  # readable summary beside accelerate's files
                    (checkpoint / "state.json").write_text(json.dumps(state.state_dict() | {"generator": None}))
            if state.step >= args.steps:
                break
    bar.close()
    accelerator.wait_for_everyone()
    result = {"steps": state.step, "lora_parameters": n_params, "seconds": time.time() - start,
              "variation_target": state.target.value, **{k: v for k, v in running.items()}}
    if accelerator.is_main_process:
        final = save_lora(accelerator.unwrap_model(unet), out, legacy=args.legacy_format)
        if args.export:
            Path(args.export).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(final, Path(args.export) / (final.name + ".partial"))
            (Path(args.export) / (final.name + ".partial")).replace(Path(args.export) / final.name)
        result["file"] = str(final)
        (out / "result.json").write_text(json.dumps(result, indent=1))
    accelerator.end_training()
    return result


if __name__ == "__main__":
    try:
        main()
    except TrainingError as exc:
        sys.exit(f"error: {exc}")
