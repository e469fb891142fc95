"""benchmarks/p2p_blend_sweep.py: the blend reaches the edit (with and without pasting the input back), and the tuning
edits are not the eval's."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from eval_embedded import recolour_prompts  # noqa: E402
from p2p_blend_sweep import sweep  # noqa: E402


def test_tuning_edits_are_not_the_eval_edits():
    tuning, evals = recolour_prompts(4, start=500), recolour_prompts(4)
    assert len(tuning) == len(evals) == 4
    assert not any(t[0] == e[0] for t in tuning for e in evals)  # no scene in both
    assert all(src != tgt for _, _, src, tgt in tuning)  # a colour word was swapped


@pytest.mark.slow
def test_pasting_the_input_back_keeps_what_lies_outside_the_blend_region(embedded):
    # the first tuning edit is one where, with the plain decode, the whole image changes (13 dB at 0.7, 23 dB
    # pasted) although the blend keeps every latent outside its region: the decoder spreads the object's new
    # latents. Pasted back, the input's pixels outside the region grown one latent cell.
    result = sweep(embedded, recolour_prompts(1, start=500), [0.7], plain_decode=True)
    assert result["0.7 plain"]["psnr_outside"] < 20
    assert result["0.7"]["psnr_outside"] > result["0.7 plain"]["psnr_outside"] + 8
    assert len(result["0.7"]["psnr_outside_each"]) == 1
