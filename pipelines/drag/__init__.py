"""DragDiffusion: move points of an image (handles) to new places (targets); pipeline.py has the algorithm.

  pipeline.py     the job: validation, LoRA, inversion, the drag optimisation, denoising with mutual attention
  lora.py         the per-image identity-preserving LoRA
  points.py       handle/target parsing and checks, motion supervision, point tracking, drawing
  trajectory.py   latent trajectories of images generated in the studio (dragging one skips inversion and LoRA)
  unet.py         the UNet's decoder features (forward hook) and mutual self-attention
  warp.py         the warm start: the painted region's latent carried along the drag
"""
from .pipeline import (
                       DragParams,
                       DragResult,
                       DragSettings,
                       check_points,
                       drag,
                       draw_points,
                       prepare_drag_mask,
                       validate_drag,
)
from .points import parse_points

__all__ = ["DragParams", "DragResult", "DragSettings", "check_points", "drag", "draw_points", "parse_points",
           "prepare_drag_mask", "validate_drag"]
