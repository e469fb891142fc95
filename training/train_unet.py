"""Train the embedded model's text encoder and UNet together on the synthetic world, in latent space.

    python training/train_unet.py --out training/runs/unet --vae training/runs/vae/vae --minutes 60
    python training/train_unet.py ... --resume        # continue after a stop (same total budget)

Recipe (SD's, scaled down): epsilon prediction on SD1.5's noise schedule (scaled_linear 0.00085-0.012,
1000 steps), uniform timesteps, 10% empty captions so classifier-free guidance works, AdamW, cosine LR,
EMA weights (diffusers' EMAModel) for export. The CLIP text encoder trains from scratch jointly with the UNet (one
loss); the tokenizer is a CLIP BPE tokenizer built from the world's vocabulary (other words still split into pieces).
Latents come from the frozen VAE encoder once, cached in --out/data (safetensors).

Writes into --out: checkpoint/ (accelerate's save_state folder, for --resume: the UNet (model.safetensors), the
trained text encoder (model_1.safetensors), optimizer, LR schedule, random states, step and EMA weights),
history.jsonl (held-out checker accuracy as training goes), model/ (a complete diffusers StableDiffusionPipeline
folder with the EMA weights).

`--device cuda` trains on a GPU (the cached latents stay on the CPU; each batch, its noise and timesteps are
drawn there as on a CPU run, then moved); checkpoints are device-independent. The run is an `accelerate` one:
`accelerate launch --multi_gpu --num_processes N training/train_unet.py ... --device cuda` trains on N GPUs, each
process drawing its own batches (--seed + its index); --bf16 is accelerate's bf16 mixed precision.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training import checkpoint, evaluation, schedule, world  # noqa: E402
from training.schedule import (  # noqa: E402
    add_data_dir,
    after_optimizer_step,
    cache_source,
    cpu_randn,
    data_dir,
    end_processes,
    load_cache,
    lr_schedule,
    own_accelerate_state,
    parse_run_args,
    precision,
    progress_of,
    run_parser,
    save_cache,
    smoothed,
    start_accelerated_run,
)
from training.text_states import FrozenTextStates  # noqa: E402

# Measured on this 2-core CPU (1 thread, batch 48): attention at 16x16 doubled the step time (3.4 s vs
# 1.8 s) for little use at 64 px, so cross-attention sits at the 8x8 and 4x4 levels only.
# addition_embed_type="text" adds an attention-pooled text embedding to the timestep embedding, so every ResNet
# block hears the prompt: without it, after 1600 steps the prompt had no measurable effect on the background
# colour (global content is decided at high noise, where cross-attention alone was not picked up yet). The UNet
# is still a plain UNet2DConditionModel driven by encoder_hidden_states, so SD pipelines run it unchanged.
UNET_ARCH = dict(block_out_channels=(64, 128, 128), layers_per_block=1, norm_num_groups=32, attention_head_dim=8,
                 addition_embed_type="text", addition_embed_type_num_heads=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
TEXT_ARCH = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4)
TINY_UNET = dict(UNET_ARCH, block_out_channels=(16, 32, 32), norm_num_groups=8)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1)
LABEL = "embedded world model (trained by this project on its synthetic world)"


def parse_args(argv=None) -> argparse.Namespace:
    p = run_parser(__doc__, batch=48, lr=5e-4, warmup=200, checkpoint_every=100, eval_every=400)
    p.add_argument("--vae", required=True, help="diffusers vae folder (its encoder makes the latents)")
    p.add_argument("--samples", type=int, default=30000, help="training scenes (latents cached once)")
    add_data_dir(p)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--cond-drop", type=float, default=0.1, help="share of empty captions (for guidance)")
    p.add_argument("--max-weight", type=float, default=5.0,
                   help="per-sample loss weight 1/SNR(t), clipped to [1, this] (1: plain epsilon loss)")
    p.add_argument("--high-t-share", type=float, default=0.5,
                   help="share of each batch whose timestep is drawn from the noisier half [500, 1000)")
    p.add_argument("--object-weight", type=float, default=0.0,
                   help="extra loss weight on the latent pixels an object touches (and a 1-pixel ring around "
                        "them): objects are a few percent of each latent, so shape detail barely moves the "
                        "plain loss; 0: every latent pixel counts the same")
    p.add_argument("--oversample", default="",
                   help="draw scenes with these objects more often, e.g. 'star=3,small-square=2' (a shape, or "
                        "size-shape; a scene counts at the largest factor among its objects): the shapes the "
                        "model gets wrong most are rare within the uniform draw")
    p.add_argument("--text-encoder", help="a pre-trained text encoder run (train_text.py --out): its text_encoder/ "
                   "and tokenizer/ are used frozen, as SD uses CLIP (default: train one jointly from scratch)")
    p.add_argument("--init-unet", help="diffusers unet folder to start from (same architecture; default: random)")
    p.add_argument("--eval-prompts", type=int, default=24)
    p.add_argument("--tiny", action="store_true", help="tiny networks and data, for tests")
    return parse_run_args(p, argv)


# --------------------------------------------------------------------------------------------- models


def world_words(scenes: int = 4000) -> list[str]:
    """Every word the world's captions and edit instructions use, most frequent first (stable order)."""
    counts: dict[str, int] = {}
    for seed in range(scenes):
        scene = world.sample_scene(seed)
        texts = [world.caption(scene, seed)]
        for kind in world.EDIT_KINDS:
            try:
                texts.append(world.make_edit(scene, seed, kind).instruction)
            except ValueError:
                pass
        for text in texts:
            for w in re.findall(r"[a-z]+", text.lower()):
                counts[w] = counts.get(w, 0) + 1
    return sorted(counts, key=lambda w: (-counts[w], w))


def build_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    from pipelines.core.tiny_model import WORDS, build_tokenizer_files

    build_tokenizer_files(folder, world_words() + list(WORDS))
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tok.model_max_length = 77
    tok.save_pretrained(folder)
    return tok


def text_encoder_for(text: dict, vocab_size: int):
    """A fresh CLIPTextModel of the given size over the world tokenizer's vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, max_position_embeddings=77, projection_dim=text["hidden_size"],
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, **text))


def build_models(args, vocab_size: int):
    from diffusers import UNet2DConditionModel

    text = TINY_TEXT if args.tiny else TEXT_ARCH
    text_encoder = text_encoder_for(text, vocab_size)
    arch = TINY_UNET if args.tiny else UNET_ARCH
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4,
                                cross_attention_dim=text["hidden_size"], **arch)
    return text_encoder, unet


# --------------------------------------------------------------------------------------------- data


@torch.no_grad()
def build_data(folder: Path, vae, tokenizer, count: int, seed: int, progress: bool) -> dict:
    """Caches (latents, token ids) of `count` training-split scenes; reused when already there. Encodes on the
    VAE's device; the cache (file and returned tensors) is on the CPU."""
    path = folder / "latents.safetensors"
    source = cache_source(vae, tokenizer)
    cached = load_cache(path, "latents", count, seed, source)
    if cached is not None:
        return cached
    latents, ids = [], []
    items = world.dataset(seed * count, count, 64, split="train")
    bar = tqdm(total=count, desc="encoding world scenes", disable=not progress)
    while True:
        chunk = [item for _, item in zip(range(64), items)]
        if not chunk:
            break
        images = np.stack([im for im, _, _ in chunk])
        latents.append(evaluation.encode(vae, images).half().cpu())
        ids.append(tokenizer([t for _, t, _ in chunk], padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids.int())
        bar.update(len(chunk))
    bar.close()
    data = {"latents": torch.cat(latents).contiguous(), "ids": torch.cat(ids).contiguous()}
    save_cache(path, data, seed, source)
    return data


def object_map(scenes, latent_size: int = 16) -> torch.Tensor:
    """(latent_size, latent_size) float16 in {0, 1}: the latent pixels any object of the given scenes touches,
    grown by one latent pixel (an object's edge and the background just outside it both carry its shape)."""
    cover = np.zeros((64, 64), np.float32)
    for scene in scenes:
        for obj in scene.objects:
            cover += world.object_coverage(obj, scene.size)
    touched = torch.nn.functional.max_pool2d(torch.from_numpy(cover)[None, None], 64 // latent_size) > 0
    return torch.nn.functional.max_pool2d(touched.float(), 3, stride=1, padding=1)[0, 0].half()


def cached_maps(path: Path, count: int, seed: int, make) -> torch.Tensor:
    """`make()`'s stacked maps, cached as safetensors at `path` (rebuilt if the count or seed differs)."""
    cached = load_cache(path, "maps", count, seed)
    if cached is not None:
        return cached["maps"]
    maps = torch.stack(list(make())).contiguous()
    save_cache(path, {"maps": maps}, seed)
    return maps


def build_object_maps(folder: Path, count: int, seed: int, latent_size: int = 16) -> torch.Tensor:
    """(count, latent_size, latent_size): object_map of each scene build_data caches, in the same order."""
    return cached_maps(folder / "object_maps.safetensors", count, seed, lambda: (
        object_map([scene], latent_size) for _, scene in training_scenes(count, seed)))


def training_scenes(count: int, seed: int):
    """The (caption, scene) pairs build_data caches, in its order, without rendering them."""
    return world.captioned_scenes(seed * count, count, 64, split="train")


def parse_factors(text: str) -> dict[str, float]:
    """'star=3,small-square=2' -> {'star': 3.0, 'small-square': 2.0}; names must be world shapes, optionally
    prefixed by a world size."""
    def shape_key(name):
        size, _, shape = name.rpartition("-")
        return shape in world.SHAPES and (not size or size in world.SIZES)
    return schedule.parse_factors(text, shape_key, f"shape=factor or size-shape=factor (shapes "
                                  f"{', '.join(world.SHAPES)}; sizes {', '.join(world.SIZES)})")


def draw_weights(scenes, factors: dict[str, float]) -> np.ndarray:
    """Per-scene draw probability: the largest factor that names one of its objects (1 if none), normalised."""
    weights = np.array([max([1.0] + [factors.get(key, 1.0) for obj in scene.objects
                                     for key in (obj.shape, f"{obj.size}-{obj.shape}")]) for scene in scenes])
    return weights / weights.sum()


# --------------------------------------------------------------------------------------------- training


LR_FLOOR = 0.1  # cosine decay to 10% of --lr (train_instruct.py too)


@torch.no_grad()
def _load_grown(unet, state: dict) -> set[str]:
    """Loads a checkpoint taken before the pooled-text embedding existed: its new modules start with a zeroed
    output norm, so the network computes exactly what it did before, then learns to use them."""
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("add_embedding.") for k in missing):
        raise RuntimeError(f"checkpoint does not fit the UNet: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if missing:
        unet.add_embedding.norm2.weight.zero_()
        unet.add_embedding.norm2.bias.zero_()
    return {k.split(".")[1] for k in missing}


def draw_timesteps(n: int, total: int, high_share: float) -> torch.Tensor:
    """Uniform timesteps, except that a share of the batch comes from the noisier half. Under epsilon
    prediction the clean image is only a sqrt(alpha_bar) ~ 0.07 part of the target at t ~ 1000, so global
    content (background colour, layout), which is decided there, learns slowly; measured at 1200 steps, the
    x0 predicted at t=951 ignored the background colour of the prompt. Extra high-t samples fix that faster."""
    t = torch.randint(0, total, (n,))
    high = torch.rand(n) < high_share
    t[high] = torch.randint(total // 2, total, (int(high.sum()),))
    return t


def noised(z0: torch.Tensor, alphas_cumprod: torch.Tensor, high_t_share: float):
    """(z_t, t, noise): clean latents noised at drawn timesteps, as DDPM/SD training does. t and the noise are
    drawn from the CPU generator (in this order) and moved to z0's device."""
    t = draw_timesteps(len(z0), len(alphas_cumprod), high_t_share).to(z0.device)
    noise = cpu_randn(z0)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise, t, noise


def diffusion_loss(unet, encode, alphas_cumprod, z0, ids, high_t_share: float = 0.0, max_weight: float = 1.0,
                   pixel_weight: torch.Tensor | None = None, forward_precision=contextlib.nullcontext) -> torch.Tensor:
    """SD's objective, predict the noise added at a drawn timestep, with each sample's squared error weighted
    by 1/SNR(t) clipped to [1, max_weight] (weights normalised over the batch). 1/SNR turns the epsilon error
    into the error of the implied clean image; at high noise that is what decides the global content, and
    under the plain epsilon loss its gradient is ~SNR (0.005 at t=999) times smaller: measured at 1600-2100
    steps, a caption lowered the loss by 45-55% at t=300-500 but by 6% at t=999, and prompts had no effect on
    the background colour. The clip keeps low-noise steps (shape detail) from being drowned.

    `pixel_weight` (B, h, w), optional: each sample's error is a weighted mean over its latent pixels.
    `encode(ids)` gives the text states (a live text encoder's, or training.text_states' when it is frozen).
    `forward_precision()`: the networks' context (the trainer's is schedule.precision: --bf16's autocast); the loss
    stays float32."""
    zt, t, noise = noised(z0, alphas_cumprod, high_t_share)
    with forward_precision():
        emb = encode(ids)
        pred = unet(zt, t, encoder_hidden_states=emb).sample.float()
    per_sample = pixel_mean((pred - noise).pow(2), pixel_weight)
    return weighted_mean(per_sample, alphas_cumprod[t], max_weight)


def pixel_mean(sq_err: torch.Tensor, pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean of (B, C, h, w) squared errors, weighted over the latent pixels by (B, h, w) if given."""
    err = sq_err.mean(dim=1)
    if pixel_weight is None:
        return err.mean(dim=(1, 2))
    return (pixel_weight * err).sum(dim=(1, 2)) / pixel_weight.sum(dim=(1, 2))


def weighted_mean(per_sample: torch.Tensor, alpha_bar: torch.Tensor, max_weight: float) -> torch.Tensor:
    """Batch mean of per-sample epsilon errors weighted by 1/SNR clipped to [1, max_weight]."""
    weight = ((1 - alpha_bar) / alpha_bar).clamp(1.0, max_weight)
    return (weight * per_sample).sum() / weight.sum()


def export(out: Path, args, unet, text_encoder, tokenizer, vae_folder: str) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    from pipelines.core.previews import fit_previewer

    vae = AutoencoderKL.from_pretrained(vae_folder)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    with checkpoint.swapped_in(out / "model") as partial:
        pipe.save_pretrained(partial, safe_serialization=True)
        fit_previewer(vae).save(partial)
        (partial / "studio_model.json").write_text(json.dumps({"label": LABEL, "random_weights": False}))
    return out / "model"


def quick_eval(args, unet, text_encoder, tokenizer, vae) -> dict:
    from diffusers import DDIMScheduler

    unet.eval(), text_encoder.eval()
    acc = evaluation.text_to_image_accuracy(unet, text_encoder, tokenizer, vae, DDIMScheduler(**SCHEDULER).config,
                                            count=args.eval_prompts, steps=20)
    unet.train(), text_encoder.train()
    return {k: round(v, 3) for k, v in acc.items()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    with own_accelerate_state():
        return _train(args)


def _train(args) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler
    from diffusers.training_utils import EMAModel

    accelerator, out, rng = start_accelerated_run(args)
    device = accelerator.device
    main_process = accelerator.is_main_process

    vae = AutoencoderKL.from_pretrained(args.vae).eval().requires_grad_(False).to(device)
    cache = data_dir(args)
    with accelerator.main_process_first():  # the main process writes the tokenizer and caches, the others read them
        if args.text_encoder or not main_process:
            from transformers import CLIPTokenizer

            tokenizer = CLIPTokenizer.from_pretrained(Path(args.text_encoder or out) / "tokenizer")
        else:
            tokenizer = build_tokenizer(out / "tokenizer")
        data = build_data(cache, vae, tokenizer, args.samples, args.seed, not args.no_progress and main_process)
        object_maps = build_object_maps(cache, args.samples, args.seed, data["latents"].shape[-1]) \
            if args.object_weight else None
    latents = data["latents"]
    ids_all = data["ids"].long()
    empty = tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    factors = parse_factors(args.oversample)
    draw_p = draw_weights((scene for _, scene in training_scenes(args.samples, args.seed)), factors) \
        if factors else None

    text_encoder, unet = build_models(args, len(tokenizer))
    train_text = not args.text_encoder
    if not train_text:
        from transformers import CLIPTextModel

        text_encoder = CLIPTextModel.from_pretrained(Path(args.text_encoder) / "text_encoder").requires_grad_(False)
    if args.init_unet and not args.resume:
        from diffusers import UNet2DConditionModel

        unet.load_state_dict(UNet2DConditionModel.from_pretrained(args.init_unet).float().state_dict())
    # what the quick looks sample with and the export saves: copies that receive the EMA weights (never prepared, so
    # they run in float32 whatever --bf16 says)
    eval_unet = copy.deepcopy(unet).requires_grad_(False).to(device)
    eval_text = copy.deepcopy(text_encoder).requires_grad_(False).to(device) if train_text else text_encoder
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text else [])
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    run = checkpoint.RunState(rng, accelerator.process_index)
    run.running = {"loss": None}
    lr = lr_schedule(opt, args, LR_FLOOR, run)
    if train_text:
        unet, text_encoder, opt, lr = accelerator.prepare(unet, text_encoder, opt, lr)
    else:
        unet, opt, lr = accelerator.prepare(unet, opt, lr)
        text_encoder.to(device)
    networks = [accelerator.unwrap_model(unet)] + ([accelerator.unwrap_model(text_encoder)] if train_text else [])
    emas = [EMAModel(net.parameters(), decay=args.ema, foreach=True) for net in networks]
    accelerator.register_for_checkpointing(run, *emas)
    if args.resume:
        checkpoint.load_state(accelerator, out)
        for ema in emas:
            ema.to(device)  # loaded onto the CPU
    alphas_cumprod = DDIMScheduler(**SCHEDULER).alphas_cumprod.float().to(device)
    # a frozen text encoder gives every caption the same states all run long: encode each distinct one once
    encode = (lambda t: text_encoder(t)[0]) if train_text else \
        FrozenTextStates(text_encoder, torch.cat([ids_all, empty[None]]), device)

    def with_ema():
        """The eval copies, holding the EMA weights."""
        for ema, copy_ in zip(emas, [eval_unet, eval_text]):
            ema.copy_to(copy_.parameters())
        return eval_unet, eval_text

    def save():
        checkpoint.save_state(accelerator, out, checkpoint.summary(
            run, args, opt, ["unet", "text_encoder"] if train_text else ["unet"],
            ema=["unet", "text_encoder"] if train_text else ["unet"]))

    def look():
        return {"loss": round(run.running["loss"], 4), **quick_eval(args, *with_ema(), tokenizer, vae)}

    unet.train(), text_encoder.train(train_text)
    bar = tqdm(total=args.steps, initial=run.step, disable=args.no_progress or not main_process, dynamic_ncols=True)
    run.begin()
    while progress_of(args, run.step, run.seconds()) < 1.0:
        idx = torch.from_numpy(rng.integers(0, len(latents), args.batch) if draw_p is None else
                               rng.choice(len(latents), args.batch, p=draw_p))
        ids = ids_all[idx].clone()
        ids[torch.from_numpy(rng.random(args.batch) < args.cond_drop)] = empty
        weight = None if object_maps is None else (1 + args.object_weight * object_maps[idx].float()).to(device)
        loss = diffusion_loss(unet, encode, alphas_cumprod, latents[idx].float().to(device), ids.to(device),
                              args.high_t_share, args.max_weight, weight, lambda: precision(accelerator))
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        opt.step()
        lr.step()
        run.step += 1
        for ema, net in zip(emas, networks):
            ema.step(net.parameters())
        run.running["loss"] = smoothed(run.running["loss"], float(accelerator.gather(loss.detach()[None]).mean()))
        after_optimizer_step(args, out, bar, run, look, save, main_process, loss=f"{run.running['loss']:.4f}",
                             lr=f"{opt.param_groups[0]['lr']:.1e}")
    bar.close()
    save()
    report = {"step": run.step, "minutes": round(run.seconds() / 60, 2), "loss": run.running["loss"],
              "unet_params": sum(p.numel() for p in eval_unet.parameters()),
              "text_encoder_params": sum(p.numel() for p in eval_text.parameters())}
    if main_process:
        report["model"] = str(export(out, args, *with_ema(), tokenizer, args.vae))
        print(json.dumps(report), flush=True)
    accelerator.wait_for_everyone()
    return report


if __name__ == "__main__":
    main()
    end_processes()
