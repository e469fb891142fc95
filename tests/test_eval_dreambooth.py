"""The 'dreambooth' eval rows (benchmarks/eval_embedded.py) on the tiny model with a 2-step run: every row is there
with a value in range, and the trained adapter is gone again afterwards (the model is left as it was)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dreambooth_rows_on_the_tiny_model(tiny_model, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import eval_embedded

    from pipelines.core.peft_state import adapter_configs
    from training import train_dreambooth

    monkeypatch.setattr(train_dreambooth, "WORLD_STEPS", 2)
    monkeypatch.setattr(train_dreambooth, "WORLD_PRIOR_IMAGES", 2)
    monkeypatch.setattr(eval_embedded.Context, "n", lambda self, full, quick: 2)
    monkeypatch.setattr(eval_embedded.evaluation, "generate_batch", _short(eval_embedded.evaluation.generate_batch))
    loras, adapters = dict(tiny_model.loras), set(adapter_configs(tiny_model.unet))
    rows = eval_embedded.GROUPS["dreambooth"](eval_embedded.Context(tiny_model, quick=True))
    metrics = {r.metric: r for r in rows}
    for label in ("prior on", "prior off"):
        assert {f"{label}: token prompts: heart", f"{label}: plain prompts: shape drop (off - on)",
                f"{label}: training time (4 images)", f"{label}: plain prompts: hearts (leakage)"} <= set(metrics)
    assert all(r.group == "dreambooth" for r in rows)
    assert all(0 <= r.value <= 1 for r in rows if r.unit == "" and "drop" not in r.metric)
    assert metrics["prior on: training time (4 images)"].value > 0
    assert tiny_model.loras == loras and set(adapter_configs(tiny_model.unet)) == adapters


def _short(generate_batch):
    def run(*args, **kwargs):
        return generate_batch(*args, **{**kwargs, "steps": 3})
    return run
