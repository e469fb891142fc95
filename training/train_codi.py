"""CoDi (conditional diffusion distillation, Mei et al. CVPR 2024): adapt the embedded text-to-image model to
instruction editing and distil it to 1-4 sampling steps, in one stage.

    python training/train_codi.py --base assets/model --out training/runs/codi --export assets/model/codi --minutes 60

The student is the model's text-to-image UNet plus a condition adapter: a diffusers ControlNetModel made from that
UNet (a copy of its encoder whose zero convolutions gate it in at zero, so at step 0 the student IS the base UNet).
The adapter reads the input image's VAE latent (times the scaling factor) and the instruction; the UNet reads the
instruction. `--mode pe` (PE-CoDi) trains only the adapter; `--mode full` (CoDi) trains the UNet too.

One training step (pipelines/core/consistency.py holds the shared math), for edit triplets (input, instruction,
edited) drawn from the world and timesteps t on the 50-point grid {20, ..., 980}, s = t - 20:
- z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps, with z0 the edited image's latent;
- the online student predicts eps_t; f_t = c_skip(t) z_t + c_out(t) x0(z_t, eps_t) (the consistency-model
  boundary parameterisation, identity at t = 0);
- the online student's own DDIM step (no gradient) gives z_s = sqrt(a_s) x0_t + sqrt(1 - a_s) eps_t;
- the EMA student predicts at (z_s, s): f_s, the target (no gradient);
- loss = |f_t - f_s|^2 (conditional consistency) + --reg-weight * |f_t - z0|^2 (x-space regression to the real
  target), both as latent-pixel means weighted like train_instruct.py's objects (--object-weight).
10% of instructions are dropped (empty text) so text guidance can be used when sampling.

Writes into --out: checkpoint/ (accelerate's save_state: trained networks, optimiser, LR schedule, random states,
run state, EMA), history.jsonl (held-out edits at 1 and 4 steps), codi/ (the studio's layout: controlnet/, unet/
for --mode full, codi.json; float16); --export copies codi/ there too (e.g. a studio folder's codi/).
On `accelerate` like the other trainers (--bf16, --resume, --device, `accelerate launch` for several GPUs).
"""
from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipelines.core import consistency  # noqa: E402
from training import checkpoint  # noqa: E402
from training.schedule import (  # noqa: E402
    add_data_dir,
    after_optimizer_step,
    cpu_randn,
    data_dir,
    end_processes,
    lr_schedule,
    own_accelerate_state,
    parse_run_args,
    precision,
    progress_of,
    run_parser,
    smoothed,
    start_accelerated_run,
)
from training.text_states import FrozenTextStates  # noqa: E402
from training.train_instruct import build_data, build_object_maps, kind_weights  # noqa: E402
from training.train_unet import LR_FLOOR, SCHEDULER, pixel_mean  # noqa: E402

DROP_TEXT = 0.1


def parse_args(argv=None):
    p = run_parser(__doc__, batch=16, lr=2e-4, warmup=100, checkpoint_every=250, eval_every=500)
    p.add_argument("--base", required=True, help="the studio model folder (unet, text_encoder, tokenizer, vae)")
    p.add_argument("--mode", choices=("pe", "full"), default="full",
                   help="pe: train only the adapter (PE-CoDi); full: adapter and UNet (CoDi)")
    p.add_argument("--grid", type=int, default=consistency.GRID, help="distillation grid points (ODE steps)")
    p.add_argument("--ema", type=float, default=0.99, help="decay of the EMA student (the target, and the export)")
    p.add_argument("--reg-weight", type=float, default=1.0, help="weight of the x-space regression to the target")
    p.add_argument("--object-weight", type=float, default=10.0, help="as train_instruct.py's")
    p.add_argument("--unet-lr-mult", type=float, default=0.5, help="--mode full: the UNet's rate times --lr")
    p.add_argument("--samples", type=int, default=16000, help="training edit triplets (latents cached once)")
    p.add_argument("--oversample", default="background=2", help="as train_instruct.py's")
    p.add_argument("--guidance", type=float, default=1.0, help="text guidance recorded as the sampling default")
    p.add_argument("--eval-edits", type=int, default=12, help="held-out edits per kind in the quick look")
    p.add_argument("--export", help="also write the codi/ folder here (e.g. a studio folder's codi/)")
    add_data_dir(p)
    return parse_run_args(p, argv)


class Student(torch.nn.Module):
    """UNet + adapter as one module (one `prepare`, one EMA); forward gives the noise prediction."""

    def __init__(self, unet, adapter):
        super().__init__()
        self.unet, self.adapter = unet, adapter

    def forward(self, z_t, t, text, condition):
        return consistency.student_eps(self.unet, self.adapter, z_t, t, text, condition)


def student_from(unet, mode: str) -> Student:
    """The base UNet plus a zero-gated adapter copied from its encoder; in --mode pe the UNet is frozen."""
    adapter = consistency.condition_adapter(unet)
    unet.requires_grad_(mode == "full")
    return Student(unet, adapter)


def codi_targets(student, target, z0, condition, text, t, s, alphas_cumprod, noise):
    """(f_t with gradient, f_s the EMA target) of one CoDi step; t, s one timestep per sample."""
    a_t, a_s = alphas_cumprod[t], alphas_cumprod[s]
    z_t = consistency.renoise(z0, noise, a_t)
    eps_t = student(z_t, t, text, condition).float()
    f_t = consistency.consistency_x0(z_t, eps_t, t, alphas_cumprod)
    with torch.no_grad():
        # the ODE step of the online model itself (the paper's self-ODE), deterministic DDIM
        z_s = consistency.renoise(consistency.predicted_x0(z_t, eps_t.detach(), a_t), eps_t.detach(), a_s)
        f_s = consistency.consistency_x0(z_s, target(z_s, s, text, condition).float(), s, alphas_cumprod)
    return f_t, f_s


def export_folder(folder: Path, student: Student, mode: str, info: dict) -> None:
    """The studio layout (see pipelines/codi.py): controlnet/, unet/ (full mode), codi.json; float16."""
    adapter = copy.deepcopy(student.adapter).to("cpu", torch.float16)
    adapter.save_pretrained(folder / "controlnet", safe_serialization=True)
    if mode == "full":
        copy.deepcopy(student.unet).to("cpu", torch.float16).save_pretrained(folder / "unet", safe_serialization=True)
    (folder / "codi.json").write_text(json.dumps(info, indent=1))


def main(argv=None) -> dict:
    args = parse_args(argv)
    with own_accelerate_state():
        return _train(args)


def _train(args) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextModel, CLIPTokenizer

    accelerator, out, rng = start_accelerated_run(args)
    device, main_process = accelerator.device, accelerator.is_main_process
    base = Path(args.base)
    vae = AutoencoderKL.from_pretrained(base / "vae").float().eval().requires_grad_(False).to(device)
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    with accelerator.main_process_first():
        data = build_data(data_dir(args), vae, tokenizer, args.samples, args.seed,
                          not args.no_progress and main_process)
        maps = build_object_maps(data_dir(args), args.samples, args.seed, data["target"].shape[-1]) \
            if args.object_weight else None
    from training.train_instruct import _triplet_stream

    draw_p = kind_weights([edit.kind for _, edit in _triplet_stream(args.samples, args.seed)], args.oversample)
    # the condition as the adapter reads it: the input latent at the UNet's scale
    source, target_z = data["source"].float() * vae.config.scaling_factor, data["target"]
    ids_all = data["ids"].long()
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder").float().eval().requires_grad_(False)
    text_encoder.to(device)
    empty = tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    encode = FrozenTextStates(text_encoder, torch.cat([ids_all, empty]), device)
    empty_emb = encode(empty)

    student = student_from(UNet2DConditionModel.from_pretrained(base / "unet").float(), args.mode)
    groups = [{"params": list(student.adapter.parameters())}]
    if args.mode == "full":
        groups.append({"params": list(student.unet.parameters()), "lr": args.lr * args.unet_lr_mult})
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.01)
    # the EMA student: the consistency target and what is exported (never prepared: float32 whatever --bf16 says)
    target = copy.deepcopy(student).requires_grad_(False).to(device).eval()
    run = checkpoint.RunState(rng, accelerator.process_index)
    run.running = {"loss": None, "consistency": None, "regression": None}
    student, opt, lr = accelerator.prepare(student, opt, lr_schedule(opt, args, LR_FLOOR, run))
    network = accelerator.unwrap_model(student)
    trainable = [p for p in network.parameters() if p.requires_grad]
    ema = EMAModel(trainable, decay=args.ema, foreach=True)
    accelerator.register_for_checkpointing(run, ema)
    if args.resume:
        checkpoint.load_state(accelerator, out)
        ema.to(device)
    target_trainable = [p for p, q in zip(target.parameters(), network.parameters()) if q.requires_grad]
    ema.copy_to(target_trainable)
    alphas_cumprod = DDIMScheduler(**SCHEDULER).alphas_cumprod.float().to(device)
    stride = 1000 // args.grid
    info = {"grid": args.grid, "sigma_data": consistency.SIGMA_DATA, "timestep_scaling": consistency.TIMESTEP_SCALING,
            "guidance": args.guidance, "default_steps": 4, "mode": args.mode,
            "condition": "input image latent (posterior mean) x the VAE scaling factor",
            "trained": {"command": "training/train_codi.py", "steps": None, "batch": args.batch, "lr": args.lr,
                        "ema": args.ema, "reg_weight": args.reg_weight, "samples": args.samples}}

    def look():
        from training.evaluation import codi_edit_accuracy

        row = {"loss": round(run.running["loss"], 4)}
        for steps in (1, 4):
            for kind in ("recolour", "background"):
                acc = codi_edit_accuracy(target.unet, target.adapter, text_encoder, tokenizer, vae, kind,
                                         count=args.eval_edits, steps=steps, guidance=args.guidance)
                row[f"{kind}{steps}_success"] = round(acc["success"], 3)
                row[f"{kind}{steps}_psnr"] = round(acc["psnr_outside"], 2)
        return row

    def save():
        checkpoint.save_state(accelerator, out, checkpoint.summary(run, args, opt, ["student"], ema=["student"]))

    student.train()
    bar = tqdm(total=args.steps, initial=run.step, disable=args.no_progress or not main_process, dynamic_ncols=True)
    run.begin()
    while progress_of(args, run.step, run.seconds()) < 1.0:
        idx = torch.from_numpy(rng.integers(0, len(target_z), args.batch) if draw_p is None else
                               rng.choice(len(target_z), args.batch, p=draw_p))
        z0, condition = target_z[idx].float().to(device), source[idx].to(device)
        text = encode(ids_all[idx])
        drop = torch.from_numpy(rng.random(args.batch) < DROP_TEXT).to(device)
        text = torch.where(drop[:, None, None], empty_emb.expand_as(text), text)
        k = torch.from_numpy(rng.integers(1, args.grid, args.batch)).to(device)
        t, s = k * stride, (k - 1) * stride
        noise = cpu_randn(z0)
        with precision(accelerator):
            f_t, f_s = codi_targets(student, target, z0, condition, text, t, s, alphas_cumprod, noise)
        weight = None if maps is None else (1 + args.object_weight * maps[idx].float()).to(device)
        consistency_loss = pixel_mean((f_t - f_s).pow(2), weight).mean()
        regression = pixel_mean((f_t - z0).pow(2), weight).mean()
        loss = consistency_loss + args.reg_weight * regression
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(trainable, 1.0)
        opt.step()
        lr.step()
        run.step += 1
        ema.step(trainable)
        ema.copy_to(target_trainable)
        for name, value in (("loss", loss), ("consistency", consistency_loss), ("regression", regression)):
            run.running[name] = smoothed(run.running[name], float(accelerator.gather(value.detach()[None]).mean()))
        after_optimizer_step(args, out, bar, run, look, save, main_process, loss=f"{run.running['loss']:.4f}",
                             cons=f"{run.running['consistency']:.4f}")
    bar.close()
    save()
    info["trained"] |= {"steps": run.step, "minutes": round(run.seconds() / 60, 2)}
    report = {"step": run.step, "minutes": round(run.seconds() / 60, 2), "loss": run.running["loss"],
              "codi": str(out / "codi")}
    if main_process:
        with checkpoint.swapped_in(out / "codi") as partial:
            export_folder(partial, target, args.mode, info)
        if args.export:
            with checkpoint.swapped_in(Path(args.export)) as partial:
                shutil.copytree(out / "codi", partial, dirs_exist_ok=True)
        print(json.dumps(report), flush=True)
    accelerator.wait_for_everyone()
    return report


if __name__ == "__main__":
    main()
    end_processes()
