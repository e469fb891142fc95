"""Null-text inversion (NTI, Mokady et al. 2023) and its cheaper relatives, on the studio's DDIM core.

DDIM inversion at guidance 1 gives a "pivot" trajectory z*_0 .. z*_T. Sampling back at guidance w > 1 drifts
off it, so NTI fits, step by step from the noisiest, the unconditional ("null-text") embedding of that step
such that one guided DDIM step from the current latent lands on the pivot's next latent. The fitted embeddings
then make guided sampling (and prompt edits on top of it) reproduce the image.

Plain tensors in; generators of `NullStep` out. Works for a batch of images at once: every image gets its own
embedding, or images share one (`groups`), as real-image interpolation's dual inversion needs. Gradients flow
into the embeddings only (never into the UNet's weights), and every UNet image-evaluation is counted, so the
benchmarks can compare schedules by cost.
"""
from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field

import torch

from .core import ddim
from .core.events import CancelToken


@dataclass(frozen=True)
class NullSchedule:
    """How hard each step's embedding is optimised. Step i of N (0 = noisiest) uses Adam at
    lr * (1 - i / (2N)) for at most `inner_steps` iterations and stops once the step loss is below
    stop_at + stop_growth * i / N. With N = 50 that is exactly the paper's lr 1e-2 (1 - i/100) and
    threshold 1e-5 + i * 2e-5; the general form keeps the same schedule shape for any step count."""

    inner_steps: int = 10
    lr: float = 1e-2
    stop_at: float = 1e-5
    stop_growth: float = 1e-3
    start: str = "empty"           # first step's embedding: "empty" (the "" embedding, the paper) or "prompt"

    def lr_at(self, i: int, n: int) -> float:
        return self.lr * (1 - i / (2 * n))

    def threshold_at(self, i: int, n: int) -> float:
        return self.stop_at + self.stop_growth * i / n


REFERENCE = NullSchedule()
# Our default. It starts from negative-prompt inversion's answer (null = the source prompt's embedding, which
# already follows the pivot closely) instead of from "", then runs the paper's schedule and early stop from
# there. Measured on the embedded model (benchmarks/bench_nti.py): about one Adam iteration per step instead of
# ~9, for the same reconstruction PSNR.
FAST = NullSchedule(start="prompt")


@dataclass
class EvalCounter:
    """UNet image-evaluations: `forward` without gradient, `backward` with one (forward + backward)."""

    forward: int = 0
    backward: int = 0

    def as_dict(self) -> dict:
        return {"unet_forward": self.forward, "unet_forward_backward": self.backward}


@dataclass
class NullStep:
    index: int              # sampling step just fitted (0 = noisiest)
    total: int
    losses: list[float]     # per group: the step loss after fitting
    iterations: int         # optimiser iterations this step (max over groups)
    latents: torch.Tensor   # the reconstruction so far (guided step with the fitted embeddings)
    pred_x0: torch.Tensor


@dataclass
class NullTextInversion:
    """What editing needs: x_T and one unconditional embedding per sampling step (per image)."""

    x_T: torch.Tensor                  # (B, C, h, w)
    nulls: list[torch.Tensor]          # per sampling step: (B, L, D); images of one group share rows
    reconstruction: torch.Tensor       # (B, C, h, w): guided sampling with `nulls` from x_T
    losses: list[list[float]] = field(default_factory=list)   # per step, per group
    counter: EvalCounter = field(default_factory=EvalCounter)


def pivot_trajectory(unet, z0: torch.Tensor, cond: torch.Tensor, steps: int, scheduler_config,
                     cancel: CancelToken | None = None, counter: EvalCounter | None = None,
                     ) -> Generator[ddim.StepState, None, list[torch.Tensor]]:
    """DDIM inversion at guidance 1 (the pivot); returns [z*_0, ..., z*_T] (index = inversion steps done)."""
    traj = [z0]
    for state in ddim.invert(unet, z0, cond, None, 1.0, steps, scheduler_config, cancel):
        if counter is not None:
            counter.forward += len(z0)
        traj.append(state.latents)
        yield state
    return traj


def optimise_nulls(
    unet, trajectory: Sequence[torch.Tensor], cond: torch.Tensor, null_init: torch.Tensor, guidance: float,
    steps: int, scheduler_config, schedule: NullSchedule = REFERENCE, groups: Sequence[Sequence[int]] | None = None,
    cancel: CancelToken | None = None, counter: EvalCounter | None = None,
) -> Generator[NullStep, None, NullTextInversion]:
    """Fits one null-text embedding per sampling step (and per group of images) to the pivot `trajectory`.

    cond: (B, L, D) source prompt embeddings; null_init: (1 or B, L, D) start (the embedding of ""), unless the
    schedule starts from the prompt.
    groups: lists of batch indices sharing one embedding (default: each image alone); a group's loss is the
    sum of its images' losses. The conditional prediction is computed once per step for the fit, as in the paper."""
    counter = counter if counter is not None else EvalCounter()
    sched = ddim.make_scheduler(scheduler_config, steps)
    n = len(sched.timesteps)
    if len(trajectory) != n + 1:
        raise ValueError(f"trajectory has {len(trajectory)} latents, expected {n + 1}")
    batch = len(cond)
    groups = [list(g) for g in (groups or [[b] for b in range(batch)])]
    owner = torch.empty(batch, dtype=torch.long)
    for g, members in enumerate(groups):
        owner[members] = g
    stride = sched.config.num_train_timesteps // sched.num_inference_steps
    dtype = cond.dtype
    # Embeddings are optimised in float32 whatever the model's dtype: the paper stresses fp16 fails here.
    if schedule.start == "prompt":
        current = [cond[members].detach().float().mean(0) for members in groups]
    else:
        current = [null_init[min(members[0], len(null_init) - 1)].detach().float().clone() for members in groups]
    z = trajectory[-1]
    nulls, losses = [], []
    for i, t in enumerate(sched.timesteps):
        t = int(t)
        a_t, a_prev = ddim.alpha_cumprod(sched, t), ddim.alpha_cumprod(sched, t - stride)
        target = trajectory[n - 1 - i]
        if cancel is not None:
            cancel.check()
        with torch.no_grad():
            eps_c = unet(z, t, encoder_hidden_states=cond).sample
        counter.forward += batch
        params = [c.clone().requires_grad_(True) for c in current]
        opts = [torch.optim.Adam([p], lr=schedule.lr_at(i, n)) for p in params]  # a fresh Adam per step
        active = list(range(len(groups)))
        threshold = schedule.threshold_at(i, n)
        step_losses = [float("nan")] * len(groups)
        iterations = 0
        for _ in range(schedule.inner_steps if guidance != 1.0 else 0):
            if not active:
                break
            if cancel is not None:
                cancel.check()
            rows = [b for g in active for b in groups[g]]
            null_rows = torch.stack([params[owner[b]] for b in rows]).to(dtype)
            with torch.enable_grad():
                eps_u = unet(z[rows], t, encoder_hidden_states=null_rows).sample
                eps = eps_u + guidance * (eps_c[rows] - eps_u)
                z_prev, _ = ddim.move(z[rows], eps, a_t, a_prev)
                per_image = (z_prev.float() - target[rows].float()).pow(2).mean(dim=(1, 2, 3))
                group_loss = {g: per_image[[rows.index(b) for b in groups[g]]].sum() for g in active}
                grads = torch.autograd.grad(sum(group_loss.values()), [params[g] for g in active])
            counter.backward += len(rows)
            iterations += 1
            for g, grad in zip(active, grads):
                params[g].grad = grad
                opts[g].step()
                step_losses[g] = float(group_loss[g].detach())
            # As in the paper, the check follows the update: a group stops once its loss is low enough.
            active = [g for g in active if step_losses[g] >= threshold]
        current = [p.detach() for p in params]
        step_nulls = torch.stack([current[owner[b]] for b in range(batch)]).to(dtype)
        with torch.no_grad():
            # The same batched guided call and scheduler step as ddim.sample, so sampling again with these
            # nulls (an edit whose prompt never switches) reproduces this reconstruction exactly.
            out = sched.step(ddim.guided_eps(unet, z, t, cond, step_nulls, guidance), t, z, eta=0.0)
            counter.forward += batch * (1 if guidance == 1.0 else 2)
            z, x0 = out.prev_sample, out.pred_original_sample
            final = [float(sum((z[b].float() - target[b].float()).pow(2).mean() for b in members))
                     for members in groups]
        nulls.append(step_nulls)
        losses.append(final)
        yield NullStep(i, n, final, iterations, z, x0)
    return NullTextInversion(trajectory[-1], nulls, z, losses, counter)


def negative_prompt_nulls(cond: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Negative-prompt inversion (Miyake et al. 2023): the null embedding of every step is the source prompt's
    own embedding, so guided sampling follows the guidance-1 pivot without any optimisation."""
    return [cond] * int(steps)


def run_inversion(
    unet, z0: torch.Tensor, cond: torch.Tensor, null_init: torch.Tensor, guidance: float, steps: int,
    scheduler_config, method: str = "nti", schedule: NullSchedule | None = None,
    groups: Sequence[Sequence[int]] | None = None, cancel: CancelToken | None = None,
) -> Generator[tuple[str, object], None, NullTextInversion]:
    """Pivot, then nulls, for method 'nti' (schedule, default FAST), 'nti-reference' or 'npi'. Yields
    ("pivot", StepState) then ("null", NullStep) / ("sample", StepState) events; returns the inversion."""
    counter = EvalCounter()
    traj = yield from _tagged("pivot", pivot_trajectory(unet, z0, cond, steps, scheduler_config, cancel, counter))
    if method == "npi":
        nulls = negative_prompt_nulls(cond, steps)
        z = traj[-1]
        for state in ddim.sample(unet, z, cond, nulls, guidance, steps, scheduler_config, cancel):
            counter.forward += len(z) * (1 if guidance == 1.0 else 2)
            z = state.latents
            yield "sample", state
        return NullTextInversion(traj[-1], nulls, z, [], counter)
    if method not in ("nti", "nti-reference"):
        raise ValueError(f"unknown inversion method {method!r}")
    schedule = schedule or (REFERENCE if method == "nti-reference" else FAST)
    return (yield from _tagged("null", optimise_nulls(unet, traj, cond, null_init, guidance, steps, scheduler_config,
                                                      schedule, groups, cancel, counter)))


def _tagged(tag: str, gen):
    """Re-yields gen's events as (tag, event) and returns gen's return value."""
    try:
        while True:
            try:
                ev = next(gen)
            except StopIteration as stop:
                return stop.value
            yield tag, ev
    finally:
        gen.close()
