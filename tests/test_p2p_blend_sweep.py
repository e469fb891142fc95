"""benchmarks/p2p_blend_sweep.py: the threshold reaches the local blend, and the tuning edits are not the eval's."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from eval_embedded import recolour_prompts  # noqa: E402
from p2p_blend_sweep import sweep  # noqa: E402


def test_tuning_edits_are_not_the_eval_edits():
    tuning, evals = recolour_prompts(4, start=500), recolour_prompts(4)
    assert len(tuning) == len(evals) == 4
    assert not any(t[0] == e[0] for t in tuning for e in evals)  # no scene in both
    assert all(src != tgt for _, _, src, tgt in tuning)  # a colour word was swapped


def test_a_near_one_threshold_keeps_what_lies_outside_the_object(embedded):
    # the first tuning edit is one where the blend at 0.7 lets the whole image change (11 dB on the committed
    # model); with a mask of only the attention peak the rest comes from the source branch, the NTI reconstruction
    result = sweep(embedded, recolour_prompts(1, start=500), [0.7, 0.999])
    assert result["0.999"]["psnr_outside"] > 25
    assert result["0.999"]["psnr_outside"] > result["0.7"]["psnr_outside"] + 5
    assert len(result["0.7"]["psnr_outside_each"]) == 1
