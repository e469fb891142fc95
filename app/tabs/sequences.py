"""What both interpolation tabs (seeds, real images) share: the distance plot's data and the LoRA comparison's
button, outputs and rendering."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from pipelines.interpolation import ComparisonFrames, LoraComparison, comparison_labels

from .. import downloads
from ..streaming import status_line

COMPARE_PLOT_COLUMNS = ("pair", "distance", "series")


def distance_frame(distances) -> pd.DataFrame:
    return pd.DataFrame({"pair": list(range(len(distances))), "distance": list(distances)})


def comparison_frame(r: LoraComparison | None) -> pd.DataFrame:
    """Both sequences' adjacent-frame distances as one LinePlot table, a `series` column telling them apart."""
    rows = []
    if r is not None:
        for label, seq in zip(comparison_labels(r.lora, r.strength), (r.without, r.with_lora), strict=True):
            rows += [(k, float(d), label) for k, d in enumerate(seq.distances)]
    return pd.DataFrame(rows, columns=list(COMPARE_PLOT_COLUMNS))


def comparison_outputs(prefix: str) -> dict:
    """Both sequences side by side, their ISTDs and ratio, and both distance curves in one plot: the
    comparison endpoint's outputs by name, in its order (the status follows them)."""
    gr.Markdown("**With and without the LoRA** (same endpoints and settings)")
    with gr.Row():
        without = gr.Gallery(label="Without the LoRA", columns=4, format="png", height=240,
                             elem_id=f"{prefix}-compare-without")
        with_lora = gr.Gallery(label="With the LoRA", columns=4, format="png", height=240,
                               elem_id=f"{prefix}-compare-with")
    with gr.Row():
        istd_off = gr.Number(label="ISTD without the LoRA", interactive=False)
        istd_on = gr.Number(label="ISTD with the LoRA", interactive=False)
        ratio = gr.Number(label="ISTD ratio (with / without; below 1 = smoother)", interactive=False)
    plot = gr.LinePlot(comparison_frame(None), x="pair", y="distance", color="series",
                       title="Adjacent-frame distances, without and with the LoRA", x_title="frame pair k→k+1",
                       y_title="L2 distance", elem_id=f"{prefix}-compare-plot")
    return dict(without=without, with_lora=with_lora, plot=plot, istd_without=istd_off, istd_with=istd_on,
                ratio=ratio)


def compare_done(ev, session=None) -> dict:
    r = ev.result
    ratio = r.istd_ratio
    ratio_text = f" · ratio {ratio:.3f}" if ratio is not None else ""
    without, with_lora = r.without.frames, r.with_lora.frames
    if session is not None:  # named files: "interpolate-without-lora_seed0-1_<time>_01.png"
        task = downloads.task_of(without[0] if without else None, "interpolate")
        without = downloads.result_files(session, without, f"{task}-without-lora")
        with_lora = downloads.result_files(session, with_lora, f"{task}-with-lora")
    return dict(without=without, with_lora=with_lora, plot=comparison_frame(r),
                istd_without=r.without.istd, istd_with=r.with_lora.istd, ratio=ratio,
                status=f"{len(r.without.frames)} frames each · ISTD {r.without.istd:.4f} without, "
                       f"{r.with_lora.istd:.4f} with {r.lora}{ratio_text}")


def compare_progress(ev) -> dict:
    """The frames of the sequence being rendered, in its gallery; the status line."""
    values = {"status": status_line(ev)}
    part = ev.partial if isinstance(ev.partial, ComparisonFrames) else None
    if part is not None:
        values["with_lora" if part.with_lora else "without"] = part.frames
    return values


def compare_cleared(status: str) -> dict:
    """A comparison starts from empty outputs: nothing of an earlier one stays next to a stopped or failed new
    one."""
    return dict(without=[], with_lora=[], plot=comparison_frame(None), istd_without=None, istd_with=None,
                ratio=None, status=status)
