"""Prompt-to-Prompt (Hertz et al., 2022): edit an image by re-using the source prompt's attention maps while
the target prompt is sampled next to it.

The source and target branches run in one UNet batch whose last two items are [source, target] (under
classifier-free guidance the unconditional half before them is left alone). Attention is hooked with
diffusers attention processors, installed and removed by `attention_control`; the per-step policy lives in
`AttentionController`, which the sampling loop drives with `begin_step` and `after_step`.
"""
from __future__ import annotations

import difflib
import math
import string
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .core.attention import call_fallback, from_tokens, to_tokens
from .core.errors import InputError

MODES = ("replace", "refine", "reweight")


@dataclass
class P2PSettings:
    mode: str = "replace"            # "replace" (word swap), "refine" (added/changed words) or "reweight" only
    cross_replace_steps: float = 0.8  # fraction of steps (from the noisiest) with the source's cross-attention
    self_replace_steps: float = 0.4   # fraction of steps with the source's self-attention (coarse layers only)
    reweight_words: tuple[str, ...] = ()  # words of the target prompt whose cross-attention is scaled
    reweight_scale: float = 1.0
    blend_words: tuple[str, ...] = ()     # local blend region words (source and/or target); empty = off
    # On min-max rescaled maps (see after_step). Measured on 20 held-out recolours with the embedded model:
    # 0.5 / 0.6 / 0.7 keep 23.8 / 24.7 / 25.5 dB outside the object at the same success; lower it for edits
    # that should spread (the paper's 0.3 is on max-scaled maps, looser on maps with a high floor).
    blend_threshold: float = 0.7
    blend_start: float = 0.2
    # With a local blend, the input's pixels outside the last step's blend region (grown one latent cell, then
    # ramped over one more). The blend makes the target's latent there exactly the source branch's, but the
    # decoder spreads the edited object's latents over the whole image. On the eval's 20 recolours (threshold 0.7,
    # embedded model) PSNR outside the object 22.7 dB plain, 29.6 pasted; success 0.50 / 0.30, as the seam can
    # change how the checker reads the object (pipelines.core.masks.paste_outside; p2p_blend_sweep.py --plain-decode).
    keep_background: bool = True


# ---------------------------------------------------------------------------------------------- tokens

def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _norm(word: str) -> str:
    return word.lower().strip(string.punctuation)


def _word_spans(tokenizer, prompt: str) -> list[tuple[int, list[int]]]:
    """(first position, token ids) of each space-separated word; position 0 is BOS. CLIP's BPE never
    merges across whitespace, so tokenizing word by word reproduces the prompt's token sequence."""
    spans, pos = [], 1
    for word in prompt.split():
        ids = _encode(tokenizer, word)
        spans.append((pos, ids))
        pos += len(ids)
    return spans


def _max_len(tokenizer) -> int:
    n = int(getattr(tokenizer, "model_max_length", 77) or 77)
    return n if n < 100_000 else 77  # "unlimited" sentinel of tokenizers without a configured length


def _find(seq: list[int], sub: list[int]) -> int:
    for i in range(len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    return -1


def token_indices(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions (in the padded sequence, BOS = 0) of a word's tokens, for every occurrence; `word` may be a
    phrase. Matching ignores case and surrounding punctuation; tokens cut off by truncation are left out."""
    key = [_norm(w) for w in word.split()]
    if not key or not all(key):
        return []
    words = prompt.split()
    spans = _word_spans(tokenizer, prompt)
    limit = _max_len(tokenizer) - 1  # the last slot holds EOS after truncation
    out: set[int] = set()
    for i in range(len(words) - len(key) + 1):
        if [_norm(w) for w in words[i:i + len(key)]] != key:
            continue
        for w, (start, ids) in zip(key, spans[i:i + len(key)]):
            core = _encode(tokenizer, w)
            at = _find(ids, core)  # "cat," -> only the tokens of "cat"
            first, n = (at, len(core)) if at >= 0 else (0, len(ids))
            out.update(p for p in range(start + first, start + first + n) if p < limit)
    return sorted(out)


def _content_ids(tokenizer, prompt: str) -> list[int]:
    ids = [t for _, w in _word_spans(tokenizer, prompt) for t in w]
    return ids[:_max_len(tokenizer) - 2]


def replace_mapper(tokenizer, source: str, target: str) -> torch.Tensor:
    """(n, n) matrix M with target_probs = source_probs @ M. Word i of the source feeds word i of the
    target; when their token counts differ, each target token gets 1/len(target tokens) of every source
    token, so the word's total attention is kept. EOS and padding are aligned EOS to EOS."""
    n = _max_len(tokenizer)
    m = torch.zeros(n, n)
    m[0, 0] = 1.0
    ps = pt = 1
    for (_, a), (_, b) in zip(_word_spans(tokenizer, source), _word_spans(tokenizer, target)):
        src = [p for p in range(ps, ps + len(a)) if p < n - 1]
        tgt = [p for p in range(pt, pt + len(b)) if p < n - 1]
        if len(a) == len(b):
            for s, t in zip(src, tgt):
                m[s, t] = 1.0
        else:
            for t in tgt:
                m[src, t] = 1.0 / len(b)
        ps, pt = ps + len(a), pt + len(b)
    _align_tails(m, min(ps, n - 1), min(pt, n - 1))
    return m


def _align_tails(m: torch.Tensor, eos_src: int, eos_tgt: int) -> None:
    n = m.shape[0]
    for j in range(eos_tgt, n):
        m[min(eos_src + j - eos_tgt, n - 1), j] = 1.0


def refine_alignment(tokenizer, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, alpha), both (n,): target token j takes source column index[j] where alpha[j] = 1 (the token
    also occurs in the source, by sequence alignment) and keeps its own attention where alpha[j] = 0."""
    n = _max_len(tokenizer)
    cs, ct = _content_ids(tokenizer, source), _content_ids(tokenizer, target)
    index = torch.arange(n)
    alpha = torch.zeros(n)
    alpha[0] = 1.0
    for a, b, size in difflib.SequenceMatcher(None, cs, ct, autojunk=False).get_matching_blocks():
        for k in range(size):
            index[1 + b + k] = 1 + a + k
            alpha[1 + b + k] = 1.0
    eos_s, eos_t = 1 + len(cs), 1 + len(ct)
    for j in range(eos_t, n):
        index[j] = min(eos_s + j - eos_t, n - 1)
        alpha[j] = 1.0
    return index, alpha


# ---------------------------------------------------------------------------------------------- control

def _grid(n_query: int, hw: tuple[int, int]) -> tuple[int, int] | None:
    """The (h, w) of a layer with n_query tokens: the latent size halved (rounding up, as strided convs
    do) until it fits."""
    h, w = hw
    while h * w > n_query:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return (h, w) if h * w == n_query else None


Probe = Callable[[str, bool, torch.Tensor, torch.Tensor], None]


class AttentionController:
    """Per-step attention policy. Probabilities arrive as (batch, heads, queries, keys); only the last two
    batch items ([source, target], conditional) are edited."""

    def __init__(
        self, *, steps: int, latent_hw: tuple[int, int], n_tokens: int = 77, mapper: torch.Tensor | None = None,
        refine: tuple[torch.Tensor, torch.Tensor] | None = None, equalizer: torch.Tensor | None = None,
        cross_replace_steps: float = 0.0, self_replace_steps: float = 0.0,
        blend_tokens: tuple[list[int], list[int]] = ([], []), blend_threshold: float = 0.7,
        blend_start: float = 0.2,
    ) -> None:
        # int(frac * steps), with a little slack so that e.g. 0.57 * 100 counts as 57 steps, not 56
        def n_steps(frac: float) -> int:
            return int(frac * steps + 1e-6)

        self.steps = int(steps)
        self.latent_hw = (int(latent_hw[0]), int(latent_hw[1]))
        self.n_tokens = n_tokens
        self.mapper = mapper
        self.refine = refine
        self.equalizer = equalizer
        self.n_cross = n_steps(cross_replace_steps)
        self.n_self = n_steps(self_replace_steps)
        self.self_max_queries = self.latent_hw[0] * self.latent_hw[1] // 4  # skip full-resolution layers
        self.blend_tokens = (list(blend_tokens[0]), list(blend_tokens[1]))
        self.blend_threshold = blend_threshold
        self.n_blend_start = n_steps(blend_start)
        self.probe: Probe | None = None  # test/UI hook: probe(layer, is_cross, probs_in, probs_out)
        self.index = 0
        self.last_mask: torch.Tensor | None = None
        self._maps: torch.Tensor | None = None  # this step's blend maps (2, 1, h, w), summed over layers
        self._layers = 0
        self._consts: dict = {}

    @property
    def blending(self) -> bool:
        return bool(self.blend_tokens[0] or self.blend_tokens[1])

    def begin_step(self, index: int) -> None:
        self.index = int(index)
        self._maps, self._layers = None, 0

    def _blend_now(self) -> bool:
        return self.blending and self.index >= self.n_blend_start

    def wants(self, is_cross: bool, n_query: int, n_keys: int) -> bool:
        """Whether a layer needs explicit probabilities now (otherwise the original processor runs)."""
        if self.probe is not None:
            return True
        if is_cross:
            return n_keys == self.n_tokens and (
                self.index < self.n_cross or self.equalizer is not None or self._blend_now())
        return self.index < self.n_self and n_query <= self.self_max_queries

    def _const(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        key = (name, like.device, like.dtype)
        if key not in self._consts:
            self._consts[key] = t.to(like.device, like.dtype if t.is_floating_point() else t.dtype)
        return self._consts[key]

    def edit(self, probs: torch.Tensor, is_cross: bool, name: str = "") -> torch.Tensor:
        """New probabilities for one layer call; `probs` is (batch, heads, queries, keys)."""
        out = probs
        if probs.shape[0] >= 2:
            if is_cross and probs.shape[-1] == self.n_tokens:
                out = torch.cat([probs[:-1], self._cross(probs[-2], probs[-1])[None]])
                if self._blend_now():
                    self._store(out[-2:])
            elif not is_cross and self.index < self.n_self and probs.shape[2] <= self.self_max_queries:
                out = torch.cat([probs[:-1], probs[-2:-1]])
        if self.probe is not None:
            self.probe(name, is_cross, probs, out)
        return out

    def _cross(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        new = tgt
        if self.index < self.n_cross:
            if self.mapper is not None:
                new = src @ self._const("mapper", self.mapper, src)
            elif self.refine is not None:
                index, alpha = self.refine
                alpha = self._const("alpha", alpha, src)
                new = src[..., self._const("index", index, src)] * alpha + tgt * (1 - alpha)
            else:
                new = src
        if self.equalizer is not None:
            new = new * self._const("equalizer", self.equalizer, src)
        return new

    def _store(self, pair: torch.Tensor) -> None:
        grid = _grid(pair.shape[2], self.latent_hw)
        if grid is None:
            return
        mean = pair.float().mean(1)  # (2, queries, tokens), averaged over heads
        maps = torch.zeros(2, mean.shape[1], device=mean.device)
        for side, cols in enumerate(self.blend_tokens):
            if cols:
                maps[side] = mean[side][:, cols].sum(-1)
        maps = F.interpolate(maps.view(2, 1, *grid), size=self.latent_hw, mode="bilinear", align_corners=False)
        self._maps = maps if self._maps is None else self._maps + maps
        self._layers += 1

    def after_step(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Local blend on latents [..., source, target]: outside the words' region the target is the source."""
        if not self.blending or index < self.n_blend_start or self._maps is None:
            return x
        maps = self._maps / self._layers
        mask = torch.zeros(1, 1, *self.latent_hw, dtype=torch.bool, device=maps.device)
        for side, cols in enumerate(self.blend_tokens):
            # Rescaled to [0, 1] between the map's min and max. The reference divides by the max only, which is
            # the same for maps near 0 away from the word; the embedded model's maps sit on a high floor, and
            # max-only scaling put 67% of the image in the mask at threshold 0.5 (min-max: 17%; 8 recolour edits).
            m = maps[side:side + 1]
            lo, hi = m.min(), m.max()
            if cols and hi > lo:
                mask |= (m - lo) / (hi - lo) > self.blend_threshold
        if mask.shape[-2:] != x.shape[-2:]:
            mask = F.interpolate(mask.float(), size=x.shape[-2:], mode="nearest").bool()
        mask = mask.to(x.device)
        self.last_mask = mask.to(x.dtype)
        out = x.clone()
        out[-1] = torch.where(mask[0], x[-1], x[-2])
        return out


# ---------------------------------------------------------------------------------------------- builder

def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise InputError(f"{name} must be between 0 and 1 (got {value}).")


def as_words(words) -> tuple[str, ...]:
    if isinstance(words, str):
        words = words.split(",")
    return tuple(w.strip() for w in words if w and w.strip())


def build_controller(tokenizer, source_prompt: str, target_prompt: str, settings: P2PSettings, steps: int,
                     latent_hw: tuple[int, int]) -> AttentionController:
    """Validates the settings (InputError with a user-facing message) and builds the controller."""
    source, target = (source_prompt or "").strip(), (target_prompt or "").strip()
    if not source:
        raise InputError("Enter a source prompt (describing the original image).")
    if not target:
        raise InputError("Enter a target prompt (describing the edited image).")
    mode = (settings.mode or "").strip().lower()
    if mode not in MODES:
        raise InputError(f"Unknown Prompt-to-Prompt mode {settings.mode!r}; use one of: {', '.join(MODES)}.")
    if int(steps) < 1:
        raise InputError("Prompt-to-Prompt needs at least one sampling step.")
    _check_fraction("Cross-attention replace steps", settings.cross_replace_steps)
    _check_fraction("Self-attention replace steps", settings.self_replace_steps)
    _check_fraction("Local blend start", settings.blend_start)
    if not 0.0 < float(settings.blend_threshold) < 1.0:
        raise InputError(f"Local blend threshold must be between 0 and 1, exclusive (got {settings.blend_threshold}).")
    if not -10.0 <= float(settings.reweight_scale) <= 10.0:
        raise InputError(f"Reweight scale must be between -10 and 10 (got {settings.reweight_scale}).")

    reweight_words = as_words(settings.reweight_words)
    blend_words = as_words(settings.blend_words)
    reweighting = bool(reweight_words) and float(settings.reweight_scale) != 1.0
    same = source.split() == target.split()
    if mode == "reweight" and not reweight_words:
        raise InputError("Reweight mode needs at least one word of the target prompt to reweight.")
    if same and not reweighting:
        raise InputError("The source and target prompts are the same, so there is nothing to edit; change the "
                         "target prompt or reweight a word (with a scale other than 1).")
    if mode == "replace" and len(source.split()) != len(target.split()):
        raise InputError(f"Replace mode swaps words one for one, but the source prompt has {len(source.split())} "
                         f"words and the target prompt {len(target.split())}; use \"refine\" mode to add or "
                         f"remove words.")

    n = _max_len(tokenizer)
    equalizer = None
    if reweight_words:
        equalizer = torch.ones(n)
        for word in reweight_words:
            cols = token_indices(tokenizer, target, word)
            if not cols:
                raise InputError(f"The reweight word \"{word}\" is not in the target prompt.")
            equalizer[cols] = float(settings.reweight_scale)
    src_cols: set[int] = set()
    tgt_cols: set[int] = set()
    for word in blend_words:
        s, t = token_indices(tokenizer, source, word), token_indices(tokenizer, target, word)
        if not s and not t:
            raise InputError(f"The local blend word \"{word}\" is in neither the source nor the target prompt.")
        src_cols.update(s)
        tgt_cols.update(t)

    mapper = refine = None
    if mode == "replace":
        mapper = replace_mapper(tokenizer, source, target)
    else:  # refine, and reweight (the alignment is the identity when the prompts match)
        refine = refine_alignment(tokenizer, source, target)
    return AttentionController(
        steps=int(steps), latent_hw=latent_hw, n_tokens=n, mapper=mapper, refine=refine, equalizer=equalizer,
        cross_replace_steps=settings.cross_replace_steps, self_replace_steps=settings.self_replace_steps,
        blend_tokens=(sorted(src_cols), sorted(tgt_cols)), blend_threshold=float(settings.blend_threshold),
        blend_start=settings.blend_start,
    )


# ---------------------------------------------------------------------------------------------- processors

class P2PAttnProcessor:
    """Explicit-probability attention (as diffusers' AttnProcessor, so PEFT LoRA in to_q/k/v/out stays
    active) where the controller edits or reads maps; elsewhere the layer's original processor runs."""

    def __init__(self, controller: AttentionController, name: str, fallback) -> None:
        self.controller = controller
        self.name = name
        self.fallback = fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        is_cross = encoder_hidden_states is not None
        if hidden_states.ndim == 4:
            n_query = hidden_states.shape[2] * hidden_states.shape[3]
        else:
            n_query = hidden_states.shape[1]
        n_keys = encoder_hidden_states.shape[1] if is_cross else n_query
        if not self.controller.wants(is_cross, n_query, n_keys):
            return call_fallback(self.fallback, attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                 kwargs)
        hidden_states, residual, shape = to_tokens(attn, hidden_states, temb)
        batch_size = hidden_states.shape[0]
        sequence_length = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[1]
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)
        # head_to_batch_dim puts item b, head h at b * heads + h
        probs = probs.view(batch_size, attn.heads, *probs.shape[1:])
        probs = self.controller.edit(probs, is_cross, self.name)
        probs = probs.reshape(batch_size * attn.heads, *probs.shape[2:])
        hidden_states = torch.bmm(probs.to(value.dtype), value)
        return from_tokens(attn, attn.batch_to_head_dim(hidden_states), residual, shape)


@contextmanager
def attention_control(unet, controller: AttentionController):
    """Installs P2P processors on every attention layer of `unet` for the block; the original processor
    objects are put back afterwards, also when the block raises (e.g. Cancelled)."""
    saved = dict(unet.attn_processors)
    unet.set_attn_processor({
        name: P2PAttnProcessor(controller, name[: -len(".processor")], proc) for name, proc in saved.items()
    })
    try:
        yield controller
    finally:
        unet.set_attn_processor(dict(saved))  # set_attn_processor pops from the dict it is given
