"""Train the embedded model's 9-channel inpainting UNet on world scenes with synthetic masks.

    python training/train_inpaint.py --base assets/model --out training/runs/inpaint --minutes 50 --bf16 \\
        --export training/runs/inpaint/unet_inpaint

Recipe (SD-inpainting's, scaled down; /work/shared/research/dreambooth_inpainting.md §1.2, §1.7): the UNet starts
as the base text-to-image UNet with 5 extra input channels whose weights are zero (pipelines/core/unet_inputs.py
widened_unet: step 0 computes exactly what the base does), in Stable Diffusion's order [noisy latent 4 | mask 1 |
masked-image latent 4] (pipelines/core/inpaint_inputs.py: the hole is the latent cells any painted pixel touches,
the masked image is blanked to 0 in [-1, 1] over them and encoded as the VAE's posterior mean times its scaling
factor). The text encoder and VAE stay frozen.

Data: training-seed scenes, each with one mask from training/inpaint_masks.py's mixture (25 % full, 25 % around an
object, 15 % grid cells, 20 % boxes, 15 % strokes) and its own caption. A mask around an object hides it completely,
so to the model it is an insert or a replacement (recolour, reshape) that the caption describes. --remove-share of
the samples are the world's remove edit: the mask is drawn around the removed object, the masked image is the input
scene's, the target and caption are the scene without it. Gray backgrounds (RGB 128 is the hole's fill, so there
only the mask channel tells the hole) are drawn --gray-factor times as often. The clean latent, masked-image latent,
hole cells and caption ids are encoded once into a cache (--data-dir).

Loss: epsilon MSE over the whole latent (the base model's 1/SNR weight clip and high-t share), hole cells weighted
1 + --hole-weight; 10 % empty captions (the mask and masked image stay) for classifier-free guidance. conv_in learns
--input-lr-mult times faster (the zeroed inputs stall otherwise, as train_instruct.py found). Cosine schedule to
10 % (training/schedule.lr_schedule), EMA weights for the quick looks and the export.

Writes into --out: checkpoint/ (accelerate's save_state folder, for --resume), history.jsonl (quick looks: held-out
insert / recolour / remove success read by the world checker inside the mask, PSNR outside it before any paste-back;
DDIM, --eval-steps steps), data/ (the cache), and the EMA UNet as a float16 diffusers folder at --export (default
<out>/unet_inpaint) with inpaint.json beside its config (what it was trained with, its last quick look). A studio
model folder takes it as unet_inpaint/.
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

from pipelines.core.inpaint_inputs import hole_cells, unet_input  # noqa: E402
from pipelines.core.unet_inputs import widened_unet  # noqa: E402
from training import checkpoint, evaluation, inpaint_masks, world  # noqa: E402
from training.schedule import (  # noqa: E402
    add_data_dir,
    after_optimizer_step,
    cache_source,
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
from training.train_unet import LR_FLOOR, SCHEDULER, noised, pixel_mean, weighted_mean  # noqa: E402

IN_CHANNELS = 9
CASES = (*inpaint_masks.KINDS, "remove")  # what each cached sample is: its mask kind, or a removal pair
CAPTION_DROP = 0.1
SUBFOLDER = "unet_inpaint"


def parse_args(argv=None) -> argparse.Namespace:
    p = run_parser(__doc__, batch=16, lr=3e-4, warmup=100, checkpoint_every=200, eval_every=500)
    p.add_argument("--base", required=True, help="the studio model folder (unet, text_encoder, tokenizer, vae)")
    p.add_argument("--init-unet", help="UNet folder to start from (default: the base's unet/ widened to 9 inputs); "
                   "a 9-channel one is continued as it is")
    p.add_argument("--export", help=f"folder for the finished UNet (default: <out>/{SUBFOLDER})")
    p.add_argument("--samples", type=int, default=12000, help="cached (scene, mask) samples")
    add_data_dir(p)
    p.add_argument("--remove-share", type=float, default=0.2,
                   help="share of the samples that are the world's remove edit (mask around the removed object)")
    p.add_argument("--gray-factor", type=float, default=2.0,
                   help="draw samples on gray backgrounds (the hole's own fill) this many times as often")
    p.add_argument("--hole-weight", type=float, default=3.0,
                   help="extra loss weight on the hole's latent cells (0: every latent pixel counts the same)")
    p.add_argument("--input-lr-mult", type=float, default=3.0,
                   help="learning-rate multiple for conv_in, whose mask and masked-image inputs start at zero")
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--max-weight", type=float, default=5.0, help="1/SNR loss weight clip, as in train_unet.py")
    p.add_argument("--high-t-share", type=float, default=0.5, help="as in train_unet.py")
    p.add_argument("--eval-count", type=int, default=12, help="held-out cases per kind in a quick look (0: none)")
    p.add_argument("--eval-steps", type=int, default=20, help="DDIM steps of the quick look")
    p.add_argument("--eval-guidance", type=float, default=3.0,
                   help="text guidance of the quick look (the 5000-step run on 24 cases per kind: at 3, insert / "
                        "recolour / remove 0.83 / 0.83 / 0.75 with 22.9 / 25.5 / 27.1 dB outside; at 7.5, 0.75 / "
                        "0.67 / 0.67 with 20.0 / 22.1 / 24.3 dB)")
    p.add_argument("--data-only", action="store_true", help="only build the cache")
    return parse_run_args(p, argv, unless="data_only")


def inpaint_unet_from(base_unet):
    """The base UNet with 9 input channels; the 5 new ones start at zero weight (a 9-channel UNet is returned as it
    is)."""
    return widened_unet(base_unet, IN_CHANNELS)


def _caption(scene: world.Scene, rng: np.random.Generator) -> str | None:
    """A training caption of the scene (never a held-out prompt), or None if ten draws were all held out."""
    for _ in range(10):
        text = world.caption(scene, rng)
        if not world.is_held_out_prompt(text):
            return text
    return None


def sample_stream(count: int, seed: int, remove_share: float, size: int = 64):
    """(input image, target scene, mask, caption, case) of the cached samples, in cache order, from training seeds.
    The input image is the target's render, except for removal pairs (the scene still holding the object: under
    the mask the two agree pixel for pixel, the mask covering every pixel the object touches)."""
    rng = np.random.default_rng(seed + 9009)
    made = 0
    while made < count:
        scene = world.sample_scene(int(rng.integers(0, world.HELD_OUT_SEED - 1000)), size)
        if scene.objects and rng.random() < remove_share:
            edit = world.make_edit(scene, rng, "remove")
            mask = inpaint_masks.object_mask_around(rng, scene, edit.index)
            source, target, case = world.render(scene), edit.scene, "remove"
        else:
            mask, case, _ = inpaint_masks.sample_mask(rng, scene)
            source, target = world.render(scene), scene
        text = _caption(target, rng)
        if text is None:
            continue
        made += 1
        yield source, target, mask, text, case


def build_data(folder: Path, vae, tokenizer, count: int, seed: int, remove_share: float, progress: bool) -> dict:
    """The cache: scaled target latents, masked-image latents (evaluation.masked_latents), hole cells (uint8), caption
    ids, each sample's case (index in CASES) and whether its background is gray. On the CPU."""
    path = folder / "inpaint.safetensors"
    source = f"{cache_source(vae, tokenizer)}-remove{remove_share:g}"
    cached = load_cache(path, "target", count, seed, source)
    if cached is not None:
        return cached
    f = evaluation.vae_factor(vae)
    stream = sample_stream(count, seed, remove_share)
    parts = {k: [] for k in ("target", "masked", "cells", "ids", "case", "gray")}
    bar = tqdm(total=count, desc="encoding inpainting samples", disable=not progress)
    done = 0
    while done < count:
        sources, targets, cells, texts = [], [], [], []
        for image, scene, mask, text, case in (next(stream) for _ in range(min(64, count - done))):
            sources.append(image), targets.append(world.render(scene)), cells.append(hole_cells(mask, f))
            texts.append(text)
            parts["case"].append(CASES.index(case))
            parts["gray"].append("gray" in scene.background.colours)
        cells = np.stack(cells)
        parts["target"].append(evaluation.encode(vae, np.stack(targets)).half().cpu())
        parts["masked"].append(evaluation.masked_latents(vae, np.stack(sources), cells).half().cpu())
        parts["cells"].append(torch.from_numpy(cells.astype(np.uint8)))
        parts["ids"].append(tokenizer(texts, padding="max_length", max_length=77, truncation=True,
                                      return_tensors="pt").input_ids.int())
        done += len(texts)
        bar.update(len(texts))
    bar.close()
    data = {k: torch.cat(parts[k]).contiguous() for k in ("target", "masked", "cells", "ids")}
    data["case"] = torch.tensor(parts["case"], dtype=torch.uint8)
    data["gray"] = torch.tensor(parts["gray"], dtype=torch.uint8)
    save_cache(path, data, seed, source)
    return data


def draw_weights(gray: torch.Tensor, factor: float) -> np.ndarray | None:
    """Per-sample draw probability: gray-background samples `factor` times the others (None at 1: uniform)."""
    if factor == 1.0:
        return None
    if factor <= 0:
        raise ValueError("--gray-factor must be positive")
    w = np.where(gray.numpy().astype(bool), factor, 1.0)
    return w / w.sum()


def quick_eval(args, unet, text_encoder, tokenizer, vae) -> dict:
    unet.eval()
    row = {}
    for kind in evaluation.INPAINT_KINDS:
        acc = evaluation.inpaint_accuracy(unet, text_encoder, tokenizer, vae, kind, count=args.eval_count,
                                          steps=args.eval_steps, guidance=args.eval_guidance)
        row[f"{kind}_success"] = round(acc["success"], 3)
        row[f"{kind}_psnr_outside"] = round(acc["psnr_outside"], 2)
    return row


def export(unet, folder: Path, record: dict) -> None:
    """The UNet as a float16 diffusers folder at `folder` (written beside and swapped in), with inpaint.json."""
    with checkpoint.swapped_in(folder) as partial:
        copy.deepcopy(unet).to(torch.float16).save_pretrained(partial, safe_serialization=True)
        (partial / "inpaint.json").write_text(json.dumps(record, indent=1))


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
    vae = AutoencoderKL.from_pretrained(base / "vae").float().eval().requires_grad_(False).to(device)
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    with accelerator.main_process_first():  # the main process writes the cache, the others read it
        data = build_data(data_dir(args), vae, tokenizer, args.samples, args.seed, args.remove_share,
                          not args.no_progress and main_process)
    if args.data_only:
        return {"samples": len(data["target"])}
    target, masked, cells_all, ids_all = data["target"], data["masked"], data["cells"], data["ids"].long()
    draw_p = draw_weights(data["gray"], args.gray_factor)
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder").float().eval().requires_grad_(False)
    text_encoder.to(device)
    unet = inpaint_unet_from(UNet2DConditionModel.from_pretrained(args.init_unet or base / "unet").float())
    empty = tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    encode = FrozenTextStates(text_encoder, torch.cat([ids_all, empty]), device)  # each caption encoded once
    empty_row = empty[0]

    first = [unet.conv_in.weight, unet.conv_in.bias]  # the mask and masked image come in only here, from zero
    rest = [p for n, p in unet.named_parameters() if not n.startswith("conv_in.")]
    opt = torch.optim.AdamW([{"params": rest}, {"params": first, "lr": args.lr * args.input_lr_mult}],
                            lr=args.lr, weight_decay=0.01)
    # what the quick looks sample with and the export saves: a copy receiving the EMA weights (never prepared: float32)
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
        checkpoint.save_state(accelerator, out, checkpoint.summary(run, args, opt, ["unet_inpaint"],
                                                                   ema=["unet_inpaint"]))

    last = {}

    def look():
        row = {"loss": round(run.running["loss"], 4)}
        if args.eval_count:
            row.update(quick_eval(args, with_ema(), text_encoder, tokenizer, vae))
        last.clear(), last.update(row, step=run.step)
        return row

    unet.train()
    bar = tqdm(total=args.steps, initial=run.step, disable=args.no_progress or not main_process, dynamic_ncols=True)
    run.begin()
    while progress_of(args, run.step, run.seconds()) < 1.0:
        idx = torch.from_numpy(rng.integers(0, len(target), args.batch) if draw_p is None else
                               rng.choice(len(target), args.batch, p=draw_p))
        ids = ids_all[idx].clone()
        ids[torch.from_numpy(rng.random(args.batch) < CAPTION_DROP)] = empty_row
        z0, image = target[idx].float().to(device), masked[idx].float().to(device)
        hole = cells_all[idx].float().to(device)[:, None]
        zt, t, noise = noised(z0, alphas_cumprod, args.high_t_share)
        with precision(accelerator):
            pred = unet(unet_input(zt, hole, image), t, encoder_hidden_states=encode(ids)).sample.float()
        per_sample = pixel_mean((pred - noise).pow(2), 1 + args.hole_weight * hole[:, 0])
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
    final = Path(args.export) if args.export else out / SUBFOLDER
    report = {"step": run.step, "minutes": round(run.seconds() / 60, 2), "loss": run.running["loss"],
              "unet_inpaint": str(final)}
    if main_process:
        if last.get("step") != run.step:  # the finished weights' own quick look
            row = {"step": run.step, "minutes": report["minutes"], **look()}
            with (out / "history.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
        report["quick_look"] = {k: v for k, v in last.items() if k != "step"}
        record = {"trainer": "training/train_inpaint.py", "inputs": "noisy latent 4 | mask 1 | masked-image latent 4",
                  "mask_rule": "latent cells any painted pixel touches; masked image 0 in [-1, 1] there",
                  "base": str(args.base), "steps": run.step, "minutes": report["minutes"], "batch": args.batch,
                  "lr": args.lr, "input_lr_mult": args.input_lr_mult, "hole_weight": args.hole_weight,
                  "samples": args.samples, "remove_share": args.remove_share, "gray_factor": args.gray_factor,
                  "caption_drop": CAPTION_DROP, "ema": args.ema, "bf16": bool(args.bf16),
                  "mask_mixture": dict(zip(inpaint_masks.KINDS, inpaint_masks.SHARES)),
                  "quick_look": {"guidance": args.eval_guidance, "steps": args.eval_steps,
                                 "cases_per_kind": args.eval_count, **report["quick_look"]}}
        export(with_ema(), final, record)
        print(json.dumps(report), flush=True)
    accelerator.wait_for_everyone()
    return report


if __name__ == "__main__":
    main()
    end_processes()
