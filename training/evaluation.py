"""Checks of a model of the synthetic world by program: generate (or edit) in batches with the studio's DDIM
core, read the images back with `training.checker`, and compare with the ground truth of held-out scenes.

Shared by the trainers (a quick look during training) and `benchmarks/eval_embedded.py` (the full table).
Everything here takes plain modules (unet, text encoder, tokenizer, vae), so it works on a model being
trained as well as on a loaded `LoadedModel`, on any device: inputs are made on the CPU and moved to each
module's device, and images come back to the CPU as numpy.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from pipelines.core import consistency, ddim, metrics
from pipelines.instruct import DEFAULT_IMAGE_GUIDANCE, DEFAULT_TEXT_GUIDANCE, instruct_eps
from training import world
from training.checker import check


@torch.no_grad()
def embed(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


@torch.no_grad()
def decode(vae, z: torch.Tensor) -> np.ndarray:
    """Latents (scaled as the UNet sees them) -> (B, H, W, 3) uint8."""
    x = vae.decode(z.to(vae.device) / vae.config.scaling_factor).sample
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def mean_luma(images: np.ndarray) -> np.ndarray:
    """Per image of a (B, H, W, C) uint8 batch: mean of (0.299 R + 0.587 G + 0.114 B) / 255."""
    return (images[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])).mean(axis=(1, 2)) / 255


@torch.no_grad()
def encode(vae, images: np.ndarray, scaled: bool = True) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> latents (posterior mean, on the VAE's device), times the scaling factor unless
    scaled=False (the form InstructPix2Pix takes its input image in)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean
    return z * vae.config.scaling_factor if scaled else z


def held_out_scenes(count: int, n_objects: int | None, start: int = 0, size: int = 64):
    """(caption, scene) of held-out seeds, optionally only those with `n_objects` objects."""
    out, seed = [], world.HELD_OUT_SEED + start
    while len(out) < count:
        for _, text, scene in world.dataset(seed, 1, size):
            if n_objects is None or len(scene.objects) == n_objects:
                out.append((text, scene))
        seed += 1
    return out


def noise_for(seeds, shape, device=None) -> torch.Tensor:
    """Per-item noise from per-item CPU generators: the same seed gives the same start in any batch."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(
        device or "cpu")


@torch.no_grad()
def denoise(unet, text_encoder, tokenizer, prompts: list[str], x: torch.Tensor, guidance: float, steps: int,
            scheduler_config, start_index: int = 0) -> torch.Tensor:
    """DDIM with classifier-free guidance from x (the latent at timesteps[start_index]) to the clean latents."""
    cond = embed(text_encoder, tokenizer, prompts).to(unet.device)
    uncond = embed(text_encoder, tokenizer, [""] * len(prompts)).to(unet.device)
    for state in ddim.sample(unet, x, cond, uncond, guidance, steps, scheduler_config, start_index=start_index):
        x = state.latents
    return x


@torch.no_grad()
def generate_latents(unet, text_encoder, tokenizer, prompts: list[str], seeds, guidance: float = 7.5,
                     steps: int = 50, scheduler_config=None, chunk: int = 32) -> torch.Tensor:
    size = unet.config.sample_size  # latent side (16 for the world's 64 px images)
    out = []
    for i in range(0, len(prompts), chunk):
        x = noise_for(seeds[i:i + chunk], (unet.config.in_channels, size, size), unet.device).to(unet.dtype)
        out.append(denoise(unet, text_encoder, tokenizer, prompts[i:i + chunk], x, guidance, steps, scheduler_config))
    return torch.cat(out)


def generate_batch(unet, text_encoder, tokenizer, vae, prompts: list[str], seeds, guidance: float = 7.5,
                   steps: int = 50, scheduler_config=None, chunk: int = 32) -> np.ndarray:
    z = generate_latents(unet, text_encoder, tokenizer, prompts, seeds, guidance, steps, scheduler_config, chunk)
    return np.concatenate([decode(vae, z[i:i + chunk]) for i in range(0, len(z), chunk)])


def nearest(found: list[dict], centre) -> dict | None:
    """The detected object (a checker dict) whose centre is closest to `centre`, or None if none was found."""
    return min(found, key=lambda o: math.dist(o["centre"], centre), default=None)


def score_generation(image: np.ndarray, scene: world.Scene) -> dict[str, bool]:
    """Does a generated image show the caption's scene? Background colour(s), and per object colour, shape,
    size and grid cell of the detected object nearest the true centre."""
    seen = check(image)
    hits = {"background": seen["background"]["colours"] == list(scene.background.colours),
            "count": len(seen["objects"]) == len(scene.objects)}
    matches = [(obj, nearest(seen["objects"], obj.centre)) for obj in scene.objects]
    for name in ("colour", "shape", "cell", "size"):
        hits[name] = all(found is not None and found[name] == getattr(obj, name) for obj, found in matches)
    return hits


def text_to_image_accuracy(unet, text_encoder, tokenizer, vae, scheduler_config, count: int = 100,
                           n_objects: int = 1, guidance: float = 7.5, steps: int = 50, start: int = 0) -> dict:
    items = held_out_scenes(count, n_objects, start)
    prompts = [t for t, _ in items]
    images = generate_batch(unet, text_encoder, tokenizer, vae, prompts, range(len(items)), guidance, steps,
                            scheduler_config)
    scores = [score_generation(im, sc) for im, (_, sc) in zip(images, items)]
    return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]} | {"n": len(scores)}


# --------------------------------------------------------------------------------------------- editing


def held_out_edits(count: int, kind: str, start: int = 0, size: int = 64):
    """(input scene, Edit) pairs of one kind on held-out seeds."""
    out, seed = [], world.HELD_OUT_SEED + 500_000 + start
    while len(out) < count:
        scene = world.sample_scene(seed, size)
        try:
            out.append((scene, world.make_edit(scene, seed, kind)))
        except ValueError:
            pass
        seed += 1
    return out


@torch.no_grad()
def edit_batch(unet, text_encoder, tokenizer, vae, images: np.ndarray, instructions: list[str], seeds,
               text_guidance: float = DEFAULT_TEXT_GUIDANCE, image_guidance: float = DEFAULT_IMAGE_GUIDANCE,
               steps: int = 50, scheduler_config=None, chunk: int = 32) -> np.ndarray:
    out = []
    for i in range(0, len(images), chunk):
        ins, s = instructions[i:i + chunk], seeds[i:i + chunk]
        image_latents = encode(vae, images[i:i + chunk], scaled=False).to(unet.device, unet.dtype)
        cond = embed(text_encoder, tokenizer, ins).to(unet.device)
        uncond = embed(text_encoder, tokenizer, [""] * len(ins)).to(unet.device)
        x = noise_for(s, image_latents.shape[1:], unet.device).to(unet.dtype)

        def eps(x_t, t, _k):
            return instruct_eps(unet, x_t, t, cond, uncond, image_latents, text_guidance, image_guidance)

        for state in ddim.sample_with(eps, x, steps, scheduler_config):
            x = state.latents
        out.append(decode(vae, x))
    return np.concatenate(out)


@torch.no_grad()
def codi_edit_batch(unet, adapter, text_encoder, tokenizer, vae, images: np.ndarray, instructions: list[str], seeds,
                    steps: int, guidance: float = 1.0, chunk: int = 32,
                    alphas_cumprod: torch.Tensor | None = None) -> np.ndarray:
    """CoDi edits (the studio's sampler, pipelines/codi.py): the student (unet + adapter) reads the input image's
    latent (posterior mean x the scaling factor) and the instruction, from per-seed noise, in `steps` (1-4) steps
    with text guidance `guidance` (1: none). `alphas_cumprod`: the noise schedule (default SD 1.x's)."""
    sched = consistency.CodiScheduler(steps, alphas_cumprod)
    out = []
    for i in range(0, len(images), chunk):
        ins, s = instructions[i:i + chunk], seeds[i:i + chunk]
        condition = encode(vae, images[i:i + chunk]).to(unet.device, unet.dtype)
        cond = embed(text_encoder, tokenizer, ins).to(unet.device, unet.dtype)
        uncond = embed(text_encoder, tokenizer, [""] * len(ins)).to(unet.device, unet.dtype)
        x = noise_for(s, condition.shape[1:], unet.device).to(unet.dtype)

        def eps(x_t, t, _k):
            return consistency.guided_student_eps(unet, adapter, x_t, t, cond, uncond, condition, guidance)

        for state in ddim.sample_scheduled(eps, x, sched):
            x = state.latents
        out.append(decode(vae, x))
    return np.concatenate(out)


def changed_region(before: np.ndarray, after: np.ndarray, margin: int = 2) -> np.ndarray:
    """Pixels an edit changes, grown by `margin` px (model outputs blur edges a little)."""
    import cv2

    changed = (before != after).any(-1).astype(np.uint8)
    return cv2.dilate(changed, np.ones((2 * margin + 1,) * 2, np.uint8)).astype(bool)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of uint8 pixels (any shape), capped at 100 dB so identical regions still average."""
    return min(metrics.psnr(a, b), 100.0)


def score_edit(output: np.ndarray, scene: world.Scene, edit: world.Edit) -> dict:
    """Success: the checker reads the edited scene's target attribute in the output (and, for object edits,
    the object where it should be), plus PSNR against the input where the edit changes nothing."""
    seen, target = check(output), edit.scene
    if edit.kind == "background":
        ok = seen["background"]["colours"] == list(target.background.colours)
    elif edit.kind == "remove":
        gone = scene.objects[edit.index]
        ok = len(seen["objects"]) == len(target.objects) and gone.cell not in {o["cell"] for o in seen["objects"]}
    else:
        obj = target.objects[edit.index]
        found = nearest(seen["objects"], obj.centre)
        ok = found is not None and (found["colour"], found["shape"], found["cell"]) == (obj.colour, obj.shape, obj.cell)
    before = world.render(scene)
    keep = ~changed_region(before, world.render(target))
    return {"success": bool(ok), "psnr_outside": psnr(output[keep], before[keep]) if keep.any() else float("nan")}


def edit_accuracy(unet, text_encoder, tokenizer, vae, scheduler_config, kind: str, count: int = 50,
                  steps: int = 50, text_guidance: float = DEFAULT_TEXT_GUIDANCE,
                  image_guidance: float = DEFAULT_IMAGE_GUIDANCE) -> dict:
    pairs = held_out_edits(count, kind)
    images = np.stack([world.render(s) for s, _ in pairs])
    outputs = edit_batch(unet, text_encoder, tokenizer, vae, images, [e.instruction for _, e in pairs],
                         range(len(pairs)), text_guidance, image_guidance, steps, scheduler_config)
    scores = [score_edit(o, s, e) for o, (s, e) in zip(outputs, pairs)]
    return {"success": float(np.mean([s["success"] for s in scores])),
            "psnr_outside": float(np.nanmean([s["psnr_outside"] for s in scores])), "n": len(scores)}


def codi_edit_accuracy(unet, adapter, text_encoder, tokenizer, vae, kind: str, count: int = 50, steps: int = 4,
                       guidance: float = 1.0, alphas_cumprod: torch.Tensor | None = None) -> dict:
    """`edit_accuracy` for a CoDi student on the same held-out edits and seeds."""
    pairs = held_out_edits(count, kind)
    images = np.stack([world.render(s) for s, _ in pairs])
    outputs = codi_edit_batch(unet, adapter, text_encoder, tokenizer, vae, images, [e.instruction for _, e in pairs],
                              range(len(pairs)), steps, guidance, alphas_cumprod=alphas_cumprod)
    scores = [score_edit(o, s, e) for o, (s, e) in zip(outputs, pairs)]
    return {"success": float(np.mean([s["success"] for s in scores])),
            "psnr_outside": float(np.nanmean([s["psnr_outside"] for s in scores])), "n": len(scores)}


# --------------------------------------------------------------------------------------------- inpainting

INPAINT_KINDS = ("insert", "recolour", "remove")
_INPAINT_EDITS = {"insert": "add", "recolour": "recolour", "remove": "remove"}
INPAINT_MARGIN = 3.0  # px: the held-out masks are the edited object's bounding circle grown this much


def vae_factor(vae) -> int:
    """Image pixels per latent pixel along a side (4 for the embedded model, 8 for SD)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def masked_latents(vae, images: np.ndarray, cells) -> torch.Tensor:
    """A 9-channel inpainting UNet's masked-image latents (on the VAE's device): each (H, W, 3) uint8 image blanked
    to 0 in [-1, 1] over its hole cells (bool (B, h, w); pipelines.core.inpaint_inputs.masked_image), encoded as the
    posterior mean times the VAE's scaling factor."""
    from pipelines.core.inpaint_inputs import cells_tensor, masked_image

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    x = masked_image(x, cells_tensor(cells), vae_factor(vae))
    return vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor


def held_out_inpaints(count: int, kind: str, start: int = 0, size: int = 64):
    """(input scene, Edit, bool (H, W) mask) of one inpainting kind on held-out seeds: 'insert' (the world's add
    edit: the mask covers an empty spot where the new object goes), 'recolour' (the mask hides the old object,
    the caption names the new colour), 'remove' (the mask covers the object, the caption leaves it out). The mask
    is the object's bounding circle grown INPAINT_MARGIN px: the same for every shape of a size, so it gives the
    shape away no more than a user's round brush does."""
    from training.inpaint_masks import disc_mask

    if kind not in _INPAINT_EDITS:
        raise ValueError(f"unknown inpainting kind {kind!r} (kinds: {', '.join(INPAINT_KINDS)})")
    out = []
    for scene, edit in held_out_edits(count, _INPAINT_EDITS[kind], start, size):
        obj = (edit.scene if kind == "insert" else scene).objects[edit.index]
        out.append((scene, edit, disc_mask(size, obj.centre, obj.radius + INPAINT_MARGIN)))
    return out


@torch.no_grad()
def inpaint_batch(unet, text_encoder, tokenizer, vae, images: np.ndarray, cells: np.ndarray, prompts: list[str],
                  seeds, guidance: float = 7.5, steps: int = 20, scheduler_config=None, chunk: int = 32
                  ) -> np.ndarray:
    """A 9-channel inpainting UNet's outputs, plain DDIM (eta 0) with classifier-free guidance (the unconditional
    half keeps the mask and the masked image, as diffusers' StableDiffusionInpaintPipeline does), from per-seed
    noise; decoded as they are (no paste-back). `cells`: bool (B, h, w) hole cells."""
    from pipelines.core.inpaint_inputs import cells_tensor, unet_input

    if scheduler_config is None:
        from training.train_unet import SCHEDULER

        scheduler_config = SCHEDULER
    out = []
    for i in range(0, len(images), chunk):
        texts, s = prompts[i:i + chunk], seeds[i:i + chunk]
        masked = masked_latents(vae, images[i:i + chunk], cells[i:i + chunk]).to(unet.device, unet.dtype)
        hole = cells_tensor(cells[i:i + chunk], unet.device, unet.dtype)
        cond = embed(text_encoder, tokenizer, texts).to(unet.device, unet.dtype)
        uncond = embed(text_encoder, tokenizer, [""] * len(texts)).to(unet.device, unet.dtype)
        x = noise_for(s, (unet.config.out_channels, *masked.shape[2:]), unet.device).to(unet.dtype)

        def eps(x_t, t, _k):
            inputs = unet_input(x_t, hole, masked)
            if guidance == 1.0:
                return unet(inputs, t, encoder_hidden_states=cond).sample
            e_u, e_c = unet(torch.cat([inputs, inputs]), t,
                            encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
            return e_u + guidance * (e_c - e_u)

        for state in ddim.sample_with(eps, x, steps, scheduler_config):
            x = state.latents
        out.append(decode(vae, x))
    return np.concatenate(out)


def score_inpaint(output: np.ndarray, scene: world.Scene, edit: world.Edit, hole: np.ndarray, kind: str) -> dict:
    """Read by the checker inside the hole (bool (H, W), the repainted pixels): insert / recolour succeed when an
    object centred in the hole has the edited object's colour, shape and cell; remove when no object is centred in
    it and the count is the edited scene's. psnr_outside: against the input outside the hole, before any
    paste-back (what the VAE round trip and the UNet change there)."""
    seen, target = check(output), edit.scene

    def inside(o) -> bool:
        x, y = (min(hole.shape[1] - 1, max(0, round(v))) for v in o["centre"])
        return bool(hole[y, x])

    row = {}
    if kind == "remove":
        row["success"] = not any(inside(o) for o in seen["objects"]) and len(seen["objects"]) == len(target.objects)
    else:
        obj = target.objects[edit.index]
        found = nearest([o for o in seen["objects"] if inside(o)], obj.centre)
        for name in ("colour", "shape", "cell"):
            row[name] = found is not None and found[name] == getattr(obj, name)
        row["success"] = row["colour"] and row["shape"] and row["cell"]
    before = world.render(scene)
    keep = ~hole
    row["psnr_outside"] = psnr(output[keep], before[keep]) if keep.any() else float("nan")
    return row


def inpaint_accuracy(unet, text_encoder, tokenizer, vae, kind: str, count: int = 50, steps: int = 20,
                     guidance: float = 7.5, scheduler_config=None, start: int = 0) -> dict:
    """A 9-channel inpainting UNet on `count` held-out cases of `kind` (held_out_inpaints; the prompt is a caption
    of the edited scene): success (and colour / shape for insert and recolour) and PSNR outside the hole cells."""
    from pipelines.core.inpaint_inputs import hole_cells
    from pipelines.core.masks import cells_to_image

    cases = held_out_inpaints(count, kind, start)
    f = vae_factor(vae)
    images = np.stack([world.render(s) for s, _, _ in cases])
    cells = np.stack([hole_cells(m, f) for _, _, m in cases])
    prompts = [world.caption(e.scene, i) for i, (_, e, _) in enumerate(cases)]
    outputs = inpaint_batch(unet, text_encoder, tokenizer, vae, images, cells, prompts, range(len(cases)), guidance,
                            steps, scheduler_config)
    scores = [score_inpaint(o, s, e, cells_to_image(c, f).astype(bool), kind)
              for o, (s, e, _), c in zip(outputs, cases, cells)]
    return {k: float(np.nanmean([s[k] for s in scores])) for k in scores[0]} | {"n": len(scores)}
