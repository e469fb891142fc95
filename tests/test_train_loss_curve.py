"""The trainers on accelerate learn as the hand-written loops did: a 60-step run of the VAE stage (float32) and of the
UNet stage (bfloat16 mixed precision) on their tiny configurations stays within run-to-run noise of the loss curves
recorded before the move (benchmarks/results/train_loss_reference.json, seeds 0-4; benchmarks/train_loss_curve.py
checks the other stages too)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import train_loss_curve as curve  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["vae", "unet_bf16"])
def test_a_short_stage_reproduces_the_recorded_loss_curve(stage, tmp_path, tiny_model):
    row = curve.compare(stage, curve.loss_history(stage, 0, tmp_path, tiny=tiny_model.folder))
    # within 3 sd over the reference seeds of the first-20 and last-20 step means (what another draw order of the
    # batches would move them by), and learning: the last 20 steps below the first 20
    assert row["ok"], row
    assert row["last_k_mean"] < row["first_k_mean"]
