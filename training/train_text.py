"""Pre-train the embedded model's text encoder (a CLIPTextModel) to read the world's captions and instructions.

    python training/train_text.py --out training/runs/text --steps 3000

Why: trained jointly from scratch with the UNet (one diffusion loss), the encoder barely learned the words the
UNet needed most: a linear probe on its token states read an object's grid cell from a one-object caption 44%
of the time (chance 11%), so positions stayed at chance in the images. SD's UNet is trained on a text encoder
that already understands text (CLIP); this is our small stand-in. Attention-pooling heads read every fact a
text states from the token states (background kind and colours, object count, each object's colour, shape,
size and cell, an instruction's kind and its new colour / shape / cell and the object it names); facts the
text leaves out are not asked for. The heads are thrown away: the UNet (`train_unet.py --text-encoder`) and
InstructPix2Pix (`train_instruct.py --text-encoder`) use the encoder frozen, as SD uses CLIP.

Writes into --out: text_encoder/ and tokenizer/ (transformers folders), heads.safetensors, history.jsonl
(held-out accuracy per fact), checkpoint/ (accelerate's save_state folder, for --resume). `--device cuda` trains on
a GPU (texts and labels are made on the CPU, batches moved); checkpoints are device-independent. The run is an
`accelerate` one: `accelerate launch --multi_gpu --num_processes N training/train_text.py ... --device cuda` trains
on N GPUs; --bf16 is accelerate's bf16 mixed precision.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training import checkpoint, world  # noqa: E402
from training.schedule import (  # noqa: E402
    after_optimizer_step,
    end_processes,
    lr_schedule,
    own_accelerate_state,
    parse_run_args,
    precision,
    progress_of,
    run_parser,
    smoothed,
    start_accelerated_run,
)
from training.train_unet import TEXT_ARCH, TINY_TEXT, build_tokenizer, text_encoder_for  # noqa: E402

IGNORE = -100
COLOUR_NAMES = tuple(world.COLOURS)
NONE = "none"
# fact -> the values it can take ("none": the text says there is no such thing)
FACTS: dict[str, tuple[str, ...]] = {
    "bg_kind": world.BACKGROUND_KINDS,
    "bg_colour": COLOUR_NAMES,
    "bg_colour2": COLOUR_NAMES + (NONE,),
    "bg_direction": ("horizontal", "vertical", NONE),
    "objects": ("0", "1", "2"),
    **{f"{k}{i}": v + (NONE,) for i in (0, 1) for k, v in (
        ("colour", world.OBJECT_COLOURS), ("shape", world.SHAPES), ("size", tuple(world.SIZES)),
        ("cell", world.CELLS))},
    "edit": world.EDIT_KINDS + (NONE,),
    "edit_colour": COLOUR_NAMES,
    "edit_shape": world.SHAPES,
    "edit_cell": world.CELLS,
    "ref_shape": world.SHAPES,
    "ref_colour": world.OBJECT_COLOURS,
}


def parse_args(argv=None) -> argparse.Namespace:
    p = run_parser(__doc__, batch=128, lr=1e-3, warmup=100, checkpoint_every=500, eval_every=500)
    p.add_argument("--samples", type=int, default=40000, help="training texts (captions and instructions)")
    p.add_argument("--tiny", action="store_true", help="tiny network and data, for tests")
    return parse_run_args(p, argv)


# --------------------------------------------------------------------------------------------- labels


def _index(fact: str, value: str | None) -> int:
    return IGNORE if value is None else FACTS[fact].index(value)


def _says_where(text: str, cell: str) -> bool:
    return any(phrase in text for phrase in world._WHERE[cell])


def caption_facts(text: str, scene: world.Scene) -> dict[str, str | None]:
    """The facts a caption states (None: left out). Objects are named in scene order."""
    bg = scene.background
    facts: dict[str, str | None] = {
        "bg_kind": bg.kind, "bg_colour": bg.colours[0], "bg_colour2": bg.colours[1] if len(bg.colours) > 1 else NONE,
        "bg_direction": None if bg.kind == "gradient" else NONE,  # some gradient captions omit the direction
        "objects": str(len(scene.objects)), "edit": NONE}
    if bg.kind == "gradient" and re.search(r"(on the left|at the top) to ", text):
        facts["bg_direction"] = bg.direction
    words = set(re.findall(r"[a-z]+", text))
    for i in (0, 1):
        if i >= len(scene.objects):
            facts.update({f"colour{i}": NONE, f"shape{i}": NONE, f"size{i}": NONE, f"cell{i}": NONE})
            continue
        o = scene.objects[i]
        facts.update({f"colour{i}": o.colour, f"shape{i}": o.shape,
                      f"size{i}": o.size if words & set(world.SIZES) else None,
                      f"cell{i}": o.cell if _says_where(text, o.cell) else None})
    return facts


def instruction_facts(scene: world.Scene, edit: world.Edit) -> dict[str, str | None]:
    facts: dict[str, str | None] = {"edit": edit.kind}
    if edit.kind == "background":
        facts["edit_colour"] = edit.scene.background.colours[0]
    elif edit.kind == "add":
        o = edit.scene.objects[edit.index]
        facts.update(edit_colour=o.colour, edit_shape=o.shape, edit_cell=o.cell)
    else:
        old = scene.objects[edit.index]
        new = edit.scene.objects[edit.index] if edit.kind != "remove" else old
        facts["ref_shape"] = old.shape
        if old.colour in edit.instruction.split(" to ")[0].split():  # the reference names its colour
            facts["ref_colour"] = old.colour
        if edit.kind == "recolour":
            facts["edit_colour"] = new.colour
        elif edit.kind == "reshape":
            facts["edit_shape"] = new.shape
    return facts


def build_texts(count: int, seed: int, split: str = "train") -> tuple[list[str], torch.Tensor]:
    """`count` texts (3 captions : 2 instructions) with their fact labels (count, len(FACTS))."""
    texts, labels = [], []
    base = seed * count if split == "train" else world.HELD_OUT_SEED + 700_000
    rng = np.random.default_rng(seed + (0 if split == "train" else 1))
    n_captions = count * 3 // 5
    for _, text, scene in world.dataset(base, n_captions, 64, split=split):
        facts = caption_facts(text, scene)
        texts.append(text), labels.append([_index(f, facts.get(f)) for f in FACTS])
    s = base + 10 * count
    while len(texts) < count:
        scene = world.sample_scene(s)
        s += 1
        try:
            edit = world.make_edit(scene, rng)
        except ValueError:
            continue
        facts = instruction_facts(scene, edit)
        texts.append(edit.instruction), labels.append([_index(f, facts.get(f)) for f in FACTS])
    return texts, torch.tensor(labels)


# --------------------------------------------------------------------------------------------- heads


class FactHeads(torch.nn.Module):
    """One learned query per fact attends over the token states (up to the end token); a linear layer per
    fact reads its value. Kept small so the encoder's states, not the heads, must carry the facts."""

    def __init__(self, hidden: int):
        super().__init__()
        self.queries = torch.nn.Parameter(torch.randn(len(FACTS), hidden) * hidden ** -0.5)
        self.key = torch.nn.Linear(hidden, hidden)
        self.read = torch.nn.ModuleList(torch.nn.Linear(hidden, len(v)) for v in FACTS.values())

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        scores = torch.einsum("fh,bth->bft", self.queries, self.key(states)) / states.shape[-1] ** 0.5
        weights = scores.masked_fill(~mask[:, None, :], float("-inf")).softmax(-1)
        pooled = torch.einsum("bft,bth->bfh", weights, states)
        return [head(pooled[:, i]) for i, head in enumerate(self.read)]


class Reader(torch.nn.Module):
    """The text encoder and its fact heads as the one module accelerate prepares (one DistributedDataParallel wrapper,
    the loss's networks inside its forward). The heads read the states in float32: under --bf16 only the encoder
    runs under autocast, as before."""

    def __init__(self, text_encoder, heads: FactHeads):
        super().__init__()
        self.text_encoder, self.heads = text_encoder, heads

    def forward(self, ids: torch.Tensor, eos: int) -> list[torch.Tensor]:
        states = self.text_encoder(ids)[0]
        with torch.autocast(ids.device.type, enabled=False):
            return self.heads(states.float(), token_mask(ids, eos))


def token_mask(ids: torch.Tensor, eos: int) -> torch.Tensor:
    """True up to and including the first end token (what a causal encoder has seen of the text)."""
    first_eos = (ids == eos).int().argmax(1)
    return torch.arange(ids.shape[1], device=ids.device)[None] <= first_eos[:, None]


def fact_losses(logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    losses = [torch.nn.functional.cross_entropy(lg, labels[:, i], ignore_index=IGNORE, reduction="sum")
              for i, lg in enumerate(logits)]
    return torch.stack(losses).sum() / (labels != IGNORE).sum().clamp(min=1)


@torch.no_grad()
def accuracy(text_encoder, heads, ids, labels, eos: int) -> dict[str, float]:
    ids, labels = ids.to(text_encoder.device), labels.to(text_encoder.device)
    logits = heads(text_encoder(ids)[0], token_mask(ids, eos))
    out = {}
    for i, (fact, lg) in enumerate(zip(FACTS, logits)):
        known = labels[:, i] != IGNORE
        if known.any():
            out[fact] = round(float((lg[known].argmax(1) == labels[known, i]).float().mean()), 3)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    with own_accelerate_state():
        return _train(args)


def _train(args) -> dict:
    accelerator, out, rng = start_accelerated_run(args)
    device = accelerator.device
    main_process = accelerator.is_main_process
    with accelerator.main_process_first():  # the main process writes the tokenizer, the others read it
        if main_process:
            tokenizer = build_tokenizer(out / "tokenizer")
        else:
            from transformers import CLIPTokenizer

            tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    count = 600 if args.tiny else args.samples
    texts, labels = build_texts(count, args.seed)
    held_texts, held_labels = build_texts(200 if args.tiny else 2000, args.seed, split="held_out")

    def ids_of(t):
        return tokenizer(t, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    ids, held_ids = ids_of(texts), ids_of(held_texts)
    eos = tokenizer.eos_token_id
    text_encoder = text_encoder_for(TINY_TEXT if args.tiny else TEXT_ARCH, len(tokenizer))
    heads = FactHeads(text_encoder.config.hidden_size)
    reader = Reader(text_encoder, heads)
    params = list(text_encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    run = checkpoint.RunState(rng, accelerator.process_index)
    run.running = {"loss": None}
    reader, opt, lr = accelerator.prepare(reader, opt, lr_schedule(opt, args, 0.05, run))
    accelerator.register_for_checkpointing(run)
    if args.resume:
        checkpoint.load_state(accelerator, out)

    def save():
        checkpoint.save_state(accelerator, out, checkpoint.summary(run, args, opt, ["text_encoder+heads"]))

    def look():
        text_encoder.eval()
        row = {"loss": round(run.running["loss"], 4), **accuracy(text_encoder, heads, held_ids, held_labels, eos)}
        text_encoder.train()
        return row

    reader.train()
    bar = tqdm(total=args.steps, initial=run.step, disable=args.no_progress or not main_process, dynamic_ncols=True)
    run.begin()
    while progress_of(args, run.step, run.seconds()) < 1.0:
        idx = torch.from_numpy(rng.integers(0, len(ids), args.batch))
        with precision(accelerator):
            logits = reader(ids[idx].to(device), eos)
        loss = fact_losses(logits, labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        opt.step()
        lr.step()
        run.step += 1
        run.running["loss"] = smoothed(run.running["loss"], float(accelerator.gather(loss.detach()[None]).mean()))
        after_optimizer_step(args, out, bar, run, look, save, main_process, loss=f"{run.running['loss']:.4f}")
    bar.close()
    save()
    text_encoder.eval()
    row = {"step": run.step, "loss": run.running["loss"]}
    if main_process:
        row |= accuracy(text_encoder, heads, held_ids, held_labels, eos)
        text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
        save_file({k: v.cpu() for k, v in heads.state_dict().items()}, out / "heads.safetensors")
        print(json.dumps(row), flush=True)
    accelerator.wait_for_everyone()
    return row


if __name__ == "__main__":
    main()
    end_processes()
