#!/usr/bin/env python
"""GPU suite: the studio's GPU targets measured in one command on an SD1.5-architecture model with random weights.

    python benchmarks/gpu_suite.py                      # CUDA: 512x512, writes benchmarks/results/gpu_suite.json
    python benchmarks/gpu_suite.py --out run.json       # anywhere else
    python benchmarks/gpu_suite.py --tiny               # the same code on a tiny model on the CPU (< 1 min)

The model is built from SD1.5's configs (UNet 320/640/1280/1280 with cross-attention 768, the KL-f8 VAE, a
12-layer CLIP-L-sized text encoder, an 8-channel InstructPix2Pix UNet beside it) with random weights, saved as a
diffusers folder in a temporary directory (fp16 on CUDA) and loaded by the studio's own `load_model`, so every
figure goes through the studio's real loading and pipeline code. No weights are downloaded.

Figures, each measured by its own function (a failure is recorded as that figure's error; the others still run):
  t2i_step          seconds per DDIM step, text-to-image at CFG 7.5: our `generate` (previews off) against
                    diffusers' StableDiffusionPipeline on the same components and scheduler, and the ratio
  preview_overhead  our `generate` with a live preview every step against previews off: seconds per step, ratio
  nti               fast null-text inversion (method "nti") of one image: seconds, reconstruction PSNR (random
                    weights: the PSNR is recorded, not judged)
  drag              DragDiffusion with its per-image LoRA: seconds per stage and the CUDA peak memory
  instruct          InstructPix2Pix, our `instruct_edit` (previews off) against diffusers' pipeline: seconds per
                    step, ratio
  smooth_lora_step  one Smooth LoRA optimiser step of training/train_smooth_lora.py (its `main`, on a two-image
                    folder): seconds per step

Step times are (last step - first step) / (steps - 1) between device-synchronised timestamps, so prompt encoding
and VAE decoding stay outside them; ours and diffusers' run in alternating order after a warm-up, and a ratio
is the median of one side's step times over the median of the other's. A time budget (7.5 min by default)
skips the figures left once it has run out; they are recorded as skipped.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub: never download
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_suite.json"
BUDGET_S = 450.0  # 7.5 min: leaves room for the model build and the JSON inside the 8-minute target
PROMPT = "a photo of a blue circle on a plain background"
INSTRUCTION = "make the circle red"
GUIDANCE = 7.5
IMAGE_GUIDANCE = 1.5
SEED = 1234
FIGURES = ("t2i_step", "preview_overhead", "nti", "drag", "instruct", "smooth_lora_step")


@dataclass(frozen=True)
class Plan:
    """How much each figure runs."""

    name: str
    t2i_steps: int         # DDIM steps per text-to-image run (figures 1 and 2)
    rounds: int            # timed rounds per variant, after one warm-up round
    nti_steps: int
    drag_lora_steps: int
    drag_iterations: int
    drag_steps: int        # the drag's DDIM schedule (0.7 of it is inverted and denoised)
    instruct_steps: int
    train_steps: int       # timed Smooth LoRA steps, after one warm-up step
    train_batch: int


FULL = Plan("full", t2i_steps=20, rounds=3, nti_steps=50, drag_lora_steps=40, drag_iterations=40, drag_steps=50,
            instruct_steps=20, train_steps=5, train_batch=1)
TINY = Plan("tiny", t2i_steps=3, rounds=1, nti_steps=3, drag_lora_steps=2, drag_iterations=2, drag_steps=4,
            instruct_steps=3, train_steps=2, train_batch=1)

# SD1.5's architecture (v1-inference.yaml as diffusers writes it); the text encoder is CLIP ViT-L/14's.
SD15_SPEC = {
    "unet": {
        "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
    },
    "vae": {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 512, "scaling_factor": 0.18215,
    },
    "text": {
        "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "projection_dim": 768, "hidden_act": "quick_gelu",
    },
}
# The tiny test model's sizes (pipelines/core/tiny_model.py): 64x64 images, a few ms per UNet call on a CPU.
TINY_SPEC = {
    "unet": {
        "sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32, "attention_head_dim": 8, "norm_num_groups": 8,
    },
    "vae": {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3, "block_out_channels": (16, 32, 32), "layers_per_block": 1,
        "norm_num_groups": 8, "sample_size": 64, "scaling_factor": 0.18215,
    },
    "text": {
        "vocab_size": None, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "projection_dim": 32,
    },
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------- the model

@contextmanager
def quiet_loading():
    """No progress bars or dtype notes from diffusers / transformers while the model is built and loaded (the
    table is the output); their settings are restored afterwards."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    verbosity = dlog.get_verbosity(), tlog.get_verbosity()
    bars = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(verbosity[0])
        tlog.set_verbosity(verbosity[1])
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()


def build_model_folder(spec: dict, folder: Path, dtype: torch.dtype, seed: int = 0) -> Path:
    """Writes a diffusers folder with random weights from `spec`, plus `unet_instruct/` (8 input channels) and
    studio_model.json, as the studio's loader expects. Built in fp32 on the CPU, saved in `dtype`."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder.parent / "tokenizer_src")
    torch.manual_seed(seed)
    text = dict(spec["text"], vocab_size=spec["text"]["vocab_size"] or len(tokenizer))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **text))
    unet = UNet2DConditionModel(**spec["unet"])
    instruct = instruct_unet_from(unet)
    with torch.no_grad():  # a small output layer keeps random DDIM trajectories tame (as the tiny model does)
        for net in (unet, instruct):
            net.conv_out.weight.mul_(0.3)
            net.conv_out.bias.mul_(0.3)
    scheduler = DDIMScheduler(  # SD1.5's schedule
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**spec["vae"]), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(dtype=dtype)
    pipe.save_pretrained(folder, safe_serialization=True)
    instruct.to(dtype).save_pretrained(folder / "unet_instruct", safe_serialization=True)
    (folder / "studio_model.json").write_text(json.dumps(
        {"label": "SD1.5-architecture model (random weights, GPU suite)", "random_weights": True}))
    return folder


def build_tokenizer(folder: Path):
    """A CLIP BPE tokenizer built offline the way the tiny model builds its own (pipelines/core/tiny_model.py)."""
    from transformers import CLIPTokenizer

    from pipelines.core.tiny_model import build_tokenizer_files

    build_tokenizer_files(folder)
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tokenizer.model_max_length = 77
    return tokenizer


def instruct_unet_from(unet):
    """The InstructPix2Pix variant: the same UNet with 4 more input channels for the image latent."""
    from diffusers import UNet2DConditionModel

    instruct = UNet2DConditionModel.from_config({**unet.config, "in_channels": 2 * unet.config.in_channels})
    state = unet.state_dict()
    w = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([w, 0.5 * torch.randn_like(w)], 1)
    instruct.load_state_dict(state)
    return instruct


def load_studio_model(folder: Path, device: torch.device, dtype: torch.dtype):
    from pipelines.core.events import run_to_end
    from pipelines.core.models import load_model

    return run_to_end(load_model(str(folder), device=device, dtype=dtype))


def sample_image(size: int) -> tuple[Image.Image, tuple[float, float]]:
    """A smooth gradient with a blue disc (no file needed); returns the image and the disc's centre."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rgb = np.stack([0.6 + 0.3 * xx, 0.6 + 0.2 * yy, 0.5 + 0.1 * xx * yy], -1) * 255
    centre = (0.4 * size, 0.5 * size)
    disc = (xx * size - centre[0]) ** 2 + (yy * size - centre[1]) ** 2 <= (0.12 * size) ** 2
    rgb[disc] = (40, 70, 210)
    return Image.fromarray(rgb.astype(np.uint8)), centre


@dataclass
class Bench:
    """What every figure needs: the loaded studio model, its folder, the plan and a scratch directory."""

    model: object
    folder: Path
    plan: Plan
    workdir: Path

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def size(self) -> int:
        return self.model.resolution


# --------------------------------------------------------------------------------------------- timing helpers

def job_step_time(job, stage: str, steps: int, device: torch.device):
    """Runs a studio job to its end; returns (result, seconds per step). Only the first and last `stage` events
    synchronise the device, so the steps between stay as asynchronous as in the studio."""
    if steps < 2:
        raise ValueError("a step time needs at least 2 steps")
    marks, seen, result = {}, 0, None
    for ev in job:
        if ev.stage == stage:
            seen += 1
            if seen in (1, steps):
                sync(device)
                marks[seen] = time.perf_counter()
        if ev.result is not None:
            result = ev.result
    if seen != steps:
        raise RuntimeError(f"expected {steps} {stage!r} events, got {seen}")
    return result, (marks[steps] - marks[1]) / (steps - 1)


def step_clock(device: torch.device, steps: int):
    """A diffusers callback_on_step_end that stamps the first and last step (synchronised); returns
    (callback, seconds_per_step)."""
    marks: dict[int, float] = {}

    def on_step_end(_pipe, i, _t, _kwargs):
        if i in (0, steps - 1):
            sync(device)
            marks[i] = time.perf_counter()
        return {}

    return on_step_end, lambda: (marks[steps - 1] - marks[0]) / (steps - 1)


def paired_rounds(variants: dict, rounds: int) -> dict[str, list[float]]:
    """One warm-up call of each variant, then `rounds` rounds with the order reversed every round, so slow
    drifts of the machine hit both sides alike."""
    for fn in variants.values():
        fn()
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            times[k].append(variants[k]())
    return times


def compare(times: dict[str, list[float]], a: str, b: str) -> dict:
    """Medians of both sides and their ratio a / b (computed from exactly the reported medians)."""
    ma, mb = statistics.median(times[a]), statistics.median(times[b])
    return {f"{a}_s_per_step": ma, f"{b}_s_per_step": mb, "ratio": ma / mb, "rounds_s_per_step": times}


# --------------------------------------------------------------------------------------------- figures

def measure_t2i_step(b: Bench) -> dict:
    """Figure 1: seconds per DDIM step, ours (previews off) vs diffusers' StableDiffusionPipeline."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from pipelines.core.stream import PreviewOptions
    from pipelines.generate import GenerateParams, generate

    m, steps = b.model, b.plan.t2i_steps
    pipe = StableDiffusionPipeline(
        vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
        scheduler=DDIMScheduler.from_config(m.scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    params = GenerateParams(PROMPT, seed=SEED, steps=steps, guidance=GUIDANCE, width=b.size, height=b.size)

    def ours():
        return job_step_time(generate(m, params, preview=PreviewOptions(every=0)), "sampling", steps, b.device)[1]

    def theirs():
        callback, per_step = step_clock(b.device, steps)
        # latents out: its VAE decode is outside the step loop compared here (and the fp32 VAE needs no cast)
        pipe(PROMPT, negative_prompt="", num_inference_steps=steps, guidance_scale=GUIDANCE, eta=0.0,
             height=b.size, width=b.size, generator=torch.Generator("cpu").manual_seed(SEED),
             output_type="latent", callback_on_step_end=callback)
        return per_step()

    with torch.inference_mode():
        times = paired_rounds({"ours": ours, "diffusers": theirs}, b.plan.rounds)
    return {"steps": steps, "size": b.size, "guidance": GUIDANCE, **compare(times, "ours", "diffusers")}


def measure_preview_overhead(b: Bench) -> dict:
    """Figure 2: our generate with a live preview every step against previews off (ratio on / off)."""
    from pipelines.core.stream import PreviewOptions
    from pipelines.generate import GenerateParams, generate

    steps = b.plan.t2i_steps
    params = GenerateParams(PROMPT, seed=SEED, steps=steps, guidance=GUIDANCE, width=b.size, height=b.size)

    def variant(every: int):
        return lambda: job_step_time(generate(b.model, params, preview=PreviewOptions(every=every)), "sampling",
                                     steps, b.device)[1]

    with torch.inference_mode():
        times = paired_rounds({"on": variant(1), "off": variant(0)}, b.plan.rounds)
    return {"steps": steps, "size": b.size, **compare(times, "on", "off")}


def measure_nti(b: Bench) -> dict:
    """Figure 3: fast null-text inversion of one image, end to end (encode, pivot, fit, decode)."""
    from pipelines.core.events import run_to_end
    from pipelines.inversion import InversionParams, invert_and_reconstruct

    image, _ = sample_image(b.size)
    p = InversionParams(prompt=PROMPT, steps=b.plan.nti_steps, guidance=GUIDANCE, method="nti")
    sync(b.device)
    t0 = time.perf_counter()
    res = run_to_end(invert_and_reconstruct(b.model, image, p))
    sync(b.device)
    seconds = time.perf_counter() - t0
    metrics = res.metrics
    return {"method": "nti", "steps": p.steps, "guidance": GUIDANCE, "size": b.size, "seconds": seconds,
            "psnr": metrics["psnr"], "psnr_vs_vae": metrics["psnr_vs_vae"], "vae_psnr": metrics["vae_psnr"],
            "unet_forward": metrics.get("unet_forward"), "unet_forward_backward": metrics.get("unet_forward_backward")}


def measure_drag(b: Bench) -> dict:
    """Figure 4: one cold drag (per-image LoRA, inversion, latent optimisation, denoising) and its peak memory."""
    from pipelines.core.events import run_to_end
    from pipelines.drag import DragParams, drag

    image, (cx, cy) = sample_image(b.size)
    p = DragParams([(cx, cy)], [(cx + 0.1 * b.size, cy)], PROMPT, lora_steps=b.plan.drag_lora_steps,
                   drag_iterations=b.plan.drag_iterations, steps=b.plan.drag_steps)
    on_cuda = b.device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(b.device)
        start = torch.cuda.memory_allocated(b.device)
    sync(b.device)
    t0 = time.perf_counter()
    res = run_to_end(drag(b.model, image, p))
    sync(b.device)
    total = time.perf_counter() - t0
    out = {"lora_steps": p.lora_steps, "drag_iterations": p.drag_iterations, "steps": p.steps,
           "inversion_strength": p.inversion_strength, "size": b.size,
           **{f"{k}_s": float(v) for k, v in res.timings.items()}, "total_s": total,
           "iterations_run": res.params["iterations_run"], "peak_gib": None, "peak_over_start_gib": None}
    if on_cuda:
        peak = torch.cuda.max_memory_allocated(b.device)
        out.update(peak_gib=peak / 2**30, peak_over_start_gib=(peak - start) / 2**30)
    return out


def measure_instruct(b: Bench) -> dict:
    """Figure 5: InstructPix2Pix seconds per step, our instruct_edit (previews off) vs diffusers' pipeline."""
    from diffusers import (
        EulerAncestralDiscreteScheduler,
        StableDiffusionInstructPix2PixPipeline,
    )

    from pipelines.core.latents import encode_image
    from pipelines.core.stream import PreviewOptions
    from pipelines.instruct import InstructParams, instruct_edit, prepare_input

    m, steps = b.model, b.plan.instruct_steps
    unet = m.instruct_unet()
    if unet is None:
        raise RuntimeError("the model folder has no unet_instruct/")
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=unet,
        scheduler=EulerAncestralDiscreteScheduler.from_config(m.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    source = prepare_input(m, sample_image(b.size)[0])
    # diffusers takes a 4-channel input as the image latent itself: the studio's fp32 VAE under an fp16 UNet
    # then needs no cast, and the encode is outside the step loop compared here anyway
    image_latent = encode_image(m, source, scaled=False)
    params = InstructParams(INSTRUCTION, text_guidance=GUIDANCE, image_guidance=IMAGE_GUIDANCE, steps=steps,
                            seed=SEED, scheduler="euler_a")

    def ours():
        return job_step_time(instruct_edit(m, source, params, preview=PreviewOptions(every=0)), "editing", steps,
                             b.device)[1]

    def theirs():
        callback, per_step = step_clock(b.device, steps)
        pipe(INSTRUCTION, image=image_latent, num_inference_steps=steps, guidance_scale=GUIDANCE,
             image_guidance_scale=IMAGE_GUIDANCE, generator=torch.Generator("cpu").manual_seed(SEED),
             output_type="latent", callback_on_step_end=callback)
        return per_step()

    with torch.inference_mode():
        times = paired_rounds({"ours": ours, "diffusers": theirs}, b.plan.rounds)
    return {"steps": steps, "size": f"{source.width}x{source.height}", "scheduler": "euler_a",
            **compare(times, "ours", "diffusers")}


def measure_smooth_lora_step(b: Bench) -> dict:
    """Figure 6: Smooth LoRA optimiser steps of training/train_smooth_lora.py's `main` on a two-image folder.
    A global optimiser-step hook stamps each step's end; the first step is the warm-up."""
    from training import train_smooth_lora

    data = write_caption_folder(b.workdir / "smooth_data", b.size)
    precision = "bf16" if b.device.type == "cuda" else "no"
    steps = 1 + b.plan.train_steps
    argv = ["--base", str(b.folder), "--data", str(data), "--out", str(b.workdir / "smooth_run"),
            "--steps", str(steps), "--batch", str(b.plan.train_batch), "--mixed-precision", precision,
            "--device", b.device.type, "--threads", str(torch.get_num_threads()), "--no-progress",
            "--checkpoint-every", str(10**9), "--eval-every", str(10**9)]
    stamps: list[float] = []

    def stamp(*_):
        sync(b.device)
        stamps.append(time.perf_counter())

    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(stamp)
    try:
        with quiet_loading():  # the trainer loads the base model itself
            result = train_smooth_lora.main(argv)
    finally:
        handle.remove()
    if len(stamps) != steps:
        raise RuntimeError(f"expected {steps} optimiser steps, saw {len(stamps)}")
    intervals = [y - x for x, y in itertools.pairwise(stamps)]
    return {"batch": b.plan.train_batch, "resolution": b.size, "mixed_precision": precision,
            "timed_steps": len(intervals), "s_per_step": statistics.median(intervals), "steps_s": intervals,
            "run_seconds": result["seconds"], "lora_parameters": result["lora_parameters"]}


def write_caption_folder(folder: Path, size: int) -> Path:
    """Two images with metadata.jsonl: the trainer's --data layout."""
    folder.mkdir(parents=True, exist_ok=True)
    image, _ = sample_image(size)
    rows = []
    for i, img in enumerate((image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))):
        img.save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": PROMPT}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


MEASURES = {
    "t2i_step": measure_t2i_step,
    "preview_overhead": measure_preview_overhead,
    "nti": measure_nti,
    "drag": measure_drag,
    "instruct": measure_instruct,
    "smooth_lora_step": measure_smooth_lora_step,
}


# --------------------------------------------------------------------------------------------- running

def run_figures(measures: dict, bench, budget_s: float, started: float, clock=time.perf_counter) -> dict:
    """Runs each measurement in turn: its error is recorded and the next one still runs; once the budget is
    spent, the rest are recorded as skipped."""
    out = {}
    for name, fn in measures.items():
        elapsed = clock() - started
        if elapsed > budget_s:
            out[name] = {"status": "skipped", "reason": f"time budget spent ({elapsed:.0f} s of {budget_s:.0f} s)"}
            continue
        t0 = clock()
        try:
            out[name] = {"status": "ok", **fn(bench)}
        except Exception as exc:  # noqa: BLE001 - one failing figure must not stop the others
            out[name] = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc(limit=-4)}
        out[name]["wall_s"] = clock() - t0
        release_memory(getattr(bench, "device", None))
    return out


def release_memory(device) -> None:
    gc.collect()
    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()


@contextmanager
def one_cpu_thread(device: torch.device):
    """On the CPU one torch thread: on a small shared machine two OpenMP threads competing with other processes
    were several times slower and far noisier (benchmarks/bench_sampling.py); restored afterwards."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_out(tiny: bool, device: torch.device) -> Path:
    """The committed results file only for the real thing (full size on CUDA); anything else goes to the
    temporary directory, so a smoke run never overwrites it."""
    if device.type == "cuda" and not tiny:
        return DEFAULT_OUT
    return Path(tempfile.gettempdir()) / f"gpu_suite_{'tiny' if tiny else device.type}.json"


def environment(device: torch.device) -> dict:
    import diffusers

    on_cuda = device.type == "cuda"
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if on_cuda else (platform.processor() or "cpu"),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "cuda": torch.version.cuda if on_cuda else None,
        "python": platform.python_version(), "platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
    }


def finite_json(x):
    """JSON without NaN/Infinity (a random model's PSNR may be either): such floats become strings."""
    if isinstance(x, dict):
        return {k: finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_json(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


HEADLINES = {
    "t2i_step": "s/step ours {ours_s_per_step:.4f}, diffusers {diffusers_s_per_step:.4f}, ratio {ratio:.3f}",
    "preview_overhead": "s/step previews on {on_s_per_step:.4f}, off {off_s_per_step:.4f}, ratio {ratio:.3f}",
    "nti": "{seconds:.2f} s for {steps} steps, PSNR {psnr:.2f} dB (random weights)",
    "drag": "LoRA {lora_s:.2f} s, inversion {inversion_s:.2f} s, drag {drag_s:.2f} s, denoise {denoise_s:.2f} s, "
            "total {total_s:.2f} s, peak {peak}",
    "instruct": "s/step ours {ours_s_per_step:.4f}, diffusers {diffusers_s_per_step:.4f}, ratio {ratio:.3f}",
    "smooth_lora_step": "{s_per_step:.4f} s/step (batch {batch}, {resolution}px, {mixed_precision})",
}


def headline(name: str, fig: dict) -> str:
    if fig["status"] != "ok":
        return fig.get("error") or fig.get("reason", "")
    peak = fig.get("peak_gib")
    try:
        return HEADLINES[name].format(**{**fig, "peak": "n/a (CPU)" if peak is None else f"{peak:.2f} GiB"})
    except (KeyError, ValueError, TypeError) as exc:  # e.g. a non-finite PSNR stored as text
        return f"(headline unavailable: {exc})"


def print_table(report: dict) -> None:
    print(f"\nGPU suite ({report['mode']}) on {report['environment']['device_name']} "
          f"[{report['environment']['device']}, {report['config']['dtype']}], "
          f"{report['config']['size']}x{report['config']['size']}, "
          f"torch {report['environment']['torch']}, diffusers {report['environment']['diffusers']}")
    for name, fig in report["figures"].items():
        print(f"  {name:<17} {fig['status']:<8} {fig.get('wall_s', 0):7.1f} s  {headline(name, fig)}")
    print(f"total {report['total_wall_s']:.1f} s (model build {report['model_build_s']:.1f} s, "
          f"load {report['model_load_s']:.1f} s)")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="JSON output (default: benchmarks/results/gpu_suite.json for a full CUDA run, "
                                  "else a file in the temporary directory)")
    ap.add_argument("--tiny", action="store_true", help="the tiny model with 2-3 steps per figure (a CPU smoke run)")
    ap.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available (cpu with --tiny)")
    ap.add_argument("--dtype", choices=("float16", "float32"), help="default: float16 on CUDA, float32 on the CPU")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds after which figures left are skipped")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    return args


def main(argv=None) -> dict:
    started = time.perf_counter()
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    plan, spec = (TINY, TINY_SPEC) if args.tiny else (FULL, SD15_SPEC)
    out_path = Path(args.out) if args.out else default_out(args.tiny, device)
    report = {"suite": "benchmarks/gpu_suite.py", "mode": plan.name, "environment": environment(device),
              "config": {"dtype": str(dtype).replace("torch.", ""), "size": None, "prompt": PROMPT,
                         "instruction": INSTRUCTION, "guidance": GUIDANCE, "image_guidance": IMAGE_GUIDANCE,
                         "seed": SEED, "plan": asdict(plan), "model_spec": spec, "budget_s": args.budget},
              "model_build_s": 0.0, "model_load_s": 0.0}
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp, one_cpu_thread(device):
        report["environment"]["cpu_threads"] = torch.get_num_threads()
        figures = run_with_model(spec, plan, device, dtype, Path(tmp), args.budget, started, report)
    report["figures"] = figures
    report["total_wall_s"] = time.perf_counter() - started
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(finite_json(report), indent=1, default=str))
    print_table(report)
    print(f"wrote {out_path}")
    return report


def run_with_model(spec, plan, device, dtype, tmp: Path, budget_s, started, report) -> dict:
    """Builds and loads the model (timed into `report`), then runs the figures; a model that fails to build
    or load becomes every figure's error."""
    try:
        with quiet_loading():
            t0 = time.perf_counter()
            folder = build_model_folder(spec, tmp / "model", dtype)
            report["model_build_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            model = load_studio_model(folder, device, dtype)
            sync(device)
            report["model_load_s"] = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - recorded, as a figure's failure would be
        error = f"model: {type(exc).__name__}: {exc}"
        return {name: {"status": "error", "error": error, "traceback": traceback.format_exc(limit=-4)}
                for name in MEASURES}
    report["config"].update(size=model.resolution, model=model.display_name)
    bench = Bench(model, folder, plan, tmp)
    return run_figures(MEASURES, bench, budget_s, started)


if __name__ == "__main__":
    main()
