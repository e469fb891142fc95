"""Assemble the embedded model folder (assets/model) from the training runs.

    python training/assemble.py --base training/runs/unet/model --vae training/runs/vae_dec/vae \
        --instruct training/runs/instruct/unet --out assets/model

The result is an ordinary diffusers StableDiffusionPipeline folder (the studio's loader, and
`StableDiffusionPipeline.from_pretrained`, read it like any SD1.5 checkout) plus `unet_instruct/`, the
8-channel InstructPix2Pix UNet that shares its VAE, tokenizer and text encoder. UNet weights are stored
in float16 (they load into float32 on CPU) to keep the whole folder, with the later stages' codi/ and
unet_inpaint/, under the 70 MB budget.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BUDGET_MB = 60.0


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors")) / 1e6


def main(argv=None) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from pipelines.core.previews import fit_previewer
    from training import checkpoint

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="train_unet.py's model/ folder")
    p.add_argument("--vae", help="a vae folder with the same encoder (train_vae.py stage 2); default: the base's")
    p.add_argument("--instruct", help="train_instruct.py's unet/ folder")
    p.add_argument("--out", default=str(ROOT / "assets" / "model"))
    p.add_argument("--instruct-guidance", metavar="TEXT,IMAGE",
                   help="the InstructPix2Pix scales (sT,sI) this model recommends; the studio's sliders and the "
                        "eval start there (default: none recorded, so the paper's 7.5,1.5)")
    p.add_argument("--info", action="append", default=[], help="extra JSON files to record (eval reports)")
    args = p.parse_args(argv)

    base, out = Path(args.base), Path(args.out)
    vae = AutoencoderKL.from_pretrained(args.vae or base / "vae")
    base_vae = AutoencoderKL.from_pretrained(base / "vae")
    for k, v in base_vae.encoder.state_dict().items():  # latents must be the ones the UNet learned
        if not torch.equal(v, vae.encoder.state_dict()[k]):
            raise SystemExit(f"--vae has a different encoder ({k}); the UNet would see other latents")
    vae.register_to_config(scaling_factor=base_vae.config.scaling_factor)
    with checkpoint.swapped_in(out) as partial:
        shutil.copytree(base, partial, ignore=shutil.ignore_patterns("unet", "vae", "unet_instruct"),
                        dirs_exist_ok=True)
        vae.save_pretrained(partial / "vae", safe_serialization=True)
        fit_previewer(vae).save(partial)
        UNet2DConditionModel.from_pretrained(base / "unet").to(torch.float16).save_pretrained(
            partial / "unet", safe_serialization=True)
        if args.instruct:
            UNet2DConditionModel.from_pretrained(args.instruct).to(torch.float16).save_pretrained(
                partial / "unet_instruct", safe_serialization=True)
        info = json.loads((partial / "studio_model.json").read_text())
        info["components"] = {"unet_instruct": bool(args.instruct),
                              "weights_dtype": "float16 UNets, float32 others"}
        info["training"] = {}
        info.pop("instruct_guidance", None)
        if args.instruct_guidance:
            text_g, image_g = (float(v) for v in args.instruct_guidance.split(","))
            info["instruct_guidance"] = {"text": text_g, "image": image_g}
        for f in args.info:
            info["training"][Path(f).stem] = json.loads(Path(f).read_text())
        (partial / "studio_model.json").write_text(json.dumps(info, indent=1))
        size = folder_mb(partial)
        if size > BUDGET_MB:
            raise SystemExit(f"{size:.1f} MB of safetensors is over the {BUDGET_MB:g} MB budget")
    report = {"out": str(out), "safetensors_mb": round(size, 2)}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
