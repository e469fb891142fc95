"""The text-encoder pre-training (training/train_text.py): every fact label is what the text states, facts a
text leaves out are not asked for, and a tiny run learns, resumes and saves a frozen-usable encoder."""
from __future__ import annotations

import json

import pytest
import torch

from training import train_text, world

FACTS = list(train_text.FACTS)


def _label(labels, i, fact):
    value = int(labels[i, FACTS.index(fact)])
    return None if value == train_text.IGNORE else train_text.FACTS[fact][value]


def test_caption_labels_are_what_the_caption_says():
    texts, labels = train_text.build_texts(200, seed=3)
    scenes = [scene for _, _, scene in world.dataset(3 * 200, 120, 64, split="train")]
    assert len(texts) == 200
    for i, scene in enumerate(scenes):
        text = texts[i]
        assert _label(labels, i, "objects") == str(len(scene.objects))
        assert _label(labels, i, "bg_colour") in text and _label(labels, i, "bg_kind") == scene.background.kind
        assert _label(labels, i, "edit") == "none"
        for k in (0, 1):
            if k >= len(scene.objects):
                assert _label(labels, i, f"shape{k}") == "none"
                continue
            obj = scene.objects[k]
            assert (_label(labels, i, f"colour{k}"), _label(labels, i, f"shape{k}")) == (obj.colour, obj.shape)
            assert obj.shape in text and obj.colour in text
            cell = _label(labels, i, f"cell{k}")
            assert cell in (None, obj.cell)
            assert (cell is not None) == any(p in text for p in world._WHERE[obj.cell])
            size = _label(labels, i, f"size{k}")
            assert size in (None, obj.size) and (size is None) == (obj.size not in text.split())
    # instructions: the kind and what they ask for
    kinds = {_label(labels, i, "edit") for i in range(120, 200)}
    assert kinds == set(world.EDIT_KINDS)
    for i in range(120, 200):
        colour = _label(labels, i, "edit_colour")
        assert colour is None or colour in texts[i]
        assert _label(labels, i, "bg_kind") is None  # instructions say nothing of the scene's background kind


def test_held_out_texts_come_from_held_out_seeds(monkeypatch):
    seen = []
    real = world.dataset

    def spy(seed, count, size=64, split=None):
        seen.append((seed, split))
        return real(seed, count, size, split)

    monkeypatch.setattr(world, "dataset", spy)
    train_text.build_texts(50, seed=0, split="held_out")
    train_text.build_texts(50, seed=0)
    assert seen[0][0] >= world.HELD_OUT_SEED and seen[0][1] == "held_out"
    assert seen[1][0] < world.HELD_OUT_SEED and seen[1][1] == "train"


def test_heads_read_only_tokens_up_to_the_end_token():
    ids = torch.tensor([[5, 6, 9, 9, 9], [5, 9, 9, 9, 9]])
    assert train_text.token_mask(ids, eos=9).tolist() == [[True, True, True, False, False],
                                                          [True, True, False, False, False]]
    heads = train_text.FactHeads(8)
    states = torch.randn(2, 5, 8)
    mask = train_text.token_mask(ids, eos=9)
    a = heads(states, mask)
    states[:, 3:] = 100.0  # padding after the end token must not matter
    b = heads(states, mask)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("text_run")
    args = ["--out", str(out), "--tiny", "--threads", "1", "--batch", "32", "--checkpoint-every", "20",
            "--eval-every", "1000", "--no-progress", "--lr", "3e-3"]
    with torch.random.fork_rng():
        first = train_text.main([*args, "--steps", "20"])
        last = train_text.main([*args, "--steps", "120", "--resume"])
    return out, first, last


@pytest.mark.slow
def test_tiny_run_learns_resumes_and_saves_a_loadable_encoder(tiny_run):
    from transformers import CLIPTextModel, CLIPTokenizer

    out, first, last = tiny_run
    assert last["step"] == 120 and last["loss"] < first["loss"]
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 120
    # facts with few values are learned well past chance even by the tiny encoder
    assert last["objects"] > 0.6 and last["edit"] > 0.6
    encoder = CLIPTextModel.from_pretrained(out / "text_encoder")
    tok = CLIPTokenizer.from_pretrained(out / "tokenizer")
    ids = tok(["a red circle on the left on a white background"], padding="max_length", max_length=77,
              return_tensors="pt").input_ids
    assert encoder(ids)[0].shape == (1, 77, encoder.config.hidden_size)
    assert {p.suffix for p in out.rglob("*") if p.is_file() and "checkpoint" not in p.parts} <= {
        ".safetensors", ".json", ".jsonl", ".txt"}
    assert state["models"] == {"text_encoder+heads": "model.safetensors"}  # accelerate's save_state folder
