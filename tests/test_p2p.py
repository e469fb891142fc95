"""Prompt-to-Prompt attention control on the tiny model: processors are put back, the edits do what the
controllers promise on the maps the UNet actually uses, and bad settings are user-facing errors."""
from __future__ import annotations

import pytest
import torch

from pipelines.core import ddim
from pipelines.core.errors import InputError
from pipelines.core.events import Cancelled, CancelToken
from pipelines.core.text import encode_prompt
from pipelines.p2p import (
    AttentionController,
    P2PSettings,
    attention_control,
    build_controller,
    replace_mapper,
    token_indices,
)

STEPS = 5
HW = (16, 16)
SRC, TGT = "a red circle", "a blue circle"


def _settings(**kw) -> P2PSettings:
    base = dict(cross_replace_steps=0.0, self_replace_steps=0.0)
    base.update(kw)
    return P2PSettings(**base)


def _sample(model, src, tgt, controller: AttentionController | None, guidance=3.0, cancel=None, after_step=None):
    """Both branches from the same x_T, as the studio's P2P loop does; returns the final [src, tgt] latents."""
    cond = torch.cat([encode_prompt(model, src), encode_prompt(model, tgt)])
    uncond = encode_prompt(model, "").expand(2, -1, -1)
    x_T = torch.randn(1, 4, *HW, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1).clone()

    def eps(x, t, k):
        if controller is not None:
            controller.begin_step(k)
        return ddim.guided_eps(model.unet, x, t, cond, uncond, guidance)

    if after_step is None and controller is not None:
        after_step = controller.after_step
    states = list(ddim.sample_with(eps, x_T, STEPS, model.scheduler_config, cancel, after_step=after_step))
    return states[-1].latents


def _controlled(model, src, tgt, settings, **kw):
    ctl = build_controller(model.tokenizer, src, tgt, settings, STEPS, HW)
    calls = []
    ctl.probe = lambda name, is_cross, before, after: calls.append((name, is_cross, before.clone(), after.clone()))
    with attention_control(model.unet, ctl):
        out = _sample(model, src, tgt, ctl, **kw)
    return ctl, calls, out


def test_processors_restored_after_run_error_and_cancel(tiny_model):
    unet = tiny_model.unet
    before = dict(unet.attn_processors)
    ctl = build_controller(tiny_model.tokenizer, SRC, TGT, P2PSettings(), STEPS, HW)

    with attention_control(unet, ctl):
        assert all(type(p).__name__ == "P2PAttnProcessor" for p in unet.attn_processors.values())
        _sample(tiny_model, SRC, TGT, ctl)
    assert unet.attn_processors == before  # same objects under the same names

    with pytest.raises(RuntimeError):
        with attention_control(unet, ctl):
            raise RuntimeError("boom")
    assert unet.attn_processors == before

    token = CancelToken()

    def cancel_after_two(x, k):
        if k == 1:
            token.cancel()
        return ctl.after_step(x, k)

    with pytest.raises(Cancelled):
        with attention_control(unet, ctl):
            _sample(tiny_model, SRC, TGT, ctl, cancel=token, after_step=cancel_after_two)
    after = unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_inactive_control_matches_plain_sampling(tiny_model, guidance):
    plain = _sample(tiny_model, SRC, TGT, None, guidance=guidance)
    ctl = build_controller(tiny_model.tokenizer, SRC, TGT, _settings(mode="refine"), STEPS, HW)
    with attention_control(tiny_model.unet, ctl):
        controlled = _sample(tiny_model, SRC, TGT, ctl, guidance=guidance)
    torch.testing.assert_close(controlled, plain, rtol=0, atol=1e-6)
    # The explicit-probability path (forced everywhere by a probe) computes the same attention.
    ctl.probe = lambda *a: None
    with attention_control(tiny_model.unet, ctl):
        explicit = _sample(tiny_model, SRC, TGT, ctl, guidance=guidance)
    torch.testing.assert_close(explicit, plain, rtol=0, atol=1e-5)


def test_replace_gives_target_the_mapped_source_cross_attention(tiny_model):
    ctl, calls, out = _controlled(tiny_model, SRC, TGT, _settings(mode="replace", cross_replace_steps=1.0))
    mapper = replace_mapper(tiny_model.tokenizer, SRC, TGT)
    cross = [c for c in calls if c[1]]
    assert len(cross) == 7 * STEPS  # every cross-attention layer at every step
    for _name, _, before, after in cross:
        assert before.shape[0] == 4  # [uncond src, uncond tgt, cond src, cond tgt]
        torch.testing.assert_close(after[-1], before[-2] @ mapper, rtol=0, atol=1e-6)
        assert torch.equal(after[:-1], before[:-1])  # unconditional half and source untouched
    assert all(torch.equal(b, a) for _, is_cross, b, a in calls if not is_cross)  # self-attn left alone
    plain = _sample(tiny_model, SRC, TGT, None)
    torch.testing.assert_close(out[0], plain[0], rtol=0, atol=1e-5)  # the source branch is not affected
    assert (out[1] - plain[1]).abs().max() > 1e-4


def test_replace_stops_after_cross_replace_steps(tiny_model):
    ctl, calls, _ = _controlled(tiny_model, SRC, TGT, _settings(mode="replace", cross_replace_steps=0.4))
    assert ctl.n_cross == 2
    cross = [(b, a) for _, is_cross, b, a in calls if is_cross]
    per_step = len(cross) // STEPS
    for i, (before, after) in enumerate(cross):
        replaced = not torch.equal(after[-1], before[-1])
        assert replaced == (i // per_step < 2)


def test_refine_keeps_new_words_own_attention(tiny_model):
    src, tgt = "a circle", "a red circle"
    _, calls, _ = _controlled(tiny_model, src, tgt, _settings(mode="refine", cross_replace_steps=1.0))
    tok = tiny_model.tokenizer
    (red,), (circle_t,), (circle_s,) = (token_indices(tok, tgt, "red"), token_indices(tok, tgt, "circle"),
                                         token_indices(tok, src, "circle"))
    for _, is_cross, before, after in calls:
        if is_cross:
            assert torch.equal(after[-1][..., red], before[-1][..., red])  # new word: target's own map
            assert torch.equal(after[-1][..., circle_t], before[-2][..., circle_s])  # shared word: source's
            assert torch.equal(after[-1][..., 0], before[-2][..., 0])


def test_self_replace_only_in_coarse_layers(tiny_model):
    _, calls, _ = _controlled(tiny_model, SRC, TGT, _settings(mode="refine", self_replace_steps=1.0))
    coarse = fine = 0
    for _name, is_cross, before, after in calls:
        if is_cross:
            continue
        if before.shape[2] <= HW[0] * HW[1] // 4:  # 8x8 layers of the 16x16 latent
            coarse += 1
            assert torch.equal(after[-1], before[-2])
            assert torch.equal(after[:-1], before[:-1])
        else:
            fine += 1
            assert torch.equal(after, before)
    assert coarse and fine


def test_reweight_scales_the_word_column(tiny_model):
    prompt = "a red circle"
    ctl, calls, _ = _controlled(tiny_model, prompt, prompt,
                                _settings(mode="reweight", reweight_words=("red",), reweight_scale=3.0))
    (col,) = token_indices(tiny_model.tokenizer, prompt, "red")
    others = [i for i in range(77) if i != col]
    cross = [(b, a) for _, is_cross, b, a in calls if is_cross]
    assert cross
    for before, after in cross:
        torch.testing.assert_close(after[-1][..., col], 3.0 * before[-1][..., col])
        assert torch.equal(after[-1][..., others], before[-1][..., others])
        assert torch.equal(after[:-1], before[:-1])


def test_reweight_applies_on_top_of_replacement(tiny_model):
    settings = _settings(mode="replace", cross_replace_steps=1.0, reweight_words=("blue",), reweight_scale=-2.0)
    _, calls, _ = _controlled(tiny_model, SRC, TGT, settings)
    eq = torch.ones(77)
    eq[token_indices(tiny_model.tokenizer, TGT, "blue")] = -2.0
    mapper = replace_mapper(tiny_model.tokenizer, SRC, TGT)
    for _, is_cross, before, after in calls:
        if is_cross:
            torch.testing.assert_close(after[-1], (before[-2] @ mapper) * eq, rtol=0, atol=1e-6)


def test_local_blend_keeps_source_outside_mask(tiny_model):
    # The random model's maps are nearly flat (0.89..1 of their peak), hence the high threshold.
    settings = P2PSettings(mode="replace", blend_words=("red", "blue"), blend_start=0.4, blend_threshold=0.94)
    ctl = build_controller(tiny_model.tokenizer, SRC, TGT, settings, STEPS, HW)
    seen = []

    def after_step(x, k):
        y = ctl.after_step(x, k)
        seen.append((k, x.clone(), y.clone(), None if ctl.last_mask is None else ctl.last_mask.clone()))
        return y

    with attention_control(tiny_model.unet, ctl):
        _sample(tiny_model, SRC, TGT, ctl, after_step=after_step)
    assert len(seen) == STEPS
    for k, x, y, mask in seen:
        assert torch.equal(y[0], x[0])
        if k < 2:  # int(0.4 * 5): no blending yet
            assert mask is None and torch.equal(y, x)
            continue
        assert mask.shape == (1, 1, *HW)
        assert set(mask.unique().tolist()) <= {0.0, 1.0} and 0 < mask.sum() < mask.numel()
        outside, inside = mask[0, 0] == 0, mask[0, 0] == 1
        assert torch.equal(y[1][:, outside], x[0][:, outside])
        assert torch.equal(y[1][:, inside], x[1][:, inside])
    assert not torch.equal(seen[-1][1][1], seen[-1][2][1])  # blending changed the target


def test_no_blend_words_leaves_latents_alone(tiny_model):
    ctl = build_controller(tiny_model.tokenizer, SRC, TGT, P2PSettings(), STEPS, HW)
    x = torch.randn(2, 4, *HW)
    assert ctl.after_step(x, STEPS - 1) is x


def test_mapper_spreads_a_multi_token_word(tiny_model):
    tok = tiny_model.tokenizer
    src, tgt = "a red circle", "a red zebra"
    zebra = token_indices(tok, tgt, "zebra")
    assert len(zebra) > 1  # unknown to the tiny vocabulary: byte-level pieces
    m = replace_mapper(tok, src, tgt)
    (circle,) = token_indices(tok, src, "circle")
    torch.testing.assert_close(m[circle, zebra], torch.full((len(zebra),), 1.0 / len(zebra)))
    assert m[circle].sum() == pytest.approx(1.0)
    for i in (0, 1, 2):  # BOS and the unchanged words map one to one
        assert m[i, i] == 1 and m[i].sum() == 1
    eos_s, eos_t = 4, 3 + len(zebra)
    assert m[eos_s, eos_t] == 1 and m[76 - (eos_t - eos_s), 76] == 1  # EOS aligned to EOS, padding after it
    assert (m.sum(0) > 0).all()  # every target column is fed


def test_token_indices_match_whole_words():
    class Tok:  # whitespace words as single tokens, "," its own token
        model_max_length = 77
        vocab: dict[str, int] = {}

        def encode(self, text, add_special_tokens=False):
            return [self.vocab.setdefault(p, len(self.vocab)) for p in text.lower().replace(",", " ,").split()]

    tok = Tok()
    assert token_indices(tok, "A Cat, a bobcat and a cat", "cat") == [2, 8]
    assert token_indices(tok, "a red circle", "red circle") == [2, 3]
    assert token_indices(tok, "a red circle", "dog") == []


def test_token_indices_on_clip_tokenizer(tiny_model):
    tok = tiny_model.tokenizer
    assert token_indices(tok, "bobcat", "cat") == []
    assert token_indices(tok, "a cat, on the sea", "cat") == [2]
    ids = tok("a red zebra").input_ids
    assert [ids[i] for i in token_indices(tok, "a red zebra", "zebra")] == tok.encode("zebra", add_special_tokens=False)


@pytest.mark.parametrize("src,tgt,kw,fragment", [
    ("a red circle", "a big blue circle", {}, "3 words"),
    ("", "a red circle", {}, "source prompt"),
    ("a red circle", "  ", {}, "target prompt"),
    ("a red circle", "a red circle", {}, "nothing to edit"),
    ("a red circle", "a blue circle", {"reweight_words": ("green",), "reweight_scale": 2.0}, "green"),
    ("a red circle", "a blue circle", {"blend_words": ("square",)}, "square"),
    ("a red circle", "a blue circle", {"cross_replace_steps": 1.5}, "between 0 and 1"),
    ("a red circle", "a blue circle", {"self_replace_steps": -0.1}, "between 0 and 1"),
    ("a red circle", "a blue circle", {"blend_start": 2.0}, "between 0 and 1"),
    ("a red circle", "a blue circle", {"blend_threshold": 1.0}, "threshold"),
    ("a red circle", "a blue circle", {"reweight_words": ("blue",), "reweight_scale": 11.0}, "-10 and 10"),
    ("a red circle", "a red circle", {"mode": "reweight"}, "reweight"),
    ("a red circle", "a blue circle", {"mode": "swap"}, "mode"),
])
def test_bad_settings_are_input_errors(tiny_model, src, tgt, kw, fragment):
    with pytest.raises(InputError, match=fragment):
        build_controller(tiny_model.tokenizer, src, tgt, P2PSettings(**kw), STEPS, HW)


def test_replace_word_count_message_suggests_refine(tiny_model):
    with pytest.raises(InputError) as err:
        build_controller(tiny_model.tokenizer, "a red circle", "a big blue circle", P2PSettings(), STEPS, HW)
    msg = str(err.value)
    assert "3" in msg and "4" in msg and "refine" in msg
    # the same prompts are fine in refine mode, and identical prompts are fine when a word is reweighted
    build_controller(tiny_model.tokenizer, "a red circle", "a big blue circle", P2PSettings(mode="refine"), STEPS, HW)
    build_controller(tiny_model.tokenizer, "a red circle", "a red circle",
                     P2PSettings(reweight_words=("red",), reweight_scale=2.0), STEPS, HW)
