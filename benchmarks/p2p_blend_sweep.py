"""P2P word replace + local blend on held-out recolour edits, at several blend thresholds, for one or more models:
success and PSNR outside the object, with the per-edit PSNRs (the mean hides a few edits that change the whole
image). By default the tuning edits (held-out seeds from 500), not the eval's, so a threshold chosen here is
still checked on unseen edits by `eval_embedded.py --rows "text edit"`.

    python benchmarks/p2p_blend_sweep.py --model assets/model --model path/to/other --thresholds 0.7,0.8,0.9
    python benchmarks/p2p_blend_sweep.py --model assets/model --thresholds 0.7 --plain-decode   # paste on and off
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from eval_embedded import recolour_prompts, score_text_edits  # noqa: E402

from pipelines.core.events import run_to_end  # noqa: E402


def sweep(model, items, thresholds, plain_decode: bool = False) -> dict:
    """One paper-schedule NTI per edit (cached), then one P2P edit per threshold; with `plain_decode` also each
    threshold without pasting the input back outside the blend region (keys "<t> plain")."""
    variants = {str(t): dict(method="p2p", inversion="nti-reference", blend=t) for t in thresholds}
    if plain_decode:
        variants.update({f"{t} plain": dict(method="p2p", inversion="nti-reference", blend=t, keep_background=False)
                         for t in thresholds})
    scores = score_text_edits(model, items, variants)
    return {t: {"success": float(np.mean([x["success"] for x in s])),
                "psnr_outside": float(np.nanmean([x["psnr_outside"] for x in s])),
                "psnr_outside_each": [round(float(x["psnr_outside"]), 2) for x in s]}
            for t, s in scores.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="a model folder (repeat for several)")
    p.add_argument("--thresholds", default="0.7,0.8,0.9")
    p.add_argument("--n", type=int, default=20, help="recolour edits")
    p.add_argument("--start", type=int, default=500, help="first held-out edit seed (0: the eval's edits)")
    p.add_argument("--plain-decode", action="store_true",
                   help="also each threshold without pasting the input back outside the blend region")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from pipelines.core.models import load_model

    thresholds = [float(t) for t in args.thresholds.split(",")]
    items = recolour_prompts(args.n, start=args.start)
    report = {"edits": len(items), "start": args.start, "models": {}}
    for folder in args.model:
        t0 = time.perf_counter()
        result = sweep(run_to_end(load_model(folder)), items, thresholds, args.plain_decode)
        report["models"][folder] = {"seconds": round(time.perf_counter() - t0), "thresholds": result}
        for t, r in result.items():
            print(f"{folder}  threshold {t}: success {r['success']:.2f}  PSNR outside {r['psnr_outside']:.2f} dB")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
