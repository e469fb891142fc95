"""DreamBooth LoRA as a command: the Personalize tab's training (pipelines/dreambooth.py) on `accelerate`.

    python training/train_dreambooth.py --instance-dir photos/ --token sks --class-word dog --steps 400 --out out/
    python training/train_dreambooth.py --world-heart --steps 400 --out out/     # the embedded model's heart test

The instance folder holds 3-5 images (.png/.jpg/.webp) of one size; an optional `captions.txt` gives one caption
per image (sorted file order), each naming the token, else every image is "a <token> <class word>". Writes
`<out>/db_<token>.safetensors` (diffusers' LoRA format: loads with `load_lora_weights` and in the studio's
'Model and LoRA') and `<out>/db_<token>.json` (the sidecar), plus `history.jsonl` with the losses.

The validation, data, adapter, step and file format are the pipeline's own functions; this script adds the
Accelerator (device, --bf16 mixed precision, backward) and the command line. --world-heart trains the
embedded-model test of the issue: a heart, a shape the world never draws (training/novel_shapes.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from diffusers import DDPMScheduler  # noqa: E402

from training.schedule import end_processes, own_accelerate_state, precision, refuse_bad_device  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# The embedded model's heart test (benchmarks/eval_embedded.py group "dreambooth" trains with these)
WORLD_TOKEN, WORLD_CLASS = "zqx", "circle"
WORLD_STEPS, WORLD_LR, WORLD_PRIOR_IMAGES = 400, 1e-3, 16


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instance-dir", help="3-5 images of the subject (and an optional captions.txt)")
    p.add_argument("--world-heart", action="store_true",
                   help="train the embedded model's heart test instead (4 world-style hearts, class 'circle')")
    p.add_argument("--token", help="the identifier: a made-up word (default sks; zqx with --world-heart)")
    p.add_argument("--class-word", help="what the subject is (dog, mug; circle with --world-heart)")
    p.add_argument("--base", default="embedded", help="SD1.x diffusers folder or Hub id (default: embedded)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, help="optimizer steps (default 400)")
    p.add_argument("--lr", type=float, help="constant learning rate, no warm-up (default 1e-4; 1e-3 world heart)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--prior", action=argparse.BooleanOptionalAction, default=True,
                   help="prior preservation with class images the frozen model makes (--no-prior: off)")
    p.add_argument("--prior-images", type=int, help="class images (default 8; 16 with --world-heart)")
    p.add_argument("--prior-weight", type=float, default=1.0)
    p.add_argument("--class-prompt", action="append", help="a class prompt (repeat for several; default "
                                                           "'a <class word>')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (accelerate places the processes)")
    p.add_argument("--bf16", action="store_true", help="accelerate's bf16 mixed precision for the UNet passes")
    p.add_argument("--log-every", type=int, default=50)
    return p


def world_heart_inputs(token: str, class_word: str, count: int = 16) -> tuple[list, list[str], list[str]]:
    """The heart test's instance images and captions, and world captions of one `class_word` each as class
    prompts (training seeds)."""
    from PIL import Image

    from training import novel_shapes, world

    instances = novel_shapes.instance_set(f"{token} {class_word}")
    prompts, seed = [], 5000
    while len(prompts) < count:
        for text, scene in world.captioned_scenes(seed, 1):
            if len(scene.objects) == 1 and scene.objects[0].shape == class_word:
                prompts.append(text)
        seed += 1
    return [Image.fromarray(a) for a, _ in instances], [c for _, c in instances], prompts


def folder_inputs(folder: Path) -> tuple[list[Path], list[str]]:
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    captions = folder / "captions.txt"
    lines = [t.strip() for t in captions.read_text().splitlines() if t.strip()] if captions.is_file() else []
    return files, lines


def main(argv=None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    refuse_bad_device(p, args.device)
    if not args.world_heart and not args.instance_dir:
        p.error("give --instance-dir (or --world-heart)")
    with own_accelerate_state():
        try:
            return train(args)
        finally:
            end_processes()


def train(args) -> dict:
    from accelerate import Accelerator

    import pipelines.dreambooth as db
    from pipelines.core.errors import InputError
    from pipelines.core.events import drain, run_to_end
    from pipelines.core.models import load_model
    from pipelines.core.peft_state import adapter_configs, peft_state_restored

    torch.set_num_threads(args.threads)
    os.environ["STUDIO_DEVICE"] = args.device
    accelerator = Accelerator(cpu=torch.device(args.device).type == "cpu",
                              mixed_precision="bf16" if args.bf16 else "no")
    heart = args.world_heart
    token = args.token or (WORLD_TOKEN if heart else "sks")
    class_word = args.class_word or (WORLD_CLASS if heart else "")
    prior_images = args.prior_images or (WORLD_PRIOR_IMAGES if heart else 8)
    if heart:
        images, captions, class_prompts = world_heart_inputs(token, class_word, prior_images)
    else:
        images, captions = folder_inputs(Path(args.instance_dir))
        class_prompts = []
    params = db.DreamBoothParams(token=token, class_word=class_word, steps=args.steps or (WORLD_STEPS if heart
                                                                                         else 400),
                                 lr=args.lr or (WORLD_LR if heart else 1e-4), rank=args.rank, prior=args.prior,
                                 prior_images=prior_images, prior_weight=args.prior_weight, seed=args.seed,
                                 instance_prompts=tuple(captions), class_prompts=tuple(args.class_prompt or
                                                                                     class_prompts),
                                 preview_every=0, out_dir=args.out)
    model = run_to_end(load_model(args.base))
    try:
        prepared, params = db.validate(model, images, params)
    except InputError as exc:
        raise SystemExit(f"error: {exc}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    history = (out / "history.jsonl").open("w")
    losses = {"instance": [], "prior": []}
    started = time.perf_counter()
    unet = model.unet
    with peft_state_restored(unet):
        if adapter_configs(unet):
            unet.disable_lora()
        data = drain(db.training_data(model, prepared, params))
        prepared_at = time.perf_counter() - started
        trainable = db.start_training(unet, params)
        optimizer = accelerator.prepare(db.optimizer_for(trainable, params))
        state = {"sched": DDPMScheduler.from_config(model.scheduler_config), "prior_weight": params.prior_weight}
        gen = torch.Generator("cpu").manual_seed(params.seed)
        for step in range(1, params.steps + 1):
            batch = db.next_batch(data, gen, model.device)
            with precision(accelerator):
                loss, inst, prior = db.training_step(model, state, batch, gen)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses["instance"].append(inst)
            losses["prior"].append(prior)
            if step % args.log_every == 0 or step == params.steps:
                row = {"step": step, "instance_loss": inst, "prior_loss": None if prior != prior else prior,
                       "seconds": round(time.perf_counter() - started, 1)}
                history.write(json.dumps(row) + "\n")
                history.flush()
                accelerator.print(f"step {step}/{params.steps}: instance {inst:.4f}"
                                  + (f", prior {prior:.4f}" if params.prior else "")
                                  + f" ({row['seconds']:.0f} s)")
        trained = db.trained_state(unet)
    history.close()
    seconds = time.perf_counter() - started
    info = db.sidecar_info(model, params, prepared, losses, seconds)
    info.update(command="training/train_dreambooth.py", class_sampling_seconds=round(prepared_at, 1),
                threads=args.threads, device=args.device, bf16=bool(args.bf16))
    path, sidecar = db.save_adapter(trained, out, params.adapter, params.rank, info)
    accelerator.print(f"wrote {path} and {sidecar.name} ({seconds:.0f} s)")
    return {"path": path, "sidecar": sidecar, "seconds": seconds, "losses": losses, "info": info}


if __name__ == "__main__":
    main()
