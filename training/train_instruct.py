"""Train the embedded model's InstructPix2Pix UNet on the world's edit triplets.

    python training/train_instruct.py --out training/runs/instruct --base training/runs/unet/model --minutes 25

Recipe (the IP2P paper's, scaled down): the UNet starts as a copy of the base text-to-image UNet with 4 extra
input channels for the input image's latent, their weights zero (so step 0 behaves exactly like the base
model); the text encoder and VAE stay frozen. Training pairs are (input render, instruction, edited render)
from `training.world.make_edit` on training seeds, all five edit kinds. Condition dropout as in the paper:
5% no instruction, 5% no input image, 5% neither, so image (sI) and text (sT) guidance both work at sampling.

Writes into --out: checkpoint/ (accelerate's save_state folder, for --resume: UNet, optimizer, LR schedule, random
states, step, EMA weights), history.jsonl (held-out edit success), unet/ (diffusers folder, EMA weights from
diffusers' EMAModel, 8 input channels).

`--device cuda` trains on a GPU (cached latents stay on the CPU; batches, dropout draws, noise and timesteps
are drawn there as on a CPU run, then moved); checkpoints are device-independent. The run is an `accelerate` one:
`accelerate launch --multi_gpu --num_processes N training/train_instruct.py ... --device cuda` trains on N GPUs;
--bf16 is accelerate's bf16 mixed precision.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipelines.core.unet_inputs import widened_unet  # noqa: E402
from training import checkpoint, evaluation, world  # noqa: E402
from training.schedule import (  # noqa: E402
    add_data_dir,
    after_optimizer_step,
    cache_source,
    data_dir,
    end_processes,
    load_cache,
    lr_schedule,
    own_accelerate_state,
    parse_factors,
    parse_run_args,
    precision,
    progress_of,
    run_parser,
    save_cache,
    smoothed,
    start_accelerated_run,
)
from training.text_states import FrozenTextStates  # noqa: E402
from training.train_unet import LR_FLOOR, SCHEDULER, cached_maps, noised, object_map, pixel_mean, weighted_mean  # noqa: E402

DROP_TEXT, DROP_IMAGE, DROP_BOTH = 0.05, 0.05, 0.05


def parse_args(argv=None) -> argparse.Namespace:
    p = run_parser(__doc__, batch=48, lr=3e-4, warmup=100, checkpoint_every=100, eval_every=400)
    p.add_argument("--base", required=True, help="the text-to-image model folder (unet, text_encoder, vae, ...)")
    p.add_argument("--vae", help="vae folder for the latents (default: the base's)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the base's)")
    p.add_argument("--text-encoder", help="text encoder folder (default: the base's); frozen either way")
    p.add_argument("--init-unet", help="UNet folder to start from (default: the base's unet/); a 4-channel one "
                   "gets the zeroed image inputs, an 8-channel one (an InstructPix2Pix UNet) is continued as it is")
    p.add_argument("--object-weight", type=float, default=0.0,
                   help="extra loss weight on the latent pixels objects touch in the input or the output (and a "
                        "1-pixel ring): edits cover a few percent of each latent, so getting them right barely "
                        "moves the plain loss")
    p.add_argument("--input-lr-mult", type=float, default=10.0,
                   help="learning-rate multiple for conv_in, whose image half starts at zero (see below)")
    p.add_argument("--data-only", action="store_true",
                   help="only build the cached triplet latents (can run before the base model is done)")
    p.add_argument("--samples", type=int, default=12000, help="training edit triplets (latents cached once)")
    add_data_dir(p)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--max-weight", type=float, default=5.0, help="1/SNR loss weight clip, as in train_unet.py")
    p.add_argument("--high-t-share", type=float, default=0.5, help="as in train_unet.py")
    p.add_argument("--eval-edits", type=int, default=12, help="held-out edits per kind in the quick look")
    p.add_argument("--oversample", default="",
                   help="draw these edit kinds more often, e.g. 'background=2,add=2' (kinds: "
                        + ", ".join(world.EDIT_KINDS) + ")")
    return parse_run_args(p, argv, unless="data_only")


def instruct_unet_from(base_unet):
    """The base UNet with 8 input channels; the 4 new ones start at zero weight. (An 8-channel UNet is returned
    as it is.)"""
    return widened_unet(base_unet, 8)


@torch.no_grad()
def apply_dropout(u: torch.Tensor, emb: torch.Tensor, image: torch.Tensor, empty_emb: torch.Tensor):
    """Condition dropout from one uniform draw per sample: [0, DROP_TEXT) drops the instruction, the next
    DROP_BOTH both, the next DROP_IMAGE the input image (zeroed latent). Returns new tensors."""
    no_text = u < DROP_TEXT + DROP_BOTH
    no_image = (u >= DROP_TEXT) & (u < DROP_TEXT + DROP_BOTH + DROP_IMAGE)
    emb, image = emb.clone(), image.clone()
    emb[no_text] = empty_emb
    image[no_image] = 0
    return emb, image


def kind_weights(kinds: list[str], text: str) -> np.ndarray | None:
    """Per-triplet draw probability from 'kind=factor,...' (None when empty: uniform draws)."""
    factors = parse_factors(text, world.EDIT_KINDS.__contains__,
                            f"kind=factor (kinds {', '.join(world.EDIT_KINDS)})")
    if not factors:
        return None
    weights = np.array([factors.get(k, 1.0) for k in kinds])
    return weights / weights.sum()


def build_data(folder: Path, vae, tokenizer, count: int, seed: int, progress: bool) -> dict:
    """Caches scaled edited latents, unscaled input latents (IP2P's input form) and instruction ids. Encodes on
    the VAE's device; the cache (file and returned tensors) is on the CPU."""
    path = folder / "triplets.safetensors"
    source = cache_source(vae, tokenizer)
    cached = load_cache(path, "target", count, seed, source)
    if cached is not None:
        return cached
    stream = _triplet_stream(count, seed)
    sources, targets, ids = [], [], []
    bar = tqdm(total=count, desc="encoding edit triplets", disable=not progress)
    done = 0
    while done < count:
        before, after, texts = [], [], []
        while len(texts) < min(64, count - done):
            scene, edit = next(stream)
            before.append(world.render(scene)), after.append(world.render(edit.scene)), texts.append(edit.instruction)
        sources.append(evaluation.encode(vae, np.stack(before), scaled=False).half().cpu())
        targets.append(evaluation.encode(vae, np.stack(after)).half().cpu())
        ids.append(tokenizer(texts, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids.int())
        done += len(texts)
        bar.update(len(texts))
    bar.close()
    data = {"source": torch.cat(sources).contiguous(), "target": torch.cat(targets).contiguous(),
            "ids": torch.cat(ids).contiguous()}
    save_cache(path, data, seed, source)
    return data


def _triplet_stream(count: int, seed: int):
    """(input scene, Edit) of the cached triplets, in cache order: build_data and build_object_maps share it."""
    rng = np.random.default_rng(seed + 777)
    for _ in range(count):
        scene = world.sample_scene(int(rng.integers(0, world.HELD_OUT_SEED - 1000)))
        yield scene, world.make_edit(scene, rng)


def build_object_maps(folder: Path, count: int, seed: int, latent_size: int = 16) -> torch.Tensor:
    """(count, latent_size, latent_size): the latent pixels the objects of each cached triplet's input or output
    touch (train_unet.object_map), in cache order. That covers every recolour, reshape, add and remove, and
    for a background edit the objects that must come through unchanged."""
    return cached_maps(folder / "object_maps.safetensors", count, seed, lambda: (
        object_map([scene, edit.scene], latent_size) for scene, edit in _triplet_stream(count, seed)))


def quick_eval(args, unet, text_encoder, tokenizer, vae, kinds=("recolour", "background")) -> dict:
    from diffusers import DDIMScheduler

    unet.eval()
    row = {}
    for kind in kinds:
        acc = evaluation.edit_accuracy(unet, text_encoder, tokenizer, vae, DDIMScheduler(**SCHEDULER).config, kind,
                                       count=args.eval_edits, steps=20)
        row[f"{kind}_success"] = round(acc["success"], 3)
        row[f"{kind}_psnr_outside"] = round(acc["psnr_outside"], 2)
    unet.train()
    return row


def main(argv=None) -> dict:
    args = parse_args(argv)
    with own_accelerate_state():
        return _train(args)


def _train(args) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextModel, CLIPTokenizer

    accelerator, out, rng = start_accelerated_run(args)
    device = accelerator.device
    main_process = accelerator.is_main_process
    base = Path(args.base)
    vae = AutoencoderKL.from_pretrained(args.vae or base / "vae").eval().requires_grad_(False).to(device)
    tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer or base / "tokenizer")
    cache = data_dir(args)
    with accelerator.main_process_first():  # the main process writes the caches, the others read them
        data = build_data(cache, vae, tokenizer, args.samples, args.seed, not args.no_progress and main_process)
        object_maps = build_object_maps(cache, args.samples, args.seed, data["target"].shape[-1]) \
            if args.object_weight and not args.data_only else None
    if args.data_only:
        return {"triplets": len(data["target"])}
    source, target, ids_all = data["source"], data["target"], data["ids"].long()
    draw_p = kind_weights([edit.kind for _, edit in _triplet_stream(args.samples, args.seed)], args.oversample)
    text_encoder = (CLIPTextModel.from_pretrained(args.text_encoder or base / "text_encoder")
                    .eval().requires_grad_(False))
    text_encoder.to(device)
    unet = instruct_unet_from(UNet2DConditionModel.from_pretrained(args.init_unet or base / "unet").float())
    empty = tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    # the text encoder is frozen: each distinct instruction (and the empty one) is encoded once
    encode = FrozenTextStates(text_encoder, torch.cat([ids_all, empty]), device)
    empty_emb = encode(empty)

    # The image reaches the network only through conv_in's zeroed half. At the base learning rate it grew too
    # slowly: after 1600 steps its weights had 3% of the norm of the latent half and the outputs ignored the
    # input image (7.5 dB outside the edit), so conv_in learns faster than the rest.
    first = [unet.conv_in.weight, unet.conv_in.bias]
    rest = [p for n, p in unet.named_parameters() if not n.startswith("conv_in.")]
    opt = torch.optim.AdamW([{"params": rest}, {"params": first, "lr": args.lr * args.input_lr_mult}],
                            lr=args.lr, weight_decay=0.01)
    # what the quick looks sample with and the export saves: a copy that receives the EMA weights (never prepared, so
    # it runs in float32 whatever --bf16 says)
    eval_unet = copy.deepcopy(unet).requires_grad_(False).to(device)
    run = checkpoint.RunState(rng, accelerator.process_index)
    run.running = {"loss": None}
    unet, opt, lr = accelerator.prepare(unet, opt, lr_schedule(opt, args, LR_FLOOR, run))
    network = accelerator.unwrap_model(unet)
    ema = EMAModel(network.parameters(), decay=args.ema, foreach=True)
    accelerator.register_for_checkpointing(run, ema)
    if args.resume:
        checkpoint.load_state(accelerator, out)
        ema.to(device)  # loaded onto the CPU
    alphas_cumprod = DDIMScheduler(**SCHEDULER).alphas_cumprod.float().to(device)

    def with_ema():
        ema.copy_to(eval_unet.parameters())
        return eval_unet

    def save():
        checkpoint.save_state(accelerator, out, checkpoint.summary(run, args, opt, ["unet"], ema=["unet"]))

    def look():
        return {"loss": round(run.running["loss"], 4), **quick_eval(args, with_ema(), text_encoder, tokenizer, vae)}

    unet.train()
    bar = tqdm(total=args.steps, initial=run.step, disable=args.no_progress or not main_process, dynamic_ncols=True)
    run.begin()
    while progress_of(args, run.step, run.seconds()) < 1.0:
        idx = torch.from_numpy(rng.integers(0, len(target), args.batch) if draw_p is None else
                               rng.choice(len(target), args.batch, p=draw_p))
        z0, image = target[idx].float().to(device), source[idx].float().to(device)
        emb = encode(ids_all[idx])
        u = torch.from_numpy(rng.random(args.batch)).to(device)
        emb, image = apply_dropout(u, emb, image, empty_emb)
        # Same weighting as the base model: the input image must steer the layout at high noise, where the
        # plain epsilon loss barely rewards it (after 1122 plain steps the output ignored the input: 7.5 dB).
        zt, t, noise = noised(z0, alphas_cumprod, args.high_t_share)
        weight = None if object_maps is None else (1 + args.object_weight * object_maps[idx].float()).to(device)
        with precision(accelerator):
            pred = unet(torch.cat([zt, image], 1), t, encoder_hidden_states=emb).sample.float()
        per_sample = pixel_mean((pred - noise).pow(2), weight)
        loss = weighted_mean(per_sample, alphas_cumprod[t], args.max_weight)
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(network.parameters(), 1.0)
        opt.step()
        lr.step()
        run.step += 1
        ema.step(network.parameters())
        run.running["loss"] = smoothed(run.running["loss"], float(accelerator.gather(loss.detach()[None]).mean()))
        after_optimizer_step(args, out, bar, run, look, save, main_process, loss=f"{run.running['loss']:.4f}")
    bar.close()
    save()
    final = out / "unet"
    report = {"step": run.step, "minutes": round(run.seconds() / 60, 2), "loss": run.running["loss"],
              "unet": str(final)}
    if main_process:
        with checkpoint.swapped_in(final) as partial:
            with_ema().save_pretrained(partial, safe_serialization=True)
        print(json.dumps(report), flush=True)
    accelerator.wait_for_everyone()
    return report


if __name__ == "__main__":
    main()
    end_processes()
