"""A small randomly initialised Stable-Diffusion-architecture model, built locally from configs.

Used when nothing else loads offline, and by the fast unit tests. It is written to disk as an ordinary
diffusers folder (safetensors) and then loaded by the same loader as SD1.5, so tests exercise the real
loading path. The CLIP-style BPE tokenizer is built here too: the 256 byte symbols (so any word still
tokenizes) plus merges for a small English vocabulary.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

TINY_ID = "tiny-random"
TINY_LABEL = "tiny SD-architecture model (random weights, for testing)"
TINY_VERSION = 4  # 4: + unet_instruct/

# Words that get their own token; everything else falls back to byte-level pieces.
WORDS = (
    "a an the of on in at with and to is photo picture image painting plain background "
    "red green blue yellow orange purple pink white black gray grey brown cyan "
    "small large big tiny circle square triangle star left right top bottom centre center "
    "cat dog house tree sky sea mountain city car flower portrait landscape realistic"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _apply_bpe(pieces: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """Plain BPE: repeatedly join the adjacent pair with the lowest merge rank."""
    ranks = {pair: i for i, pair in enumerate(merges)}
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2:]
    return pieces


def build_tokenizer_files(folder: Path, words=WORDS) -> int:
    """Writes vocab.json and merges.txt for a CLIP BPE tokenizer in which each of `words` is one token and
    anything else splits into byte-level pieces (so unknown words still tokenize); returns the vocab size."""
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):
        # BPE applies merges by global rank, so see how the word splits with the merges so far and
        # join those pieces with new (later-ranked) merges: every listed word becomes one token.
        pieces = _apply_bpe(list(word[:-1]) + [word[-1] + "</w>"], merges)
        left = pieces[0]
        for right in pieces[1:]:
            merges.append((left, right))
            left = left + right
            vocab.setdefault(left, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return len(vocab)


def default_cache_dir() -> Path:
    root = os.environ.get("STUDIO_CACHE") or Path.home() / ".cache" / "diffusion-studio"
    return Path(root)


def build_tiny_model(folder: str | Path, seed: int = 0) -> Path:
    """Builds the tiny model deterministically and saves it as a diffusers folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .previews import fit_previewer

    folder = Path(folder)
    tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")  # per process: parallel test workers
    tok_dir = tmp / "_tok"
    vocab_size = build_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(vocab=str(tok_dir / "vocab.json"), merges=str(tok_dir / "merges.txt"))
    tokenizer.model_max_length = 77

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        )
    )
    # Latent factor 4 and 16x16 latents: native resolution 64 px, a few ms per UNet call on a CPU.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64,
    )
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    # An InstructPix2Pix UNet beside it, as the embedded model ships one: the base UNet's weights with 4 more
    # input channels for the image latent (random here, unlike IP2P's zeros, so tests can see the image act).
    instruct = UNet2DConditionModel.from_config({**unet.config, "in_channels": 8})
    with torch.no_grad():
        state = unet.state_dict()
        state["conv_in.weight"] = torch.cat([state["conv_in.weight"],
                                             0.5 * torch.randn_like(state["conv_in.weight"])], 1)
        instruct.load_state_dict(state)
    # A small output layer (diffusion UNets often zero-init it) keeps a random model's DDIM trajectories
    # stable: inversion then reconstruction round-trips at ~30 dB instead of ~18 dB.
    with torch.no_grad():
        for net in (unet, instruct):
            net.conv_out.weight.mul_(0.3)
            net.conv_out.bias.mul_(0.3)
    # SD1.5's noise schedule, so SD-specific behaviour (e.g. non-zero terminal SNR) carries over.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    # Scale latents to unit variance, as SD's 0.18215 does for its VAE.
    with torch.no_grad():
        from .previews import calibration_images

        z = vae.encode(calibration_images(64)).latent_dist.mean
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp, safe_serialization=True)
    instruct.save_pretrained(tmp / "unet_instruct", safe_serialization=True)
    fit_previewer(vae).save(tmp)
    (tmp / "studio_model.json").write_text(json.dumps({"label": TINY_LABEL, "random_weights": True,
                                                       "version": TINY_VERSION}))
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    import shutil

    if (folder / "model_index.json").is_file():  # another process published the same build first
        shutil.rmtree(tmp)
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)  # atomic publish: a half-written folder is never loaded
    return folder


def ensure_tiny_model(cache_dir: str | Path | None = None) -> Path:
    folder = Path(cache_dir or default_cache_dir()) / f"{TINY_ID}-v{TINY_VERSION}"
    if not (folder / "model_index.json").is_file():
        build_tiny_model(folder)
    return folder
